"""The ``ternary`` pass: BitNet b1.58 absmean / Reloaded absmedian weights, 2-bit packed."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.errors import LowbitError, PassConfigError
from lowbit.ir import ops, packing
from lowbit.ir.annotations import get_meta
from lowbit.passes import Pipeline, lookup
from lowbit.passes.quant import Ternary, ternary_quantize

from helpers import LMHeadMLP


def bitnet_reference(w: torch.Tensor, measure: str, block: int | None) -> torch.Tensor:
    """γ = max(measure|W|, 1e-5) per tensor (block None) or per row slice of ``block`` columns."""
    out = torch.empty_like(w)
    stat = (lambda a: a.mean()) if measure == "absmean" else (lambda a: a.median())
    if block is None:
        gamma = torch.clamp(stat(w.abs()), min=1e-5)
        return gamma * torch.clamp(torch.round(w / gamma), -1, 1)
    for n in range(w.shape[0]):
        for start in range(0, w.shape[1], block):
            part = w[n, start : start + block]
            gamma = torch.clamp(stat(part.abs()), min=1e-5)
            out[n, start : start + block] = gamma * torch.clamp(torch.round(part / gamma), -1, 1)
    return out


@pytest.mark.parametrize("measure", ["absmean", "absmedian"])
@pytest.mark.parametrize(
    ("granularity", "group_size", "block"),
    [
        ("per_tensor", None, None),
        ("per_channel", None, 30),
        ("per_group", 8, 8),
        ("per_group", 7, 7),
        ("per_group", 64, 30),
    ],
)
def test_dequantize_is_bitnet_math_exactly(measure, granularity, group_size, block) -> None:
    w = torch.randn(6, 30, generator=torch.Generator().manual_seed(1)) * 0.05
    qw = ternary_quantize(w, measure, granularity, group_size)
    assert torch.equal(qw.dequantize(), bitnet_reference(w, measure, block))


def test_codes_layout_and_default_zero() -> None:
    w = torch.randn(5, 18)
    qw = ternary_quantize(w)
    assert qw.bits == 2 and qw.zeros is None and qw.g_idx is None and qw.group_size == 18
    assert set(qw.codes.unique().tolist()) <= {1, 2, 3} and qw.codes.dtype == torch.uint8
    assert qw.pack().shape == (5, 5)  # 2 bits per weight: ceil(18 / 4) bytes per row
    assert packing.default_zero(2) == 2
    assert qw.scales.shape == (5, 1) and torch.all(qw.scales == qw.scales[0, 0])
    gamma = w.abs().mean()
    torch.testing.assert_close(qw.scales[0, 0], gamma)
    ternary = qw.codes.float() - 2
    assert torch.equal(ternary, torch.clamp(torch.round(w / qw.scales[0, 0]), -1, 1))


def test_gamma_is_clamped() -> None:
    tiny = torch.full((3, 8), 1e-8)
    qw = ternary_quantize(tiny)
    assert torch.all(qw.scales == torch.tensor(1e-5)) and torch.all(qw.codes == 2)
    # The median of a mostly-zero weight is 0: the clamp keeps the scale usable.
    sparse = torch.zeros(4, 16)
    sparse[0, 0] = 1.0
    median = ternary_quantize(sparse, "absmedian")
    assert torch.all(median.scales == torch.tensor(1e-5))
    assert torch.equal(median.dequantize(), bitnet_reference(sparse, "absmedian", None))
    assert torch.equal(ternary_quantize(torch.zeros(2, 4)).dequantize(), torch.zeros(2, 4))


def test_error_bound_per_weight() -> None:
    """Inside ±1.5γ the rounding error is at most γ/2; beyond, the clamp costs |w| − γ."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    for granularity, group_size in (("per_tensor", None), ("per_group", 16)):
        qw = ternary_quantize(w, granularity=granularity, group_size=group_size)
        gamma = qw.scales.repeat_interleave(qw.group_size, dim=1)[:, :64]
        error = (qw.dequantize() - w).abs()
        assert torch.all(error <= torch.maximum(gamma / 2, w.abs() - gamma) + 1e-6)


def test_bad_inputs_name_the_layer() -> None:
    w = torch.randn(3, 4)
    w[0, 1] = float("nan")
    with pytest.raises(LowbitError, match="layer 'blocks.0.fc': weight contains NaN or Inf"):
        ternary_quantize(w, name="blocks.0.fc")
    with pytest.raises(LowbitError, match="scale must be one of absmean, absmedian"):
        ternary_quantize(torch.randn(2, 2), scale="absmax")
    with pytest.raises(LowbitError, match="2-D"):
        ternary_quantize(torch.randn(4))


# ---------------------------------------------------------------- the pass


class MLP(LMHeadMLP):
    def __init__(self) -> None:
        super().__init__(32, 48, 40, 8)


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def test_registered_and_declared() -> None:
    assert lookup("ternary") is Ternary
    assert Ternary.stage == "convert" and Ternary.produces == frozenset({"quant"}) and Ternary.after_pack
    assert Ternary().config.as_dict() == {
        "granularity": "per_tensor",
        "group_size": None,
        "ignore": (),
        "scale": "absmean",
    }


def test_pass_packs_every_linear_and_computes_with_the_ternary_weight(mlp: MLP) -> None:
    x = torch.randn(5, 32)
    gm = Pipeline([Ternary(ignore=["lm_head"], overrides={"fc2": {"scale": "absmedian"}})])(fx.symbolic_trace(mlp))
    packed = [n for n in gm.graph.nodes if n.target is ops.linear_packed]
    assert [get_meta(n).layer for n in packed] == ["fc1", "fc2"]
    scheme = get_meta(packed[0]).quant
    assert (scheme.bits, scheme.group_size, scheme.symmetric, scheme.method) == (2, 32, True, "ternary")
    assert scheme.describe() == "w1.58 g32 sym [ternary]"
    weights = lowbit.dequantized_weights(gm)
    assert torch.equal(weights["fc1"], bitnet_reference(mlp.fc1.weight.detach(), "absmean", None))
    assert torch.equal(weights["fc2"], bitnet_reference(mlp.fc2.weight.detach(), "absmedian", None))
    assert torch.equal(weights["lm_head"], mlp.lm_head.weight.detach())
    h = torch.relu(F.linear(x, weights["fc1"], mlp.fc1.bias))
    h = torch.relu(F.linear(h, weights["fc2"], mlp.fc2.bias))
    with torch.no_grad():
        assert torch.equal(gm(x), mlp.lm_head(h))
    assert gm.get_submodule("fc1").qweight.shape == (48, 8)


def test_per_group_through_compile(mlp: MLP) -> None:
    x = torch.randn(4, 32)
    compiled = lowbit.compile(mlp, (x,), passes=[Ternary(granularity="per_group", group_size=16)], target="torch")
    (record, *_) = compiled.report.pipeline.passes[0].layers
    assert record.stats["group_size"] == 16 and record.stats["granularity"] == "per_group"
    assert 0 < compiled.report.rel_error < 0.8


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"granularity": "per_group"}, "granularity='per_group' needs group_size"),
        ({"group_size": 64}, "group_size=64 only applies to granularity='per_group'"),
        ({"scale": "absmax"}, "scale='absmax' is not supported"),
        ({"granularity": "per_group", "group_size": 0}, "group_size=0 is out of range"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(PassConfigError, match=message):
        Ternary(**options)


def test_nan_weight_fails_naming_the_layer(mlp: MLP) -> None:
    with torch.no_grad():
        mlp.fc2.weight[3, 3] = float("inf")
    with pytest.raises(LowbitError, match="layer 'fc2': weight contains NaN or Inf"):
        Pipeline([Ternary()])(fx.symbolic_trace(mlp))


def test_layer_it_cannot_handle_is_skipped_with_a_reason() -> None:
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(8, 8), Scaled(8, 4)).eval()
    gm = lowbit.trace(model, (torch.randn(2, 8),), leaf_modules=(Scaled,))
    pipeline = Pipeline([Ternary()])
    out = pipeline(gm)
    (skipped,) = pipeline.report.passes[0].skipped
    assert skipped.layer == "1" and "overrides nn.Linear.forward" in skipped.reason
    assert [get_meta(n).layer for n in out.graph.nodes if n.target is ops.linear_packed] == ["0"]
