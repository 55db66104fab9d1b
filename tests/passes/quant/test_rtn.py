"""The GPTQ grid, the Linear → packed-op rewrite, and the ``rtn`` pass."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp

from lowbit.errors import LowbitError, PassConfigError
from lowbit.ir import ops
from lowbit.ir.annotations import QuantScheme, Sparsity, annotate, get_meta
from lowbit.passes import PassContext, lookup
from lowbit.passes.quant import RTN, PackedLinear, quantize_weight, replace_linear
from lowbit.passes.quant.grid import effective_group_size, round_scales
from lowbit.passes.quant.rewrite import linear_nodes

from helpers import LMHeadMLP

# ---------------------------------------------------------------- the grid


def reference_grid(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """GPTQ's grid (docs/methods.md, GPTQ: the uniform grid), one row and one group slice at a time."""
    maxq = 2**bits - 1
    rows, cols = w.shape
    width = cols if group_size == -1 else group_size
    out = torch.empty_like(w)
    for n in range(rows):
        for start in range(0, cols, width):
            group = w[n, start : start + width]
            xmin = torch.clamp(group.min(), max=0)
            xmax = torch.clamp(group.max(), min=0)
            if symmetric:
                xmax = torch.maximum(xmin.abs(), xmax)
                xmin = -xmax
            if xmin == 0 and xmax == 0:
                xmin, xmax = torch.tensor(-1.0), torch.tensor(1.0)
            scale = (xmax - xmin) / maxq
            zero = torch.tensor((maxq + 1) / 2) if symmetric else torch.round(-xmin / scale)
            q = torch.clamp(torch.round(group / scale) + zero, 0, maxq)
            out[n, start : start + width] = scale * (q - zero)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("cols", "group_size"), [(24, -1), (24, 8), (30, 8), (5, 2)])
def test_dequantized_grid_matches_gptq(bits: int, symmetric: bool, cols: int, group_size: int) -> None:
    w = torch.randn(4, cols, generator=torch.Generator().manual_seed(bits + cols))
    w[0, :] = w[0, :].abs()  # an all-positive row
    w[1, :3] = 0.0  # a zero group when group_size <= 3
    qw = quantize_weight(w, bits, group_size, symmetric)
    torch.testing.assert_close(qw.dequantize(), reference_grid(w, bits, group_size, symmetric), rtol=1e-6, atol=1e-7)


def test_quantized_weight_layout() -> None:
    w = torch.randn(6, 20)
    sym = quantize_weight(w, 4, 8, symmetric=True)
    asym = quantize_weight(w, 4, 8, symmetric=False)
    assert sym.codes.dtype == torch.uint8 and sym.codes.shape == (6, 20)
    assert sym.scales.shape == (6, 3) and sym.scales.dtype == torch.float32
    assert sym.zeros is None and sym.g_idx is None
    assert asym.zeros.shape == (6, 3) and torch.equal(asym.zeros, asym.zeros.round())
    assert sym.pack().shape == (6, 10)
    assert quantize_weight(w, 4, -1, True).group_size == 20
    assert quantize_weight(w, 4, 128, True).group_size == 20


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([2, 3, 4, 8]),
    st.booleans(),
    st.integers(1, 9),
    st.integers(1, 40),
    st.sampled_from([-1, 1, 3, 8, 16]),
    st.integers(0, 2**31 - 1),
)
def test_rounding_error_is_at_most_half_a_step(bits, symmetric, rows, cols, group_size, seed) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    qw = quantize_weight(w, bits, group_size, symmetric)
    step = qw.scales.repeat_interleave(qw.group_size, dim=1)[:, :cols]
    rounding_slack = 1e-6 * w.abs() + 1e-7  # float32 error of w/scale and scale*(q - zero)
    assert torch.all((qw.dequantize() - w).abs() <= step / 2 + rounding_slack)


@pytest.mark.parametrize(
    ("group_size", "in_features", "group"),
    [
        (128, 576, 96),
        (64, 576, 64),
        (256, 576, 192),
        (128, 1536, 128),
        (128, 100, 100),
        (64, 100, 64),
        (32, 48, 32),
        (64, 1000, 64),
    ],
)
def test_divisible_groups_take_the_largest_multiple_of_32_that_divides(group_size, in_features, group) -> None:
    """Below the requested width, a multiple of `GROUP_QUANTUM` that divides ``in_features``; none (100, 48 at 32,
    1000 at 64: 1000 = 8 · 125) keeps the groups as asked, a short last one included."""
    assert effective_group_size(group_size, in_features, divisible=True) == group
    assert effective_group_size(group_size, in_features) == min(group_size, in_features)


def test_float16_scales_are_float16_numbers_in_range() -> None:
    """`round_scales` rounds to the nearest float16 value, clamped into its positive normal range; the grid fits
    its codes to those scales, so the error stays within half a (rounded) step, but for the symmetric grid's top
    code, which a scale rounded down by at most 2⁻¹¹ of itself moves by at most 7.5 · 2⁻¹¹ steps."""
    scales = torch.tensor([1e-9, 3e-3, 0.1 + 1e-7, 1e6])
    rounded = round_scales(scales, torch.float16)
    info = torch.finfo(torch.float16)
    assert rounded.dtype == torch.float32 and torch.equal(rounded.half().float(), rounded)
    assert rounded[0] == info.tiny and rounded[-1] == info.max
    assert torch.equal(round_scales(scales), scales)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(w, 4, 32, True, scale_dtype=torch.float16)
    assert torch.equal(qw.scales.half().float(), qw.scales)
    step = qw.scales.repeat_interleave(32, dim=1)
    assert bool(((qw.dequantize() - w).abs() <= step * (0.5 + 7.5 * 2**-11) + 1e-6).all())


def test_all_zero_weight_stays_zero() -> None:
    qw = quantize_weight(torch.zeros(2, 8), 3, 4, symmetric=False)
    assert torch.equal(qw.dequantize(), torch.zeros(2, 8))
    torch.testing.assert_close(qw.scales, torch.full((2, 2), 2 / 7))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_layer(bad: float) -> None:
    w = torch.randn(3, 4)
    w[1, 2] = bad
    with pytest.raises(LowbitError, match="layer 'encoder.fc': weight contains NaN or Inf"):
        quantize_weight(w, 4, -1, True, name="encoder.fc")


@pytest.mark.parametrize(("bits", "group_size"), [(1, -1), (5, -1), (4, 0), (4, -3)])
def test_grid_rejects_bad_parameters(bits: int, group_size: int) -> None:
    with pytest.raises(LowbitError):
        quantize_weight(torch.randn(3, 4), bits, group_size, True)


# ---------------------------------------------------------------- the pass


class MLP(LMHeadMLP):
    def __init__(self, width: int = 256) -> None:
        super().__init__(96, width, width, 16)


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def traced(model: nn.Module, x: torch.Tensor | None = None) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    if x is not None:
        ShapeProp(gm).propagate(x)
    return gm


def run_rtn(gm: fx.GraphModule, **options) -> object:
    return RTN(**options).run(gm, PassContext())


def rel_output_error(gm: fx.GraphModule, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = model(x)
        return float((gm(x) - ref).norm() / ref.norm())


def test_registered_as_rtn() -> None:
    assert lookup("rtn") is RTN
    assert RTN.stage == "convert" and RTN.produces == frozenset({"quant"}) and RTN.after_pack


def test_output_error_shrinks_with_bits(mlp: MLP) -> None:
    x = torch.randn(32, 96)
    errors = {}
    for bits in (2, 3, 4, 8):
        gm = traced(mlp)
        run_rtn(gm, bits=bits, group_size=32)
        errors[bits] = rel_output_error(gm, mlp, x)
    assert errors[8] < 1e-2
    assert errors[4] < 0.15
    assert errors[2] > errors[3] > errors[4] > errors[8]


def test_graph_after_rtn(mlp: MLP) -> None:
    x = torch.randn(4, 96)
    gm = traced(mlp, x)
    result = run_rtn(gm, bits=4, group_size=64, symmetric=False, ignore=("lm_*",))
    assert result.changed and result.stats == {"quantized": 2, "skipped": 1}
    assert [path for _, path, _ in linear_nodes(gm)] == ["lm_head"]
    packed = [n for n in gm.graph.nodes if n.target is ops.linear_packed]
    assert [get_meta(n).layer for n in packed] == ["fc1", "fc2"]
    for node in packed:
        assert get_meta(node).quant == QuantScheme(bits=4, group_size=64, symmetric=False, method="rtn")
        assert tuple(node.meta["tensor_meta"].shape) == (4, 256)
    assert isinstance(gm.fc1, PackedLinear) and isinstance(gm.lm_head, nn.Linear)
    skipped = result.skipped[0]
    assert skipped.layer == "lm_head" and skipped.reason == "ignored (matches 'lm_*')"
    fc1 = result.layers[0]
    assert fc1.stats["bits"] == 4 and fc1.stats["group_size"] == 64 and 0 < fc1.stats["rel_error"] < 0.15


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_buffer_sizes(mlp: MLP, bits: int, symmetric: bool) -> None:
    gm = traced(mlp)
    run_rtn(gm, bits=bits, group_size=40, symmetric=symmetric)
    for path, (rows, cols) in {"fc1": (256, 96), "fc2": (256, 256), "lm_head": (16, 256)}.items():
        layer = gm.get_submodule(path)
        groups = -(-cols // 40)
        assert layer.qweight.dtype == torch.uint8
        assert layer.qweight.nbytes == rows * -(-cols * bits // 8)
        assert layer.scales.shape == (rows, groups)
        assert (layer.zeros is None) == symmetric
        if not symmetric:
            assert layer.zeros.shape == (rows, groups)
        assert layer.bias.shape == (rows,)
    names = set(gm.state_dict())
    assert "fc1.qweight" in names and "fc1.weight" not in names


def test_per_layer_overrides(mlp: MLP) -> None:
    gm = traced(mlp)
    result = RTN(bits=4, overrides={"fc2": {"bits": 8}, "fc1": "skip"}).run(gm, PassContext())
    records = {r.layer: r for r in result.layers}
    assert records["fc1"].action == "skipped" and "override" in records["fc1"].reason
    assert isinstance(gm.fc1, nn.Linear)
    assert records["fc2"].stats["bits"] == 8 and gm.fc2.bits == 8
    assert records["lm_head"].stats["bits"] == 4 and gm.lm_head.bits == 4


def test_pattern_override_and_per_channel(mlp: MLP) -> None:
    gm = traced(mlp)
    result = RTN(bits=4, overrides={"fc*": {"group_size": -1}}).run(gm, PassContext())
    assert [r.stats["group_size"] for r in result.layers] == [96, 256, 128]
    assert get_meta(next(n for n in gm.graph.nodes if n.name == "fc1_packed")).quant.group_size == 96


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bits": 5}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -3}, "group_size"),
        ({"bitz": 4}, "bitz"),
        ({"symmetric": "yes"}, "symmetric"),
    ],
)
def test_bad_config_names_the_key(options: dict, key: str) -> None:
    with pytest.raises(PassConfigError, match=f"rtn: .*{key}"):
        RTN(**options)


def test_ignore_accepts_sequential_indices_read_as_ints() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    rtn = RTN(bits=8, ignore=[2])
    assert rtn.config.ignore == ("2",)
    result = rtn.run(fx.symbolic_trace(model), PassContext())
    assert [r.action for r in result.layers] == ["quantized", "skipped"]
    assert RTN(ignore="lm_head").config.ignore == ("lm_head",)
    with pytest.raises(PassConfigError, match="rtn: ignore"):
        RTN(ignore=[1.5])


def test_bad_override_names_the_key() -> None:
    with pytest.raises(PassConfigError, match="bits=5"):
        RTN(overrides={"fc1": {"bits": 5}})


def test_existing_annotations_are_preserved(mlp: MLP) -> None:
    gm = traced(mlp)
    fc1 = next(n for n in gm.graph.nodes if n.target == "fc1")
    sparsity = Sparsity(0.5, "unstructured", "fc1_mask", "magnitude")
    annotate(fc1, layer="fc1", sparsity=sparsity)
    run_rtn(gm)
    meta = get_meta(next(n for n in gm.graph.nodes if n.name == "fc1_packed"))
    assert meta.sparsity == sparsity and meta.quant.method == "rtn"


class SharedAndTied(nn.Module):
    """``shared`` is called twice; ``tied``'s weight is also read outside its call."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tied(self.shared(self.shared(x))) + self.tied.weight.sum()


def test_shared_layer_rewritten_everywhere_and_unsupported_layer_skipped() -> None:
    torch.manual_seed(0)
    model = SharedAndTied()
    gm = traced(model)
    result = run_rtn(gm, bits=8, group_size=-1)
    records = {r.layer: r for r in result.layers}
    assert records["shared"].action == "quantized"
    assert records["tied"].action == "skipped" and "read outside the layer call" in records["tied"].reason
    assert len([n for n in gm.graph.nodes if n.target is ops.linear_packed]) == 2
    assert rel_output_error(gm, model, torch.randn(3, 8)) < 1e-2


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return isinstance(module, ScaledLinear) or super().is_leaf_module(module, qualname)


def test_linear_subclass_with_its_own_forward_is_skipped() -> None:
    model = nn.Sequential(ScaledLinear(8, 4), nn.Linear(4, 4))
    gm = fx.GraphModule(model, LeafTracer().trace(model))
    result = run_rtn(gm, bits=8)
    assert [r.action for r in result.layers] == ["skipped", "quantized"]
    assert (
        result.layers[0].reason == "ScaledLinear overrides nn.Linear.forward, so its computation is not a plain linear"
    )


def test_packed_linear_works_standalone_and_exports(mlp: MLP) -> None:
    x = torch.randn(5, 96)
    gm = traced(mlp)
    run_rtn(gm, bits=4, group_size=32)
    with torch.no_grad():
        hidden = torch.relu(gm.fc1(x))
        expected = torch.ops.lowbit.linear_packed(x, gm.fc1.qweight, gm.fc1.scales, None, None, gm.fc1.bias, 4, 32, 96)
    assert torch.equal(torch.relu(expected), hidden)
    exported = torch.export.export(gm, (x,))
    assert torch.equal(exported.module()(x), gm(x))


def test_replace_linear_rejects_wrong_nodes(mlp: MLP) -> None:
    gm = traced(mlp)
    relu = next(n for n in gm.graph.nodes if n.op == "call_function")
    qw = quantize_weight(mlp.fc1.weight, 4, -1, True)
    scheme = QuantScheme(4, 96, True, "rtn")
    with pytest.raises(LowbitError, match="not a call_module"):
        replace_linear(gm, relu, qw, scheme)
    fc2 = next(n for n in gm.graph.nodes if n.target == "fc2")
    with pytest.raises(LowbitError, match="quantized weight is 256x96"):
        replace_linear(gm, fc2, qw, scheme)


def test_nothing_to_quantize_is_unchanged() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    result = run_rtn(gm)
    assert not result.changed and result.layers == [] and result.stats == {"quantized": 0, "skipped": 0}
