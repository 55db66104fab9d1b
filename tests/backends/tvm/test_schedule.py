"""The default CPU schedules: each rule takes its pattern, and the scheduled function computes what NumPy does.

Shapes are odd on purpose: 197 rows (ViT's tokens), rows whose length has no power-of-two divisor
(no vector lanes), and short rows (softmax over 32 keys).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import s_tir, te, tirx, topi
from tvm.s_tir import dlight

from lowbit.backends.tvm.schedule import Elementwise, RowReduction, SingleRowReduction, cpu_rules
from lowbit.backends.tvm.target import resolve_target

TARGET = resolve_target("x86")
RNG = np.random.default_rng(0)


def layer_norm(shape: tuple[int, ...], residual: bool = False, scale_after: bool = False) -> list[te.Tensor]:
    """``layer_norm(x [+ r]) [* 2]`` over the last axis: the tensors of a PrimFunc, inputs first."""
    x = te.placeholder(shape, "float32", name="x")
    inputs = [x]
    if residual:
        r = te.placeholder(shape, "float32", name="r")
        inputs.append(r)
        x = topi.add(x, r)
    gamma = te.placeholder(shape[-1:], "float32", name="gamma")
    beta = te.placeholder(shape[-1:], "float32", name="beta")
    y = topi.nn.layer_norm(x, gamma, beta, axis=[-1], epsilon=1e-5)
    if scale_after:
        y = topi.multiply(y, tirx.const(2.0, "float32"))
    return [*inputs, gamma, beta, y]


def softmax(shape: tuple[int, ...]) -> list[te.Tensor]:
    """Softmax over the last axis as `lowbit.backends.tvm.fastmath` legalizes it (max, fast exp, sum, reciprocal)."""
    x = te.placeholder(shape, "float32", name="x")
    peak = topi.max(x, axis=[-1], keepdims=True)
    exp = topi.fast_exp(topi.subtract(x, peak))
    inverse = topi.divide(tirx.const(1.0, "float32"), topi.sum(exp, axis=[-1], keepdims=True))
    return [x, topi.multiply(exp, inverse)]


def rms_norm(shape: tuple[int, ...]) -> list[te.Tensor]:
    """``x * rsqrt(mean(x²) + eps) * w`` over the last axis (the square is inlined into the reduction)."""
    x = te.placeholder(shape, "float32", name="x")
    w = te.placeholder(shape[-1:], "float32", name="w")
    mean_square = topi.divide(topi.sum(topi.multiply(x, x), axis=[-1], keepdims=True), float(shape[-1]))
    return [x, w, topi.multiply(topi.multiply(x, topi.rsqrt(topi.add(mean_square, 1e-6))), w)]


def reference_layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta


def reference_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def run(func: tirx.PrimFunc, inputs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
    """``func`` compiled for this machine, called on ``inputs`` and a zeroed output."""
    module = tvm.compile(func.with_attr("global_symbol", "main"), target=TARGET).jit()
    device = tvm.cpu()
    args = [tvm.runtime.tensor(a, device) for a in inputs]
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"), device)
    module["main"](*args, out)
    return out.numpy()


def loop_kinds(sch: s_tir.Schedule, name: str) -> list[tirx.ForKind]:
    return [sch.get(loop).kind for loop in sch.get_loops(sch.get_sblock(name))]


def default_schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    with TARGET:
        return dlight.ApplyDefaultSchedule(*cpu_rules())(tvm.IRModule({"main": func}))["main"]


@pytest.mark.parametrize(
    ("shape", "residual", "scale_after"),
    [((197, 768), False, False), ((2, 197, 384), True, False), ((5, 3, 50), False, True), ((7, 13), True, True)],
)
def test_row_reduction_layer_norm_matches_numpy(shape: tuple[int, ...], residual: bool, scale_after: bool) -> None:
    tensors = layer_norm(shape, residual, scale_after)
    sch = RowReduction().apply(te.create_prim_func(tensors), TARGET, False)
    assert sch is not None
    x = RNG.standard_normal(shape).astype("float32") * 3 + 1
    others = [RNG.standard_normal(shape).astype("float32")] if residual else []
    gamma, beta = (RNG.standard_normal(shape[-1:]).astype("float32") for _ in range(2))
    got = run(sch.mod["main"], [x, *others, gamma, beta], shape)
    want = reference_layer_norm(x + (others[0] if residual else 0), gamma, beta) * (2.0 if scale_after else 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(8, 12, 32, 32), (3, 197, 197), (4, 40), (6, 1000)])
def test_row_reduction_softmax_matches_numpy(shape: tuple[int, ...]) -> None:
    tensors = softmax(shape)
    sch = RowReduction().apply(te.create_prim_func(tensors), TARGET, False)
    assert sch is not None
    x = RNG.standard_normal(shape).astype("float32") * 4
    np.testing.assert_allclose(run(sch.mod["main"], [x], shape), reference_softmax(x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(197, 576), (2, 1, 576), (3, 7, 30)])
def test_row_reduction_rms_norm_matches_numpy(shape: tuple[int, ...]) -> None:
    sch = RowReduction().apply(te.create_prim_func(rms_norm(shape)), TARGET, False)
    assert sch is not None
    x = RNG.standard_normal(shape).astype("float32")
    w = RNG.standard_normal(shape[-1:]).astype("float32")
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(run(sch.mod["main"], [x, w], shape), want, rtol=1e-5, atol=1e-6)


def test_row_reduction_is_parallel_over_rows_and_vectorized_along_them() -> None:
    tensors = layer_norm((197, 768), residual=True)
    sch = RowReduction().apply(te.create_prim_func(tensors), TARGET, False)
    output = tensors[-1].op.name
    kinds = loop_kinds(sch, output)
    assert kinds[0] == tirx.ForKind.PARALLEL and kinds[-1] == tirx.ForKind.VECTORIZED
    in_row_loop = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_loops(sch.get_sblock(output))[0])]
    updates = [name for name in in_row_loop if name.endswith("_rf_update")]
    assert len(updates) == 2  # mean and variance accumulate in vector lanes
    for name in updates:
        assert loop_kinds(sch, name)[-1] == tirx.ForKind.VECTORIZED
    assert "T_add" in in_row_loop  # the residual add, read three times, is computed once per row
    assert loop_kinds(sch, "T_add")[-1] == tirx.ForKind.VECTORIZED


def test_row_reduction_keeps_short_rows_with_few_lanes() -> None:
    sch = RowReduction().apply(te.create_prim_func(softmax((96, 32))), TARGET, False)
    lanes = [int(sch.get(sch.get_loops(sch.get_sblock(name))[-1]).extent) for name in ("T_fast_exp_red_rf_update",)]
    assert lanes == [8]


def test_row_reduction_recomputes_a_shared_stage_of_a_symbolic_row() -> None:
    """Softmax over a symbolic number of keys (a multiple of 16): the exponentials are recomputed where read rather
    than kept in a row buffer of run-time size (allocated for every row), and the sums take whole 16-lane vectors."""
    keys = te.var("blocks", "int64") * 16
    sch = RowReduction().apply(te.create_prim_func(softmax((8, 12, 32, keys))), TARGET, False)
    names = [sch.get(block).name_hint for block in sch.get_child_blocks(sch.get_sblock("root"))]
    names += [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_loops(sch.get_sblock("T_multiply"))[0])]
    assert "T_fast_exp" not in names
    assert int(sch.get(sch.get_loops(sch.get_sblock("T_fast_exp_red_rf_update"))[-1]).extent) == 16


def test_row_reduction_declines_other_patterns() -> None:
    assert RowReduction().apply(te.create_prim_func(rms_norm((1, 576))), TARGET, False) is None  # one row: no loop
    a, b = te.placeholder((64, 32), name="a"), te.placeholder((32, 48), name="b")
    matmul = topi.matmul(a, b)
    column_sum = topi.sum(a, axis=[0])
    rule = RowReduction()
    assert rule.apply(te.create_prim_func([a, b, matmul]), TARGET, False) is None
    assert rule.apply(te.create_prim_func([a, topi.add(column_sum, topi.sum(column_sum))]), TARGET, False) is None


@pytest.mark.parametrize("tensors", [layer_norm((197, 384), residual=True), softmax((8, 12, 32, 32))])
def test_default_rules_schedule_row_reductions(tensors: list[te.Tensor]) -> None:
    func = default_schedule(te.create_prim_func(tensors))
    assert func.attrs["tirx.is_scheduled"]
    script = func.script()
    assert "_rf_update" in script and "T.parallel(" in script and "T.vectorized(" in script


def test_default_rules_still_schedule_a_single_row() -> None:
    assert default_schedule(te.create_prim_func(rms_norm((1, 576)))).attrs["tirx.is_scheduled"]


@pytest.mark.parametrize("shape", [(1, 1, 1, 768), (1, 50)])
def test_single_row_reduction_layer_norm_matches_numpy(shape: tuple[int, ...]) -> None:
    tensors = layer_norm(shape, scale_after=True)
    assert RowReduction().apply(te.create_prim_func(tensors), TARGET, False) is None
    sch = SingleRowReduction().apply(te.create_prim_func(tensors), TARGET, False)
    assert sch is not None
    x = RNG.standard_normal(shape).astype("float32") * 3 + 1
    gamma, beta = (RNG.standard_normal(shape[-1:]).astype("float32") for _ in range(2))
    want = reference_layer_norm(x, gamma, beta) * 2.0
    np.testing.assert_allclose(run(sch.mod["main"], [x, gamma, beta], shape), want, rtol=1e-4, atol=1e-4)


def test_single_row_reduction_computes_the_statistics_once_in_vector_lanes() -> None:
    """A layer norm over one row of 768 runs serially, its mean and variance accumulated in vector lanes once (not
    once per output element, as a parallel loop over the row's elements would)."""
    func = default_schedule(te.create_prim_func(layer_norm((1, 1, 1, 768))))
    script = func.script()
    assert "T.parallel(" not in script and script.count("_rf_update") == 2 and "T.vectorized(" in script
    assert SingleRowReduction().apply(te.create_prim_func(layer_norm((4, 768))), TARGET, False) is None


def batched_matmul(batch: int, rows: int, inner: int, columns: int) -> list[te.Tensor]:
    """``a (batch, rows, inner) @ b (batch, inner, columns) * 0.5``: attention's matmuls and their scale."""
    a = te.placeholder((batch, rows, inner), "float32", name="a")
    b = te.placeholder((batch, inner, columns), "float32", name="b")
    k = te.reduce_axis((0, inner), name="k")
    product = te.compute((batch, rows, columns), lambda h, i, j: te.sum(a[h, i, k] * b[h, k, j], axis=k), name="mm")
    return [a, b, topi.multiply(product, tirx.const(0.5, "float32"))]


@pytest.mark.parametrize(
    ("batch", "rows", "inner", "columns"),
    [(6, 197, 64, 197), (6, 197, 197, 64), (2, 1, 33, 197), (3, 7, 20, 40), (1, 197, 16, 16)],
)
def test_tiled_reduction_is_exact_on_rows_and_columns_without_whole_tiles(
    batch: int, rows: int, inner: int, columns: int
) -> None:
    func = default_schedule(te.create_prim_func(batched_matmul(batch, rows, inner, columns)))
    assert func.attrs["tirx.is_scheduled"]
    a = RNG.standard_normal((batch, rows, inner)).astype("float32")
    b = RNG.standard_normal((batch, inner, columns)).astype("float32")
    want = (a.astype(np.float64) @ b) * 0.5
    np.testing.assert_allclose(run(func, [a, b], want.shape), want, rtol=1e-5, atol=1e-4)


def test_tiled_reduction_pads_197_rows_to_whole_register_tiles() -> None:
    script = default_schedule(te.create_prim_func(batched_matmul(6, 197, 64, 197))).script()
    assert "a_pad" in script and "b_pad" in script  # zero-padded copies: 200 rows (8-row tiles), 224 columns
    assert "T.unroll(8)" in script.replace("T.int64(8)", "8") and "T.vectorized(" in script


def bias_relu6(shape: tuple[int, ...]) -> list[te.Tensor]:
    """``min(max(x + bias, 0), 6)`` with a per-channel bias over a channels-last image: the epilogue of a layer."""
    x = te.placeholder(shape, "float32", name="x")
    bias = te.placeholder(shape[-1:], "float32", name="bias")
    y = te.compute(shape, lambda *i: tirx.min(tirx.max(x[i] + bias[i[-1]], 0.0), 6.0), name="y")
    return [x, bias, y]


@pytest.mark.parametrize(("shape", "lanes"), [((56, 56, 72), 8), ((28, 28, 144), 16), ((14, 14, 3), None)])
def test_elementwise_vectors_run_along_the_channels(shape: tuple[int, ...], lanes: int | None) -> None:
    """72 channels: 8-lane vectors along them (a flat 16-lane vector would cross pixels, so the bias would be
    gathered); 3 channels: no such vector, so the loops are vectorized together."""
    sch = Elementwise().apply(te.create_prim_func(bias_relu6(shape)), TARGET, False)
    assert sch is not None
    loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("y"))]
    assert [loop.kind for loop in loops] == [tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED]
    if lanes is not None:
        assert int(loops[-1].extent) == lanes
        assert int(loops[0].extent) == np.prod(shape) // lanes
    x = RNG.standard_normal(shape).astype("float32") * 4
    bias = RNG.standard_normal(shape[-1:]).astype("float32")
    np.testing.assert_array_equal(run(sch.mod["main"], [x, bias], shape), np.clip(x + bias, 0, 6))


def planar_to_pixel_rows(channels: int, size: int) -> list[te.Tensor]:
    """An NCHW image as NHWC pixel rows ``(1, H, W·C)``: the transpose and reshape before a model's first layer."""
    x = te.placeholder((1, channels, size, size), "float32", name="x")
    y = te.compute((1, size, size * channels), lambda b, h, i: x[b, i % channels, h, i // channels], name="y")
    return [x, y]


def test_elementwise_reads_each_plane_in_order_when_it_interleaves_channels() -> None:
    """3 planes interleaved into pixel rows: the row loop parallel, the 3 channels unrolled inside each pixel (a
    vector along the row would gather each lane from another plane)."""
    sch = Elementwise().apply(te.create_prim_func(planar_to_pixel_rows(3, 20)), TARGET, False)
    assert sch is not None
    loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("y"))]
    assert [loop.kind for loop in loops] == [tirx.ForKind.PARALLEL, tirx.ForKind.SERIAL, tirx.ForKind.UNROLLED]
    assert int(loops[-1].extent) == 3
    x = RNG.standard_normal((1, 3, 20, 20)).astype("float32")
    expected = x.transpose(0, 2, 3, 1).reshape(1, 20, 60)
    np.testing.assert_array_equal(run(sch.mod["main"], [x], (1, 20, 60)), expected)


def test_elementwise_keeps_vectors_on_a_flattened_channel_index() -> None:
    """``x[i // C, i % C]`` (pixel rows of an NHWC image read back as pixels) reads consecutive elements: vectors."""
    x = te.placeholder((400, 24), "float32", name="x")
    y = te.compute((20, 480), lambda h, i: x[h * 20 + i // 24, i % 24] + 1.0, name="y")
    sch = Elementwise().apply(te.create_prim_func([x, y]), TARGET, False)
    assert sch is not None
    assert loop_kinds(sch, "y")[-1] == tirx.ForKind.VECTORIZED
