"""``prune_random``: ERK densities (with the densify loop), exact random zero counts, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import PruneRandom, erk_sparsities


def test_erk_meets_the_budget_and_densifies_small_layers() -> None:
    # the numeric check of docs/methods.md (ERK random pruning): a 10x128 FC exceeds density 1 at 90% sparsity
    shapes = {"conv": (64, 3, 3, 3), "mid": (128, 64, 3, 3), "fc1": (128, 2048), "fc": (10, 128)}
    raw_fc = (10 + 128) / (10 * 128)
    sparsities = erk_sparsities(shapes, 0.9)
    numel = {k: math.prod(v) for k, v in shapes.items()}
    kept = sum((1 - sparsities[k]) * numel[k] for k in shapes)
    assert kept == pytest.approx(0.1 * sum(numel.values()))
    dense = [k for k, s in sparsities.items() if s == 0.0]
    assert "fc" in dense and all(0 <= s < 1 for s in sparsities.values())
    sparse = [k for k in shapes if k not in dense]
    density = {k: 1 - sparsities[k] for k in sparse}
    ratios = {k: density[k] / (sum(shapes[k]) / numel[k]) for k in sparse}  # one ε for all sparse layers
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))
    assert raw_fc * next(iter(ratios.values())) > 1


def test_er_uses_only_input_and_output_widths() -> None:
    shapes = {"a": (32, 16, 3, 3), "b": (64, 32, 1, 1)}
    s = erk_sparsities(shapes, 0.5, kernel=False)
    ratio = (1 - s["a"]) / (1 - s["b"])
    assert ratio == pytest.approx(((32 + 16) / (32 * 16)) / ((64 + 32) / (64 * 32)))


def net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
    ), torch.randn(1, 3, 6, 6)


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
def test_masks_have_exactly_floor_s_n_zeros(distribution: str) -> None:
    model, x = net()
    pipe = Pipeline([PruneRandom(sparsity=0.8, distribution=distribution, seed=5)])
    out = pipe(lowbit.trace(model, (x,)))
    for record in pipe.report.passes[0].layers:
        mask = out.get_submodule(record.layer).weight_mask.bool()
        assert int((~mask).sum()) == math.floor(record.stats["target"] * mask.numel())
    assert pipe.report.passes[0].stats["achieved"] == pytest.approx(0.8, abs=2e-3)


def test_seed_makes_masks_reproducible_and_positions_random() -> None:
    model, x = net()
    gm = lowbit.trace(model, (x,))
    a = Pipeline([PruneRandom(sparsity=0.5, seed=1)])(gm).get_submodule("3").weight_mask.bool()
    b = Pipeline([PruneRandom(sparsity=0.5, seed=1)])(gm).get_submodule("3").weight_mask.bool()
    c = Pipeline([PruneRandom(sparsity=0.5, seed=2)])(gm).get_submodule("3").weight_mask.bool()
    assert torch.equal(a, b) and not torch.equal(a, c)
    magnitude_order = gm.get_submodule("3").weight.detach().abs()
    assert float(magnitude_order[~a].mean()) == pytest.approx(float(magnitude_order[a].mean()), rel=0.2)


def test_override_is_excluded_from_the_solve() -> None:
    model, x = net()
    pipe = Pipeline([PruneRandom(sparsity=0.8, overrides={"5": {"sparsity": 0.25}})])
    out = pipe(lowbit.trace(model, (x,)))
    assert int((~out.get_submodule("5").weight_mask.bool()).sum()) == math.floor(0.25 * 640)
    pooled = [r for r in pipe.report.passes[0].layers if r.layer != "5"]
    kept = sum((1 - r.stats["target"]) * r.stats["params"] for r in pooled)
    assert kept == pytest.approx(0.2 * sum(r.stats["params"] for r in pooled))
