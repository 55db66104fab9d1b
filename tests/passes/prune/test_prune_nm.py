"""``prune_nm``: exact N:M pattern along the input dimension for Linear and Conv2d, and its bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.errors import PassConfigError
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import PruneNM, PruningError, is_nm, nm_mask


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 3), (1, 2)])
def test_linear_groups_keep_the_n_largest_of_m_consecutive_inputs(n: int, m: int) -> None:
    w = torch.randn(6, 24)
    mask = nm_mask(w, n, m)
    groups, wg = mask.reshape(6, -1, m), w.abs().reshape(6, -1, m)
    assert (groups.sum(-1) == n).all()
    kept_min = torch.where(groups, wg, torch.inf).amin(-1)
    pruned_max = torch.where(groups, -torch.inf, wg).amax(-1)
    assert (pruned_max <= kept_min).all()
    assert is_nm(mask, n, m)


def test_conv_groups_run_along_input_channels() -> None:
    w = torch.randn(5, 8, 3, 3)
    mask = nm_mask(w, 2, 4)
    per_position = mask.permute(0, 2, 3, 1).reshape(5, 3, 3, 2, 4).sum(-1)
    assert (per_position == 2).all()
    assert not (mask.reshape(5, -1, 4).sum(-1) == 2).all()  # not grouped along the flattened kernel


def test_pass_annotates_pattern_and_exact_half_sparsity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 16))
    pipe = Pipeline([PruneNM(n=2, m=4)])
    out = pipe(lowbit.trace(model, (torch.randn(1, 4, 6, 6),)))
    for record in pipe.report.passes[0].layers:
        assert record.stats["pattern"] == "2:4" and record.stats["achieved"] == 0.5 == record.stats["target"]
        assert is_nm(out.get_submodule(record.layer).weight_mask.bool(), 2, 4)
    assert (
        "2:4"
        in out.graph.find_nodes(op="call_function", target=torch.nn.functional.linear)[0].meta["lowbit"].describe()
    )


def test_n_greater_than_m_is_a_config_error() -> None:
    with pytest.raises(PassConfigError, match="prune_nm: n=5 > m=4"):
        PruneNM(n=5, m=4)


def test_m_not_dividing_the_input_width_names_the_layer() -> None:
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    gm = lowbit.trace(model, (torch.randn(1, 10),))
    with pytest.raises(PruningError, match="layer '0': m=4 does not divide its input width 10"):
        Pipeline([PruneNM()])(gm)
    out = Pipeline([PruneNM(overrides={"0": "skip"})])(gm)  # the remedy the message suggests
    assert is_nm(out.get_submodule("2").weight_mask.bool(), 2, 4)


def test_per_layer_pattern_override() -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    pipe = Pipeline([PruneNM(overrides={"2": {"n": 1, "m": 8}})])
    out = pipe(lowbit.trace(model, (torch.randn(1, 16),)))
    assert is_nm(out.get_submodule("2").weight_mask.bool(), 1, 8)
    assert {r.layer: r.stats["pattern"] for r in pipe.report.passes[0].layers} == {"0": "2:4", "2": "1:8"}
