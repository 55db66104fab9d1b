"""fp32 dense linear ``y = x · Wᵀ + b`` for a constant weight, laid out for the kernel at compile time.

Runs the graph's fp32 linears whose weight is a constant, and the packed weights no
packed kernel covers (3-bit codes, uneven groups), dequantized once at compile time. When
``N`` is a multiple of the vector width the weight is stored in panels ``(N/W, K, W)``
and runs on the panel micro-kernel of `packed_gemm.schedule_panels` (a task streams one
contiguous panel; its rows share each loaded weight vector); otherwise it is stored
transposed ``(K, N)`` and scheduled by `lowbit.backends.tvm.schedule.schedule_tiled_reduction`.
The CPU toolchain pads the rows to a multiple of the register tile (`packed_gemm.tile_rows`).
"""

from __future__ import annotations

import torch
from tvm import s_tir, te, tirx

from lowbit.backends.tvm.kernels.generic.common import divisor_at_most, finish
from lowbit.backends.tvm.kernels.generic.packed_gemm import schedule_panels, tile_rows
from lowbit.backends.tvm.schedule import schedule_tiled_reduction

#: Panel micro-kernel of the dense kernel: vectors per panel, rows per task, inputs per reduction block (a
#: 256 × 32 fp32 weight tile is 32 KiB); register tiles of `packed_gemm.tile_rows` rows.
VECTORS, ROW_BLOCK, K_BLOCK = 2, 32, 256


def dense_plan(
    weight: torch.Tensor, bias: torch.Tensor | None, batch: int, lanes: int, name: str | None = None
) -> tuple[tirx.PrimFunc, list[torch.Tensor]]:
    """The scheduled PrimFunc for ``x (batch, K) · weightᵀ (N, K) + bias`` and its constants (weight in the
    kernel's layout, [bias]); arguments ``x``, the constants, output ``y (batch, N)``."""
    n_out, k_in = weight.shape
    weight = weight.to(torch.float32)
    x = te.placeholder((batch, k_in), "float32", name="x")
    k = te.reduce_axis((0, k_in), name="k")
    panelled = n_out % lanes == 0
    if panelled:
        width = lanes * divisor_at_most(n_out // lanes, VECTORS)
        w = te.placeholder((n_out // width, k_in, width), "float32", name="w")
        y = te.compute(
            (batch, n_out), lambda m, n: te.sum(x[m, k] * w[n // width, k, n % width], axis=k), name="matmul"
        )
        laid_out = weight.reshape(n_out // width, width, k_in).transpose(1, 2).contiguous()
    else:
        w = te.placeholder((k_in, n_out), "float32", name="w")
        y = te.compute((batch, n_out), lambda m, n: te.sum(x[m, k] * w[k, n], axis=k), name="matmul")
        laid_out = weight.t().contiguous()
    args, consts = [x, w], [laid_out]
    if bias is not None:
        b = te.placeholder((n_out,), "float32", name="bias")
        y = te.compute((batch, n_out), lambda m, n: y[m, n] + b[n], name="bias_add")
        args.append(b)
        consts.append(bias.to(torch.float32).contiguous())
    sch = s_tir.Schedule(te.create_prim_func([*args, y]))
    block = sch.get_sblock("matmul")
    if panelled:
        rows = divisor_at_most(batch, tile_rows(lanes))
        row_block = _row_block(batch, rows)
        schedule_panels(sch, block, lanes, width, rows, row_block, divisor_at_most(k_in, K_BLOCK))
    else:
        schedule_tiled_reduction(sch, block, lanes)
    return finish(sch.mod["main"], name), consts


def _row_block(batch: int, rows: int) -> int:
    """The rows of a task: the multiple of ``rows`` dividing ``batch`` nearest `ROW_BLOCK` (the larger on a tie);
    200 rows in tiles of 8 take blocks of 40, not 8 (a task per tile would stream its panel once per 8 rows)."""
    blocks = [rows * d for d in range(1, batch // rows + 1) if batch % (rows * d) == 0]
    return min(blocks, key=lambda block: (abs(block - ROW_BLOCK), -block))


__all__ = ["dense_plan"]
