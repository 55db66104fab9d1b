"""Small parallel loops run serially (same loops, same results); larger ones stay parallel."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import s_tir, te, tirx, topi

from lowbit.backends.tvm.parallel import MIN_PARALLEL_WORK, parallel_work, serial_small_loops, serialize_small_loops
from lowbit.backends.tvm.target import resolve_target

TARGET = resolve_target("x86")


def scaled(*shapes: tuple[int, int, int]) -> tirx.PrimFunc:
    """``2·x`` over channels-last images of ``shapes``, one output each, scheduled as `Elementwise` would: pixels in
    parallel, channels vectorized."""
    images = [te.placeholder(shape, "float32", name=f"x{n}") for n, shape in enumerate(shapes)]
    outputs = [te.compute(x.shape, _doubled(x), name=f"y{n}") for n, x in enumerate(images)]
    sch = s_tir.Schedule(te.create_prim_func([*images, *outputs]))
    for n in range(len(shapes)):
        i, j, k = sch.get_loops(sch.get_sblock(f"y{n}"))
        sch.parallel(sch.fuse(i, j))
        sch.vectorize(k)
    return sch.mod["main"]


def _doubled(x: te.Tensor) -> Callable[..., tirx.PrimExpr]:
    return lambda i, j, k: x[i, j, k] * 2.0


def gated(width: int) -> tirx.PrimFunc:
    """``x[:, :N] · x[:, N:]`` on one row of ``2N`` (a gated MLP's product), outputs in a parallel loop of vectors."""
    x = te.placeholder((1, 2 * width), "float32", name="x")
    y = te.compute((1, width), lambda m, i: x[m, i] * x[m, i + width], name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    outer, inner = sch.split(sch.get_loops(sch.get_sblock("y"))[1], factors=[None, 16])
    sch.parallel(outer)
    sch.vectorize(inner)
    return sch.mod["main"]


def matmul(rows: int, depth: int, columns: int) -> tirx.PrimFunc:
    a = te.placeholder((rows, depth), "float32", name="a")
    b = te.placeholder((depth, columns), "float32", name="b")
    sch = s_tir.Schedule(te.create_prim_func([a, b, topi.matmul(a, b)]))
    block = sch.get_child_blocks(sch.get_sblock("root"))[0]
    sch.parallel(sch.get_loops(block)[0])
    return sch.mod["main"]


def kinds(func: tirx.PrimFunc) -> list[tirx.ForKind]:
    sch = s_tir.Schedule(func)
    return [
        sch.get(loop).kind for block in sch.get_child_blocks(sch.get_sblock("root")) for loop in sch.get_loops(block)
    ]


def test_work_counts_every_loop_inside_a_parallel_loop() -> None:
    assert list(parallel_work(s_tir.Schedule(scaled((14, 14, 96)))).values()) == [14 * 14 * 96]
    assert list(parallel_work(s_tir.Schedule(matmul(8, 32, 16))).values()) == [8 * 32 * 16]


def test_an_elementwise_block_counts_the_elements_it_writes_not_the_span_it_reads() -> None:
    """Each output reads ``x[i]`` and ``x[i + N]``: one region spanning ``N + 1`` elements, but one element of work."""
    func = gated(1536)
    assert list(parallel_work(s_tir.Schedule(func)).values()) == [1536]
    assert tirx.ForKind.PARALLEL not in kinds(serialize_small_loops(func))


def test_a_small_function_runs_serially_with_the_same_results() -> None:
    func = scaled((14, 14, 96))
    assert MIN_PARALLEL_WORK > 14 * 14 * 96
    serial = serialize_small_loops(func)
    assert tirx.ForKind.PARALLEL in kinds(func)
    assert kinds(serial) == [tirx.ForKind.SERIAL, tirx.ForKind.VECTORIZED]
    x = np.random.default_rng(0).standard_normal((14, 14, 96)).astype("float32")
    outputs = []
    for f in (func, serial):
        module = tvm.compile(f.with_attr("global_symbol", "main"), target=TARGET).jit()
        y = tvm.runtime.tensor(np.zeros_like(x), tvm.cpu())
        module["main"](tvm.runtime.tensor(x, tvm.cpu()), y)
        outputs.append(y.numpy())
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[1], 2 * x)


def test_large_loops_stay_parallel() -> None:
    func = scaled((56, 56, 96))
    assert MIN_PARALLEL_WORK <= 56 * 56 * 96
    assert serialize_small_loops(func).same_as(func)
    product = matmul(64, 64, 64)
    assert serialize_small_loops(product).same_as(product)


def test_the_module_pass_makes_only_the_small_loops_serial() -> None:
    mod = serial_small_loops(tvm.IRModule({"main": scaled((7, 7, 576), (112, 112, 16))}))
    parallel, vector = tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED
    assert kinds(mod["main"]) == [tirx.ForKind.SERIAL, vector, parallel, vector]
