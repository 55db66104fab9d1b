"""``prune_gradual``: the cubic schedule, update steps, ties kept, zeros kept through training, bad schedules."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.errors import PassConfigError
from lowbit.ir.annotations import get_meta
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import ApplyMasks, PruneGradual, PruneMagnitude, cubic_sparsity
from lowbit.passes.prune.gradual import GradualConfig, threshold_mask


def config(**options) -> GradualConfig:
    return GradualConfig.from_options("prune_gradual", options)


def test_schedule_is_cubic_and_clipped() -> None:
    c = config(sparsity=0.8, initial_sparsity=0.1, start_step=100, end_step=300)
    assert cubic_sparsity(0, c) == pytest.approx(0.1)
    assert cubic_sparsity(100, c) == pytest.approx(0.1)
    assert cubic_sparsity(200, c) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5**3)
    assert cubic_sparsity(300, c) == pytest.approx(0.8)
    assert cubic_sparsity(10_000, c) == pytest.approx(0.8)


def test_threshold_mask_keeps_ties_and_at_least_one_weight() -> None:
    w = torch.tensor([1.0, 2.0, 2.0, 3.0, -2.0, 0.5])
    assert threshold_mask(w, 0.5).tolist() == [False, True, True, True, True, False]  # k=3, ties of 2 kept
    assert int(threshold_mask(w, 0.999).sum()) == 1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"start_step": 10, "end_step": 5}, "end_step=5 must come after start_step=10"),
        ({"start_step": 10, "end_step": 10}, "end_step=10 must come after start_step=10"),
        ({"sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity=0.6 exceeds"),
        ({"initial_sparsity": 1.0}, "initial_sparsity=1.0 is out of range"),
        ({"frequency": 0}, "frequency=0 is out of range"),
    ],
)
def test_bad_schedules_are_config_errors(options: dict, match: str) -> None:
    with pytest.raises(PassConfigError, match=match):
        PruneGradual(**options)


def test_training_callback_follows_the_schedule_and_keeps_zeros() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).train()
    pruner = PruneGradual(sparsity=0.8, start_step=2, end_step=10, frequency=2)
    gm = lowbit.prepare(model, (torch.randn(4, 16),), passes=[pruner])
    assert not (~gm.get_submodule("0").weight_mask.bool()).any()
    callback = pruner.callback(gm)
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    updates = []
    for step in range(14):
        loss = gm(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if callback(step):
            updates.append(step)
        for path in ("0", "2"):
            module = gm.get_submodule(path)
            expected = (
                round(cubic_sparsity(max(u for u in [2, *updates] if u <= step), pruner.config) * module.weight.numel())
                if updates
                else 0
            )
            zeros = int((~module.weight_mask.bool()).sum())
            assert zeros == expected  # random weights: no ties
            effective = module.weight * module.weight_mask.bool()
            assert (effective[~module.weight_mask.bool()] == 0).all()
    assert updates == [2, 4, 6, 8, 10]
    meta = get_meta(next(n for n in gm.graph.nodes if get_meta(n) is not None))
    assert meta.sparsity.sparsity == pytest.approx(0.8, abs=1e-3) and meta.sparsity.target == 0.8
    baked = Pipeline([ApplyMasks()])(gm)
    assert float((baked.get_submodule("0").weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)


def test_callback_needs_a_graph_the_pass_prepared() -> None:
    pruner = PruneGradual()
    gm = Pipeline([PruneMagnitude()])(lowbit.trace(nn.Sequential(nn.Linear(4, 4)), (torch.randn(1, 4),)))
    with pytest.raises(PassConfigError, match="no layers masked by prune_gradual"):
        pruner.callback(gm)
