"""``prune_magnitude``: exact per-layer and global counts, smallest magnitudes go, earlier masks are kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import PruneMagnitude


def model() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    with torch.no_grad():
        net[3].weight.mul_(0.05)  # a layer of small weights
    return net


def trace() -> torch.fx.GraphModule:
    return lowbit.trace(model(), (torch.randn(2, 3, 6, 6),))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_per_layer_exact_count_of_smallest_weights(sparsity: float) -> None:
    gm = trace()
    pipe = Pipeline([PruneMagnitude(sparsity=sparsity)])
    out = pipe(gm)
    for path in ("0", "3"):
        weight = gm.get_submodule(path).weight.detach()
        mask = out.get_submodule(path).weight_mask.bool()
        assert int((~mask).sum()) == round(sparsity * weight.numel())
        if sparsity > 0:
            assert weight.abs()[~mask].max() <= weight.abs()[mask].min()
    records = {r.layer: r.stats for r in pipe.report.passes[0].layers}
    assert records["0"]["target"] == sparsity and records["0"]["achieved"] == pytest.approx(sparsity, abs=1 / 216)
    assert records["0"]["pattern"] == "unstructured"


def test_global_threshold_pools_layers() -> None:
    gm = trace()
    pipe = Pipeline([PruneMagnitude(sparsity=0.6, scope="global")])
    out = pipe(gm)
    masks = [out.get_submodule(p).weight_mask.bool() for p in ("0", "3")]
    weights = [gm.get_submodule(p).weight.detach().abs() for p in ("0", "3")]
    total = sum(m.numel() for m in masks)
    assert sum(int((~m).sum()) for m in masks) == round(0.6 * total)
    kept_min = min(w[m].min() for w, m in zip(weights, masks))
    pruned_max = max(w[~m].max() for w, m in zip(weights, masks))
    assert pruned_max <= kept_min
    # the small-weight layer loses far more than the other
    assert (~masks[1]).float().mean() > 0.6 > (~masks[0]).float().mean()
    assert pipe.report.passes[0].stats["achieved"] == pytest.approx(0.6, abs=1e-3)


def test_global_scope_keeps_per_layer_overrides_out_of_the_pool() -> None:
    out = Pipeline([PruneMagnitude(sparsity=0.6, scope="global", overrides={"3": {"sparsity": 0.1}})])(trace())
    assert int((~out.get_submodule("3").weight_mask.bool()).sum()) == round(0.1 * 1280)
    assert int((~out.get_submodule("0").weight_mask.bool()).sum()) == round(0.6 * 216)


def test_pruning_again_keeps_earlier_zeros() -> None:
    first = Pipeline([PruneMagnitude(sparsity=0.5)])(trace())
    second = Pipeline([PruneMagnitude(sparsity=0.8)])(first)
    m1, m2 = first.get_submodule("0").weight_mask.bool(), second.get_submodule("0").weight_mask.bool()
    assert not (m2 & ~m1).any() and int((~m2).sum()) == round(0.8 * 216)
    assert len([n for n in second.graph.nodes if n.op == "get_attr" and n.target == "0.weight_mask"]) == 1
