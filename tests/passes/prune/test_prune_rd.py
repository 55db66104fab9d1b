"""``prune_rd``: the knapsack DP, curves on the current masks, beats uniform magnitude, needs calibration."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.calibration import calibration_set
from lowbit.errors import CalibrationError
from lowbit.passes.base import PassContext
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import PruneMagnitude, PruneRD
from lowbit.passes.prune.masks import Layer
from lowbit.passes.prune.rd import Curve, allocate

from helpers import seeded_mlp


class _Sized:
    def __init__(self, n: int) -> None:
        self.weight = torch.empty(n)


def curve(n: int, distortions: list[float]) -> Curve:
    grid = [j / (len(distortions) - 1) for j in range(len(distortions))]
    return Curve(Layer(f"l{n}", _Sized(n), [], None), grid, distortions)


def test_dp_matches_brute_force() -> None:
    torch.manual_seed(0)
    sizes = [10, 30, 7, 50]
    curves = [curve(n, sorted(torch.rand(5).tolist())) for n in sizes]
    for target in (0.3, 0.5, 0.8):
        chosen = allocate(curves, target, resolution=10_000)
        budget = sum(sizes) - round(target * sum(sizes))
        best = min(
            (sum(c.distortions[c.sparsities.index(p)] for c, p in zip(curves, combo)), combo)
            for combo in itertools.product(*(c.sparsities for c in curves))
            if sum(n - round(p * n) for n, p in zip(sizes, combo)) <= budget
        )
        got = sum(c.distortions[c.sparsities.index(p)] for c, p in zip(curves, chosen))
        assert got == pytest.approx(best[0])
        assert sum(n - round(p * n) for n, p in zip(sizes, chosen)) <= budget


def test_coarse_budget_units_still_meet_the_budget() -> None:
    curves = [curve(n, [1.0 / (1 + j) for j in range(11)][::-1]) for n in (1000, 3000, 5000)]
    chosen = allocate(curves, 0.6, resolution=16)
    assert sum(n - round(p * n) for n, p in zip((1000, 3000, 5000), chosen)) <= 9000 - round(0.6 * 9000)


def mlp() -> tuple[nn.Module, torch.Tensor]:
    net = seeded_mlp(16, 64, 64, 8)
    with torch.no_grad():
        net[2].weight.mul_(0.1)  # a layer whose pruning matters little
    return net.eval(), torch.randn(4, 16)


def test_without_calibration_is_a_named_error() -> None:
    net, x = mlp()
    with pytest.raises(CalibrationError, match="prune_rd"):
        Pipeline([PruneRD()])(lowbit.trace(net, (x,)))
    with pytest.raises(CalibrationError, match="prune_rd needs calibration data"):
        PruneRD().run(lowbit.trace(net, (x,)), PassContext())


def test_rd_beats_uniform_magnitude_at_the_same_global_sparsity_small_model() -> None:
    net, x = mlp()
    gm = lowbit.trace(net, (x,))
    calibration = calibration_set([torch.randn(16, 16) for _ in range(2)], (x,))
    pipe = Pipeline([PruneRD(sparsity=0.7, grid=20)])
    rd = pipe(gm, calibration=calibration)
    achieved = pipe.report.passes[0].stats["achieved"]
    assert 0.7 <= achieved < 0.71
    uniform = Pipeline([PruneMagnitude(sparsity=achieved)])(gm)
    held_out = torch.randn(256, 16)
    with torch.no_grad():
        reference = net(held_out)
        rd_error = (rd(held_out) - reference).pow(2).mean()
        uniform_error = (uniform(held_out) - reference).pow(2).mean()
    assert rd_error < 0.5 * uniform_error
    sparsities = {r.layer: r.stats["achieved"] for r in pipe.report.passes[0].layers}
    assert sparsities["2"] > 0.8 and sparsities["0"] < 0.7


def test_overridden_layers_stay_out_of_the_allocation() -> None:
    net, x = mlp()
    calibration = calibration_set([torch.randn(8, 16)], (x,))
    pipe = Pipeline([PruneRD(sparsity=0.6, grid=10, overrides={"4": {"sparsity": 0.25}})])
    out = pipe(lowbit.trace(net, (x,)), calibration=calibration)
    assert int((~out.get_submodule("4").weight_mask.bool()).sum()) == 128
    pooled = [r for r in pipe.report.passes[0].layers if r.layer != "4"]
    kept = sum(round((1 - r.stats["achieved"]) * r.stats["params"]) for r in pooled)
    assert kept <= round(0.4 * sum(r.stats["params"] for r in pooled))


def test_monotone_curves_start_at_the_current_masks() -> None:
    net, x = mlp()
    calibration = calibration_set([torch.randn(8, 16)], (x,))
    first = Pipeline([PruneMagnitude(sparsity=0.3)])(lowbit.trace(net, (x,)))
    rd = PruneRD(sparsity=0.5, grid=10)
    layers = [Layer(p, first.get_submodule(p), [], rd.config) for p in ("0", "2", "4")]
    curves = rd.curves(first, layers, PassContext(calibration=calibration))
    for c in curves:
        assert c.sparsities[0] == pytest.approx(0.3, abs=1e-2) and c.distortions[0] == 0.0
        assert min(c.sparsities) >= c.sparsities[0]
    second = Pipeline([rd])(first, calibration=calibration)
    for p in ("0", "2", "4"):
        assert not (second.get_submodule(p).weight_mask.bool() & ~first.get_submodule(p).weight_mask.bool()).any()


def minilm_case(grid: int) -> tuple[float, float, float]:
    from lowbit import zoo

    minilm = zoo.load_minilm()
    calib_text = [
        "the cat sat on the mat",
        "a quick brown fox jumps",
        "prices rose sharply in May",
        "he plays the violin well",
    ]
    test_text = [
        "the weather is cold today",
        "she reads a book at night",
        "markets fell after the news",
        "dogs love long walks",
    ]

    def batch(texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = minilm.tokenizer(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    example = batch(calib_text)
    gm = lowbit.trace(minilm.model, (), example_kwargs=example)
    calibration = calibration_set([example], (), example)
    pipe = Pipeline([PruneRD(sparsity=0.5, grid=grid, ignore=["pooler.dense"])])
    rd = pipe(gm, calibration=calibration)
    achieved = pipe.report.passes[0].stats["achieved"]
    uniform = Pipeline([PruneMagnitude(sparsity=achieved, ignore=["pooler.dense"])])(gm)
    held_out = batch(test_text)
    with torch.no_grad():
        reference = minilm.model(**held_out).last_hidden_state
        error = {
            name: float((g(**held_out).last_hidden_state - reference).pow(2).mean())
            for name, g in (("rd", rd), ("uniform", uniform))
        }
    return achieved, error["rd"], error["uniform"]


@pytest.mark.slow
def test_rd_beats_uniform_magnitude_on_minilm() -> None:
    achieved, rd_error, uniform_error = minilm_case(grid=5)
    assert 0.5 <= achieved < 0.51
    assert rd_error < uniform_error
