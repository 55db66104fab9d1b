"""Row blocks of a symbolic row count: a layer's input padded with zero rows to whole blocks, its output cut back.

A kernel scheduled in register tiles of rows runs on any number of whole blocks (`spec.PackedLinearSpec.row_blocks`);
the input of a graph with a symbolic batch or sequence has ``m`` rows, known only at run time. `pad_rows_func`
copies it into ``⌈m / block⌉ · block`` rows (the extra ones zero, which quantize and multiply to rows that are
dropped) and `first_rows_func` keeps the ``m`` rows of the result. Both are copies with rows in parallel, kept
out of operator fusion (Relax's FuseTIR does not take a scalar argument).
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import s_tir, te, tirx

from lowbit.backends.tvm.kernels.generic.common import finish


def padded_rows(rows: tirx.PrimExpr, block: int) -> tirx.PrimExpr:
    """``rows`` rounded up to a multiple of ``block``."""
    return (rows + block - 1) // block * block


def pad_rows_func(columns: int, block: int, dtype: str = "float32") -> tirx.PrimFunc:
    """``(x (m, columns), y (⌈m / block⌉ · block, columns))``: ``x`` and zero rows after it."""
    m = te.var("m", "int64")
    x = te.placeholder((m, columns), dtype, name="x")
    y = te.compute(
        (padded_rows(m, block), columns),
        lambda i, k: tirx.if_then_else(i < m, x[tirx.min(i, m - 1), k], tirx.const(0, dtype)),
        name="padded",
    )
    return _rows_in_parallel(te.create_prim_func([x, y]), "padded")


def first_rows_func(columns: int, dtype: str = "float32") -> tirx.PrimFunc:
    """``(x (p, columns), m, y (m, columns))``: the first ``m`` rows of ``x`` (``m`` a scalar argument)."""
    p, m = te.var("p", "int64"), te.var("m", "int64")
    x = te.placeholder((p, columns), dtype, name="x")
    y = te.compute((m, columns), lambda i, k: x[i, k], name="rows")
    return _rows_in_parallel(te.create_prim_func([x, m, y]), "rows")


def pad_axis_func(
    shape: Sequence[int | None],
    axis: int,
    block: int,
    value: float,
    dtype: str = "float32",
    order: Sequence[int] | None = None,
) -> tirx.PrimFunc:
    """``(x, y)`` for a tensor of ``shape`` (None: a symbolic size, any at run time): ``x`` with its ``axis`` padded
    to a multiple of ``block`` with ``value`` (attention's keys, values and mask over a symbolic number of keys),
    its axes taken in ``order`` in the same copy (``y``'s axis ``i`` is ``x``'s axis ``order[i]``: the heads split
    off and the keys transposed for the scores)."""
    rank = len(shape)
    order = list(order) if order is not None else list(range(rank))
    dims = [te.var(f"d{i}", "int64") if size is None else size for i, size in enumerate(shape)]
    x = te.placeholder(dims, dtype, name="x")

    def padded(*at: tirx.PrimExpr) -> tirx.PrimExpr:
        index = [at[order.index(k)] for k in range(rank)]
        inside = [tirx.min(i, dims[axis] - 1) if k == axis else i for k, i in enumerate(index)]
        return tirx.if_then_else(index[axis] < dims[axis], x[tuple(inside)], tirx.const(value, dtype))

    y = te.compute([padded_rows(dims[k], block) if k == axis else dims[k] for k in order], padded, name="padded")
    return _rows_in_parallel(te.create_prim_func([x, y]), "padded")


def key_mask_func(block: int, dtype: str = "float32") -> tirx.PrimFunc:
    """``(n, y (⌈n / block⌉ · block,))``: 0 for the first ``n`` keys, ``-inf`` for the padding after them."""
    n = te.var("n", "int64")
    y = te.compute(
        (padded_rows(n, block),),
        lambda i: tirx.if_then_else(i < n, tirx.const(0.0, dtype), tirx.const(float("-inf"), dtype)),
        name="mask",
    )
    return _rows_in_parallel(te.create_prim_func([n, y]), "mask")


def _rows_in_parallel(func: tirx.PrimFunc, block: str) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    sch.parallel(sch.get_loops(sch.get_sblock(block))[0])
    return finish(sch.mod["main"], None)


__all__ = ["first_rows_func", "key_mask_func", "pad_axis_func", "pad_rows_func", "padded_rows"]
