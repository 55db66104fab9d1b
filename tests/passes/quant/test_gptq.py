"""The ``gptq`` pass: the algorithm against an unblocked reference, the packed result,
GPTQ versus RTN error, layer-input capture, and errors on bad input."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.calibration import calibration_set
from lowbit.errors import CalibrationError, LowbitError, PassConfigError
from lowbit.ir import ops, packing
from lowbit.ir.annotations import QuantScheme, get_meta
from lowbit.passes.quant import GPTQ, RTN, GPTQOptions, PackedLinear, gptq_quantize, linear_nodes, replace_linear
from lowbit.passes.quant.gptq_algorithm import relative_output_error
from lowbit.passes.quant.grid import clipped_group_params, group_params
from lowbit.passes.quant.hessian import capture_hessian

from helpers import TwoLayerMLP

# ---------------------------------------------------------------- reference


def reference_grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero of one group (docs/methods.md, GPTQ: the uniform grid)."""
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1.0, 1.0
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-xmin / scale)
    return scale, zero


def reference_gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool,
    static_groups: bool,
    damp: float = 0.01,
    fit=reference_grid,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GPTQ one column at a time, no blocks (docs/methods.md, GPTQ: the column loop): codes, Q and loss.
    ``fit(w, bits, symmetric)`` gives a group's per-row scale and zero."""
    w, h = w.clone(), h.clone()
    cols = w.shape[1]
    g = cols if group_size == -1 else group_size
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1.0
            w[:, j] = 0.0
    static = [fit(w[:, s : s + g], bits, symmetric) for s in range(0, cols, g)]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes, q = torch.zeros_like(w), torch.zeros_like(w)
    loss = 0.0
    for j in range(cols):
        if static_groups:
            scale, zero = static[int(perm[j]) // g]
        elif j % g == 0:
            scale, zero = fit(w[:, j : j + g], bits, symmetric)
        codes[:, j] = torch.clamp(torch.round(w[:, j] / scale) + zero, 0, 2**bits - 1)
        q[:, j] = scale * (codes[:, j] - zero)
        err = (w[:, j] - q[:, j]) / u[j, j]
        loss += float((err**2).sum()) / 2
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
    inverse = torch.argsort(perm)
    return codes[:, inverse], q[:, inverse], loss


def correlated_inputs(rows: int, width: int, rank: int = 6, seed: int = 0) -> torch.Tensor:
    """Low-rank inputs plus noise: the structure GPTQ exploits and RTN ignores."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=gen) @ torch.randn(rank, width, generator=gen) + 0.1 * torch.randn(
        rows, width, generator=gen
    )


def weight_and_hessian(rows: int = 6, cols: int = 48, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(cols)
    w = torch.randn(rows, cols, generator=gen)
    w[0] = w[0].abs()  # a row without negative weights
    x = correlated_inputs(96, cols).to(dtype)
    x[:, 5] = 0.0  # a dead input
    return w.to(dtype), 2 / x.shape[0] * x.T @ x


# ---------------------------------------------------------------- the algorithm


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [-1, 16, 20])
@pytest.mark.parametrize(("act_order", "static_groups"), [(False, False), (True, False), (False, True), (True, True)])
def test_blocked_equals_unblocked_reference(bits, symmetric, group_size, act_order, static_groups) -> None:
    w, h = weight_and_hessian()
    result = gptq_quantize(
        w,
        h,
        GPTQOptions(
            bits, group_size, symmetric, act_order=act_order, static_groups=static_groups, block_size=7, sub_block=3
        ),
    )
    codes, q, loss = reference_gptq(w, h, bits, group_size, symmetric, act_order, static_groups)
    assert torch.equal(packing.unpack(result.quantized.pack(), bits, w.shape[1]), codes.to(torch.uint8))
    torch.testing.assert_close(result.weight, q, rtol=1e-12, atol=1e-12)
    assert result.loss == pytest.approx(loss, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 30),
    st.integers(1, 40),
    st.sampled_from([2, 3, 4, 8]),
    st.sampled_from([-1, 1, 2, 3, 8, 64]),
    st.booleans(),
    st.booleans(),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(0, 2**31 - 1),
)
def test_blocked_equals_reference_for_any_shape(
    rows, cols, samples, bits, group_size, act_order, static_groups, block_size, sub_block, seed
) -> None:
    """Ragged groups and blocks, rank-deficient and dead inputs. Asymmetric grids only: a
    symmetric grid puts each group's most negative weight on a rounding tie, which the
    last bit of a sum can flip."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    x = torch.randn(samples, cols, generator=gen, dtype=torch.float64)
    x[:, torch.rand(cols, generator=gen) < 0.2] = 0.0
    h = 2 / samples * x.T @ x
    result = gptq_quantize(
        w,
        h,
        GPTQOptions(
            bits,
            group_size,
            False,
            act_order=act_order,
            static_groups=static_groups,
            block_size=block_size,
            sub_block=sub_block,
        ),
    )
    codes, q, _ = reference_gptq(w, h, bits, group_size if group_size < cols else -1, False, act_order, static_groups)
    assert torch.equal(result.quantized.codes, codes.to(torch.uint8))
    torch.testing.assert_close(result.weight, q, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("group_size", "act_order", "static_groups"),
    [(-1, False, False), (16, False, False), (20, True, False), (16, True, True)],
)
@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_weight_dequantizes_to_the_algorithms_q(group_size, act_order, static_groups, symmetric) -> None:
    w, h = weight_and_hessian(dtype=torch.float32)
    result = gptq_quantize(
        w, h, GPTQOptions(3, group_size, symmetric, act_order=act_order, static_groups=static_groups, block_size=8)
    )
    qw = result.quantized
    assert (qw.g_idx is not None) == (act_order and not static_groups and group_size != -1)
    if qw.g_idx is not None:  # groups are contiguous in act-order, stored per original column
        in_act_order = qw.g_idx[torch.argsort(torch.diag(h), descending=True, stable=True)]
        assert torch.equal(in_act_order, torch.arange(w.shape[1], dtype=torch.int32) // group_size)
    dequantized = packing.dequantize(qw.pack(), qw.scales, qw.zeros, qw.g_idx, qw.bits, qw.group_size, w.shape[1])
    assert torch.equal(dequantized, result.weight)


def reference_mse_grid(
    w: torch.Tensor, bits: int, symmetric: bool, norm: float = 2.4, steps: int = 20, max_shrink: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQModel's ``mse`` search (quantizer.find_params): shrink the range by p = 1 - i/steps,
    keep per row the scale and zero with the smallest sum |q - w|^norm (ties keep the earlier)."""
    maxq = 2**bits - 1
    scale, zero = reference_grid(w, bits, symmetric)
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    best = torch.full_like(scale, float("inf"))
    for i in range(int(max_shrink * steps)):
        p = 1 - i / steps
        lo, hi = p * xmin, p * xmax
        empty = (lo == 0) & (hi == 0)
        lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
        s1 = (hi - lo) / maxq
        z1 = torch.full_like(s1, (maxq + 1) / 2) if symmetric else torch.round(-lo / s1)
        q = s1[:, None] * (torch.clamp(torch.round(w / s1[:, None]) + z1[:, None], 0, maxq) - z1[:, None])
        err = (q - w).abs().pow(norm).sum(dim=1)
        better = err < best
        best, scale = torch.where(better, err, best), torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_grid_matches_gptqmodels_search_and_never_loses_to_min_max(bits, symmetric) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 32, generator=gen, dtype=torch.float64) ** 3  # heavy tails: clipping pays
    w[0] = 0.0
    scale, zero = clipped_group_params(w, bits, symmetric, 2.4, steps=20, max_shrink=0.8)
    expected_scale, expected_zero = reference_mse_grid(w, bits, symmetric)
    torch.testing.assert_close(scale, expected_scale, rtol=1e-12, atol=0)
    if symmetric:
        assert zero is None
    else:
        assert torch.equal(zero, expected_zero)

    def error(grid):
        s, z = grid
        z = (2**bits) / 2 if z is None else z[:, None]
        q = (torch.clamp(torch.round(w / s[:, None]) + z, 0, 2**bits - 1) - z) * s[:, None]
        return (q - w).abs().pow(2.4).sum(1)

    assert (error((scale, zero)) <= error(group_params(w, bits, symmetric))).all()
    assert (error((scale, zero)) < error(group_params(w, bits, symmetric))).any()


@pytest.mark.parametrize(("act_order", "static_groups"), [(False, False), (True, False), (True, True)])
def test_mse_option_equals_the_unblocked_reference_with_mse_grids(act_order, static_groups) -> None:
    w, h = weight_and_hessian(rows=8, cols=48)
    w = w**3
    result = gptq_quantize(
        w,
        h,
        GPTQOptions(
            3, 16, act_order=act_order, static_groups=static_groups, block_size=7, sub_block=2, mse=2.4, mse_steps=20
        ),
    )
    codes, q, loss = reference_gptq(w, h, 3, 16, False, act_order, static_groups, fit=reference_mse_grid)
    assert torch.equal(result.quantized.codes, codes.to(torch.uint8))
    torch.testing.assert_close(result.weight, q, rtol=1e-12, atol=1e-12)
    assert result.loss == pytest.approx(loss, rel=1e-9)


@pytest.mark.parametrize(
    ("group_size", "act_order", "static_groups"), [(-1, False, False), (16, True, False), (16, True, True)]
)
def test_stacked_weights_split_into_their_separate_results(group_size, act_order, static_groups) -> None:
    """Layers sharing an input (q/k/v) are quantized as one stacked weight: same result as one by one."""
    w, h = weight_and_hessian(rows=9, cols=48)
    parts = [w[:2], w[2:7], w[7:]]
    options = {"act_order": act_order, "static_groups": static_groups, "block_size": 8}
    stacked = gptq_quantize(w, h, GPTQOptions(3, group_size, **options)).split([2, 5, 2])
    for part, result in zip(parts, stacked):
        alone = gptq_quantize(part, h, GPTQOptions(3, group_size, **options))
        for name in ("codes", "scales", "zeros", "g_idx"):
            a, b = getattr(result.quantized, name), getattr(alone.quantized, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        torch.testing.assert_close(result.weight, alone.weight, rtol=1e-12, atol=1e-12)
        assert result.loss == pytest.approx(alone.loss, rel=1e-9)


@pytest.mark.parametrize(("cols", "group_size"), [(48, 16), (44, 16)])
def test_group_aware_order_equals_gptq_on_pre_permuted_columns(cols, group_size) -> None:
    """GAR quantizes whole natural groups in a Hessian-driven order: the same as plain GPTQ on
    columns laid out in that order beforehand, mapped back, with no g_idx."""
    w, h = weight_and_hessian(rows=7, cols=cols)
    diag = torch.diag(h)
    full = cols // group_size * group_size
    groups = [torch.arange(s, s + group_size) for s in range(0, full, group_size)]
    groups.sort(key=lambda g: -float(diag[g].max()))
    perm = torch.cat(
        [g[torch.argsort(diag[g], descending=True, stable=True)] for g in groups]
        + [full + torch.argsort(diag[full:], descending=True, stable=True)]
    )
    result = gptq_quantize(w, h, GPTQOptions(3, group_size, act_group_aware=True, block_size=8))
    plain = gptq_quantize(w[:, perm], h[perm][:, perm], GPTQOptions(3, group_size, block_size=8))
    inverse = torch.argsort(perm)
    assert result.quantized.g_idx is None
    assert torch.equal(result.quantized.codes, plain.quantized.codes[:, inverse])
    torch.testing.assert_close(result.weight, plain.weight[:, inverse], rtol=1e-12, atol=1e-12)
    order = [int(perm[s]) // group_size for s in range(0, full, group_size)]
    torch.testing.assert_close(result.quantized.scales[:, order], plain.quantized.scales[:, : len(order)])
    qw = result.quantized
    torch.testing.assert_close(
        packing.dequantize(qw.pack(), qw.scales, qw.zeros, None, 3, group_size, cols), result.weight.float()
    )


def test_block_and_sub_block_sizes_do_not_change_the_result() -> None:
    w, h = weight_and_hessian()
    sizes = [(1, 1), (5, 2), (16, 16), (16, 5), (128, 16), (128, 128)]
    results = [
        gptq_quantize(w, h, GPTQOptions(3, 16, act_order=True, block_size=b, sub_block=s)).weight for b, s in sizes
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("block_size", "sub_block"), [(0, 16), (128, 0)])
def test_empty_blocks_are_an_error(block_size, sub_block) -> None:
    w, h = weight_and_hessian()
    with pytest.raises(LowbitError, match="block_size and sub_block"):
        gptq_quantize(w, h, GPTQOptions(3, 16, block_size=block_size, sub_block=sub_block))


def test_too_few_samples_are_dampened() -> None:
    w, _ = weight_and_hessian(cols=32, dtype=torch.float32)
    x = correlated_inputs(3, 32)
    result = gptq_quantize(w, 2 / 3 * x.T @ x, GPTQOptions(4))
    assert result.damp == 0.01 and torch.isfinite(result.weight).all()


def test_failed_cholesky_increases_damping(caplog) -> None:
    not_psd = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4 and -2
    with caplog.at_level(logging.WARNING, logger="lowbit.passes.quant.gptq_algorithm"):
        result = gptq_quantize(torch.randn(3, 2), not_psd, GPTQOptions(4), name="fc")
    assert result.damp == pytest.approx(10.0)
    assert "layer 'fc'" in caplog.text and "retrying" in caplog.text


def test_nan_weight_is_an_error_naming_the_layer() -> None:
    w, h = weight_and_hessian()
    w[1, 2] = float("nan")
    with pytest.raises(LowbitError, match="layer 'fc'.*NaN"):
        gptq_quantize(w, h, GPTQOptions(4), name="fc")


# ---------------------------------------------------------------- the pass


class MLP(TwoLayerMLP):
    def __init__(self, width: int = 64, hidden: int = 128) -> None:
        super().__init__(width, hidden, width)


def traced_mlp(seed: int = 0) -> fx.GraphModule:
    torch.manual_seed(seed)
    return fx.symbolic_trace(MLP())


def calibration(x: torch.Tensor, batch: int = 128):
    return calibration_set([(chunk,) for chunk in x.split(batch)], (x[:1],))


def output_error(gm: fx.GraphModule, reference: fx.GraphModule, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = reference(x)
        return float(torch.linalg.vector_norm(gm(x) - expected) / torch.linalg.vector_norm(expected))


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_gptq_beats_rtn_on_the_calibration_distribution(bits: int) -> None:
    gm, x = traced_mlp(), correlated_inputs(512, 64)
    gptq = lowbit.Pipeline([GPTQ(bits=bits, group_size=32)])
    quantized = gptq(gm, calibration=calibration(x))
    rtn = lowbit.Pipeline([RTN(bits=bits, group_size=32, symmetric=False)])(gm)
    gptq_error, rtn_error = output_error(quantized, gm, x), output_error(rtn, gm, x)
    assert gptq_error < 0.8 * rtn_error
    for record in gptq.report.passes[0].layers:
        assert record.action == "quantized"
        assert record.stats["output_error"] < record.stats["rtn_output_error"]
        assert record.stats["samples"] == 512


def test_divisible_groups_and_float16_scales() -> None:
    """``divisible_groups``: 96 inputs in groups of 64 get groups of 32 (the largest multiple of 32 below 64 that
    divides 96), 128 inputs keep 64; ``scale_dtype: float16``: every scale is a float16 number, and the codes are
    fitted to those scales (the packed weight decodes to the algorithm's Q)."""
    torch.manual_seed(0)
    gm, x = fx.symbolic_trace(TwoLayerMLP(96, 128, 96)), correlated_inputs(256, 96)
    options = {"bits": 4, "group_size": 64, "symmetric": True}
    plain = lowbit.Pipeline([GPTQ(**options)])(gm, calibration=calibration(x))
    pipeline = lowbit.Pipeline([GPTQ(**options, divisible_groups=True, scale_dtype="float16")])
    fitted = pipeline(gm, calibration=calibration(x))
    assert [plain.get_submodule(path).scales.shape[1] for path in ("fc1", "fc2")] == [2, 2]
    fc1, fc2 = fitted.get_submodule("fc1"), fitted.get_submodule("fc2")
    assert (fc1.group_size, fc1.scales.shape[1], fc2.group_size, fc2.scales.shape[1]) == (32, 3, 64, 2)
    assert [record.stats["group_size"] for record in pipeline.report.passes[0].layers] == [32, 64]
    for packed in (fc1, fc2):
        assert packed.scales.dtype == torch.float32
        assert torch.equal(packed.scales.half().float(), packed.scales)
    assert not torch.equal(plain.get_submodule("fc1").scales.half().float(), plain.get_submodule("fc1").scales)
    w, h = weight_and_hessian(dtype=torch.float32)
    result = gptq_quantize(w, h, GPTQOptions(4, 16, True, mse=2.4, mse_steps=20, scale_dtype=torch.float16))
    qw = result.quantized
    assert torch.equal(qw.scales.half().float(), qw.scales)
    dequantized = packing.dequantize(qw.pack(), qw.scales, qw.zeros, qw.g_idx, qw.bits, qw.group_size, w.shape[1])
    assert torch.equal(dequantized, result.weight)
    assert output_error(fitted, gm, x) < 1.2 * output_error(plain, gm, x)


def test_pass_rewrites_layers_with_annotations_and_g_idx() -> None:
    gm, x = traced_mlp(), correlated_inputs(256, 64)
    pipeline = lowbit.Pipeline(
        [GPTQ(bits=4, group_size=16, act_order=True, act_group_aware=False, mse=0.0, ignore=("fc2",))]
    )
    out = pipeline(gm, calibration=calibration(x))
    (node,) = [n for n in out.graph.nodes if n.target is ops.linear_packed]
    meta = get_meta(node)
    assert meta.layer == "fc1" and meta.quant.describe() == "w4 g16 asym [gptq]"
    packed = out.get_submodule("fc1")
    assert isinstance(packed, PackedLinear) and packed.g_idx is not None and packed.zeros is not None
    fc1, fc2 = pipeline.report.passes[0].layers
    assert fc1.action == "quantized" and fc1.stats["act_order"]
    assert fc2.action == "skipped" and "ignored" in fc2.reason
    assert isinstance(out.get_submodule("fc2"), nn.Linear)


class CustomLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return isinstance(module, CustomLinear) or super().is_leaf_module(module, qualname)


def test_unsupported_layer_is_skipped_with_a_reason() -> None:
    model = nn.Sequential(nn.Linear(16, 16), CustomLinear(16, 8))
    gm = fx.GraphModule(model, LeafTracer().trace(model))
    pipeline = lowbit.Pipeline([GPTQ(bits=4, group_size=-1)])
    pipeline(gm, calibration=calibration(correlated_inputs(64, 16)))
    first, second = pipeline.report.passes[0].layers
    assert first.action == "quantized"
    assert second.action == "skipped" and "overrides nn.Linear.forward" in second.reason


def test_layers_after_the_first_see_quantized_outputs() -> None:
    gm, x = traced_mlp(), correlated_inputs(256, 64)
    pipeline = lowbit.Pipeline([GPTQ(bits=2, group_size=-1)])
    out = pipeline(gm, calibration=calibration(x))
    with torch.no_grad():
        float_input = torch.relu(gm.get_submodule("fc1")(x))
        quantized_input = torch.relu(out.get_submodule("fc1")(x))
    fc2, packed = gm.get_submodule("fc2").weight.detach(), out.get_submodule("fc2")
    q = packing.dequantize(
        packed.qweight, packed.scales, packed.zeros, packed.g_idx, packed.bits, packed.group_size, packed.in_features
    )
    recorded = pipeline.report.passes[0].layers[1].stats["output_error"]
    on_quantized = relative_output_error(fc2, q, quantized_input.T @ quantized_input)
    on_float = relative_output_error(fc2, q, float_input.T @ float_input)
    assert recorded == pytest.approx(on_quantized, rel=1e-4) and recorded != pytest.approx(on_float, rel=1e-4)


# ---------------------------------------------------------------- capture


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.relu(self.shared(x))))


def test_capture_accumulates_every_call_and_stops_early() -> None:
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Chain())
    batches = [((torch.randn(n, 3, 8),), {}) for n in (5, 2, 7)]
    head_calls, modes = [], []
    gm.get_submodule("head").eval().register_forward_hook(lambda *_: head_calls.append(1))
    gm.get_submodule("shared").register_forward_pre_hook(lambda module, _: modes.append(module.training))
    captured = capture_hessian(gm, "shared", 2, batches)
    assert modes == [False] * 6  # two calls per batch, in eval mode; every module's own mode is back after
    assert gm.training and gm.get_submodule("shared").training and not gm.get_submodule("head").training
    with torch.no_grad():
        inputs = [x.reshape(-1, 8) for (x,), _ in batches]
        inputs += [torch.relu(gm.get_submodule("shared")(x)) for x in inputs]
        rows = torch.cat(inputs)
    assert captured.rows == rows.shape[0] and not head_calls
    torch.testing.assert_close(captured.hessian, 2 / rows.shape[0] * rows.T @ rows, rtol=1e-5, atol=1e-6)


def test_nan_activations_are_an_error_naming_the_layer() -> None:
    class LogThenLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(torch.log(x))

    gm = fx.symbolic_trace(LogThenLinear())
    with pytest.raises(LowbitError, match="layer 'proj'.*NaN or Inf"):
        lowbit.Pipeline([GPTQ()])(gm, calibration=calibration(-torch.ones(8, 4)))


def test_llama_layers_are_quantized_with_shared_captures() -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 16))
    gm = lowbit.trace(model, (), example_kwargs={"input_ids": ids})
    batches = calibration_set([{"input_ids": torch.randint(0, 256, (2, 16))} for _ in range(4)], (), {"input_ids": ids})
    pipeline = lowbit.Pipeline([GPTQ(bits=4, group_size=32, ignore=("lm_head",))])
    out = pipeline(gm, calibration=batches)
    result = pipeline.report.passes[0]
    assert result.stats == {"quantized": 14, "skipped": 1, "captures": 9}  # q/k/v and gate/up share one
    with torch.no_grad():
        expected, actual = model(input_ids=ids).logits, out(input_ids=ids).logits
    assert float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected)) < 0.1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bits": 5}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"block_size": 0}, "block_size"),
        ({"damp_percent": 0.0}, "damp_percent"),
        ({"act_ordr": True}, "act_order"),
        ({"mse": -1.0}, "mse"),
        ({"mse_steps": 0}, "mse_steps"),
        ({"mse_max_shrink": 0.0}, "mse_max_shrink"),
        ({"act_order": True, "act_group_aware": True}, "act_group_aware"),
    ],
)
def test_bad_options_name_the_key(options, key) -> None:
    with pytest.raises(PassConfigError, match=key):
        GPTQ(**options)


def test_registry_defaults_and_missing_calibration() -> None:
    gptq = lowbit.passes.get("gptq", bits=2, group_size=64, symmetric=False, ignore=["lm_head"])
    assert isinstance(gptq, GPTQ) and gptq.requires_calibration
    assert GPTQ().config.as_dict() == {
        "bits": 4,
        "group_size": 128,
        "symmetric": False,
        "ignore": (),
        "act_order": False,
        "static_groups": False,
        "block_size": 128,
        "damp_percent": 0.01,
        "mse": 2.4,
        "mse_steps": 20,
        "mse_max_shrink": 0.8,
        "act_group_aware": True,
        "divisible_groups": False,
        "scale_dtype": "float32",
    }
    with pytest.raises(CalibrationError, match="gptq"):
        lowbit.Pipeline([gptq])(traced_mlp())
    batches = [(torch.randn(4, 64),)]
    with pytest.raises(CalibrationError, match="calibration_set"):
        lowbit.Pipeline([GPTQ()])(traced_mlp(), calibration=batches)
    out = lowbit.Pipeline([GPTQ()])(traced_mlp(), calibration=batches, example_inputs=batches[0])
    assert isinstance(out.get_submodule("fc1"), PackedLinear)


def test_defaults_are_the_best_measured_settings() -> None:
    """Group-aware order and MSE-fitted grids unless told otherwise (the recipes' settings);
    act_order needs the group-aware order switched off."""
    options = lowbit.passes.get("gptq", bits=4).config.options
    assert (options.act_group_aware, options.mse, options.mse_steps, options.act_order) == (True, 2.4, 20, False)
    with pytest.raises(PassConfigError, match="act_group_aware=false with act_order"):
        lowbit.passes.get("gptq", act_order=True)
    assert lowbit.passes.get("gptq", act_order=True, act_group_aware=False).config.options.act_order


def test_nan_weight_in_a_graph_is_an_error_naming_the_layer() -> None:
    gm = traced_mlp()
    with torch.no_grad():
        gm.get_submodule("fc2").weight[0, 0] = float("inf")
    with pytest.raises(LowbitError, match="layer 'fc2'"):
        lowbit.Pipeline([GPTQ()])(gm, calibration=calibration(correlated_inputs(32, 64)))


def test_calibration_runs_once_through_a_transformer_and_matches_full_graph_captures() -> None:
    """The cursor's block-by-block capture gives the same packed weights as capturing each
    group by running the whole graph as quantized so far, with one forward per batch."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 16))
    gm = lowbit.trace(model, (), example_kwargs={"input_ids": ids})
    batches = calibration_set([{"input_ids": torch.randint(0, 256, (2, 16))} for _ in range(2)], (), {"input_ids": ids})
    embedding_calls = []
    handle = gm.get_submodule("model.embed_tokens").register_forward_hook(lambda *_: embedding_calls.append(1))
    gptq = GPTQ(bits=3, group_size=32)
    out = lowbit.Pipeline([gptq])(gm, calibration=batches)
    handle.remove()
    assert len(embedding_calls) == 2  # one forward per batch for all 15 layers

    reference = gm  # the pipeline quantized a copy
    paths = [path for _, path, _ in linear_nodes(reference)]
    shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    hessians = {}
    for path in paths:
        *prefix, name = path.split(".")
        source = ".".join([*prefix, shared[name]]) if name in shared else path
        if source not in hessians:
            hessians[source] = capture_hessian(reference, source, 1, batches).hessian
        node = next(n for n in reference.graph.nodes if n.op == "call_module" and n.target == path)
        result = gptq_quantize(reference.get_submodule(path).weight, hessians[source], gptq.config.options)
        replace_linear(
            reference, node, result.quantized, QuantScheme(bits=3, group_size=32, symmetric=False, method="gptq")
        )
    for (name, expected), (other, actual) in zip(reference.named_buffers(), out.named_buffers()):
        assert name == other and torch.equal(expected, actual), name
