"""fp32 dense linear ``y = x · w + b`` with a pre-transposed ``(K, N)`` weight.

The fallback for packed weights the packed kernel does not cover (3-bit codes, act-order
``g_idx``, ragged groups): the weight is dequantized once at compile time and stored
transposed so the vector axis (outputs ``n``) is contiguous in memory. Scheduled with
`lowbit.backends.tvm.schedule.schedule_tiled_reduction` (register tiles, parallel tiles).
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from lowbit.backends.tvm.kernels.common import finish
from lowbit.backends.tvm.schedule import schedule_tiled_reduction


def dense_func(batch: int, in_features: int, out_features: int, has_bias: bool, lanes: int,
               name: str | None = None) -> tirx.PrimFunc:
    """Scheduled PrimFunc; arguments ``x (M, K)``, ``w (K, N)``, [``bias (N,)``], output ``y (M, N)``."""
    x = te.placeholder((batch, in_features), "float32", name="x")
    weight = te.placeholder((in_features, out_features), "float32", name="w")
    k = te.reduce_axis((0, in_features), name="k")
    y = te.compute((batch, out_features), lambda m, n: te.sum(x[m, k] * weight[k, n], axis=k), name="matmul")
    args = [x, weight]
    if has_bias:
        bias = te.placeholder((out_features,), "float32", name="bias")
        y = te.compute((batch, out_features), lambda m, n: y[m, n] + bias[n], name="bias_add")
        args.append(bias)
    sch = s_tir.Schedule(te.create_prim_func([*args, y]))
    schedule_tiled_reduction(sch, sch.get_sblock("matmul"), lanes)
    return finish(sch.mod["main"], name)


__all__ = ["dense_func"]
