"""Small scheduled functions run serially (same loops, same results); larger ones keep their parallel loops."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir, te, tirx, topi

from lowbit.backends.tvm.parallel import MIN_PARALLEL_WORK, function_work, serial_if_small, serial_small_functions
from lowbit.backends.tvm.target import resolve_target

TARGET = resolve_target("x86")


def scaled(shape: tuple[int, ...]) -> tirx.PrimFunc:
    """``2·x`` over a channels-last image, scheduled as `Elementwise` would: pixels in parallel, channels vectorized."""
    x = te.placeholder(shape, "float32", name="x")
    y = te.compute(shape, lambda i, j, k: x[i, j, k] * 2.0, name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    i, j, k = sch.get_loops(sch.get_sblock("y"))
    sch.parallel(sch.fuse(i, j))
    sch.vectorize(k)
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


def test_work_counts_every_loop_around_a_block() -> None:
    assert function_work(s_tir.Schedule(scaled((14, 14, 96)))) == 14 * 14 * 96
    assert function_work(s_tir.Schedule(matmul(8, 32, 16))) == 8 * 32 * 16


def test_a_small_function_runs_serially_with_the_same_results() -> None:
    func = scaled((14, 14, 96))
    assert MIN_PARALLEL_WORK > 14 * 14 * 96
    serial = serial_if_small(func)
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


def test_a_large_function_keeps_its_parallel_loops() -> None:
    func = scaled((56, 56, 96))
    assert MIN_PARALLEL_WORK <= 56 * 56 * 96
    assert serial_if_small(func).same_as(func)
    product = matmul(64, 64, 64)
    assert serial_if_small(product).same_as(product)


def test_the_module_pass_rewrites_only_the_small_functions() -> None:
    mod = tvm.IRModule({"small": scaled((7, 7, 576)), "large": scaled((112, 112, 16))})
    out = serial_small_functions(mod)
    assert tirx.ForKind.PARALLEL not in kinds(out["small"])
    assert tirx.ForKind.PARALLEL in kinds(out["large"])
