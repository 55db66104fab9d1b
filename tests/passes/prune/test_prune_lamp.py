"""``prune_lamp``: the score definition, the global count and that no layer is emptied."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import PruneLAMP, PruneMagnitude, lamp_scores


def test_scores_follow_the_definition() -> None:
    w = torch.tensor([[0.5, -2.0, 1.0], [0.0, 3.0, -1.5]])
    squared = sorted(float(v) ** 2 for v in w.flatten())
    expected = {}
    for u, value in enumerate(squared):
        expected.setdefault(value, value / sum(squared[u:]) if sum(squared[u:]) else 0.0)
    scores = lamp_scores(w)
    for value, score in zip(w.flatten(), scores.flatten()):
        assert float(score) == pytest.approx(expected[float(value) ** 2])
    assert float(scores.max()) == 1.0 and float(scores[1, 0]) == 0.0


def test_score_order_is_magnitude_order() -> None:
    w = torch.randn(7, 9)
    scores = lamp_scores(w).flatten()
    order = torch.argsort(w.abs().flatten())
    assert (scores[order].diff() >= 0).all()


def build() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        net[4].weight.mul_(1e-3)
    return net, torch.randn(2, 16)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_global_count_is_exact_and_every_layer_keeps_a_weight(sparsity: float) -> None:
    net, x = build()
    gm = lowbit.trace(net, (x,))
    out = Pipeline([PruneLAMP(sparsity=sparsity)])(gm)
    masks = [out.get_submodule(p).weight_mask.bool() for p in ("0", "2", "4")]
    total = sum(m.numel() for m in masks)
    assert sum(int((~m).sum()) for m in masks) == round(sparsity * total)
    assert all(m.any() for m in masks)
    for path, mask in zip(("0", "2", "4"), masks):  # within a layer the largest magnitudes survive
        w = gm.get_submodule(path).weight.detach().abs()
        assert w[~mask].max() <= w[mask].min()
    magnitude = Pipeline([PruneMagnitude(sparsity=sparsity, scope="global")])(gm)
    if sparsity >= 0.9:  # where global magnitude empties the tiny last layer, LAMP does not
        assert not magnitude.get_submodule("4").weight_mask.bool().any()


def test_scores_use_the_masked_weights() -> None:
    net, x = build()
    gm = Pipeline([PruneMagnitude(sparsity=0.5)])(lowbit.trace(net, (x,)))
    before = gm.get_submodule("2").weight_mask.bool().clone()
    out = Pipeline([PruneLAMP(sparsity=0.7)])(gm)
    after = out.get_submodule("2").weight_mask.bool()
    assert not (after & ~before).any()
    assert sum(int((~out.get_submodule(p).weight_mask.bool()).sum()) for p in ("0", "2", "4")) == round(0.7 * 5312)
