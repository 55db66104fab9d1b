"""Weight-only packed linear for several rows of ``x`` on CPUs (prefill): panel GEMM over dequantized groups.

`packed_linear` dots each output row's codes with each row of ``x``: every code is
unpacked once per row tile, which at M=32 costs more than the multiply-adds. Here the
weight is laid out in panels of ``W = vectors · lanes`` output columns, each group of
codes is dequantized once per task into a ``(group_size, W)`` fp32 tile in L1, and a
register tile of ``row_tile × vectors`` accumulators runs over it for every row of the
task's row block, as a BLAS micro-kernel does (one broadcast of ``x`` feeds ``vectors``
FMAs):

* ``w[p, k, v] = (code[p·W + v, k] − zero) · scale`` for group ``k // group_size`` —
  the reference's dequantized weight, element for element;
* ``y[m, n] = Σ_k x[m, k] · w[n // W, k, n % W] + bias[n]``.

Constants, made at lowering time from the project's packed rows: codes ``(N/W, K/pb, W)``
uint8, byte ``(p, j, v)`` holding the ``pb = 8 // bits`` codes of column ``p·W + v`` for
inputs ``j·pb … j·pb + pb − 1`` (input ``j·pb + l`` in bits ``[l·bits, (l+1)·bits)``), so
one ``W``-byte load, a shift and a mask give a panel row; scales and zero points
``(N/W, G, W)``.

Schedule: parallel tasks of (row block, panel); inside, for each group: dequantize the
tile, then for each register tile of rows, the group's inputs in order, the rows and
vectors unrolled, the lanes vectorized. The accumulators of the row block stay in a
per-task buffer across groups. Supported as `packed_linear` (bits 2/4/8, whole groups,
no ``g_idx``), for ``N`` a multiple of the vector width; `PackedGemm.supports` gives the
reason otherwise and the lowering uses `packed_linear`.
"""

from __future__ import annotations

import logging

import torch
from tvm import s_tir, te, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic.common import (
    divisor_at_most,
    finish,
    layer_consts,
)
from lowbit.backends.tvm.kernels.generic.common import unsupported_reason as packed_unsupported_reason
from lowbit.backends.tvm.kernels.spec import (
    KernelPlan,
    LinearKernel,
    PackedLinearSpec,
    Tensors,
)
from lowbit.backends.tvm.target import float32_lanes
from lowbit.ir import packing

log = logging.getLogger(__name__)

KERNEL_NAME = "packed_gemm"
#: Rows of ``x`` from which the lowering prefers this kernel to `packed_linear` (which wins on a GEMV).
MIN_ROWS = 4
#: Tuning space: ``row_tile`` rows × ``vectors`` vector registers of accumulators; ``row_block`` rows of
#: ``x`` per task (the dequantized group tile is reused by all of them).
KNOBS: dict[str, tuple[int, ...]] = {"row_tile": (2, 4, 6, 8), "vectors": (1, 2, 3, 4), "row_block": (16, 32, 64)}


def unsupported_reason(spec: PackedLinearSpec, lanes: int) -> str | None:
    """Why this kernel cannot compute ``spec`` with ``lanes``-wide vectors, or None."""
    reason = packed_unsupported_reason(spec)
    if reason is not None:
        return reason
    if spec.act_bits is not None:
        return "the panel GEMM takes float activations"
    if spec.out_features % lanes:
        return f"out_features={spec.out_features} is not a multiple of the {lanes}-lane vector"
    return None


def tile_rows(lanes: int) -> int:
    """Rows of a register tile of 2 vectors per row that fits the vector registers: 8 with AVX-512's 32
    (16 lanes), else 4 (AVX2's and NEON's 16 registers)."""
    return 8 if lanes == 16 else 4


class PackedGemm(LinearKernel):
    """The panel GEMM of the module doc (float activations, ``N`` a multiple of the vector width)."""

    name = KERNEL_NAME
    knobs = KNOBS

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        return unsupported_reason(spec, float32_lanes(target))

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule: `tile_rows` rows × 2 vectors of accumulators, blocks of 64 rows."""
        return {"row_tile": tile_rows(float32_lanes(target)), "vectors": 2, "row_block": 64}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """The constants are, in order: panel codes, scales, [zero points], [bias] (module doc)."""
        lanes = float32_lanes(target)
        width = panel_width(spec, lanes, knobs["vectors"])
        func = packed_gemm_func(spec, lanes, knobs["row_tile"], knobs["vectors"], knobs["row_block"])
        consts = layer_consts(
            panel_codes(tensors["qweight"], spec.bits, spec.in_features, width),
            tensors,
            lambda values: panels(values, width),
            torch.float32,
        )
        return KernelPlan(func, consts, KERNEL_NAME, knobs)


KERNEL = PackedGemm()


def panel_width(spec: PackedLinearSpec, lanes: int, vectors: int) -> int:
    """Output columns of one panel: ``vectors`` vectors, reduced to divide ``N``."""
    return lanes * divisor_at_most(spec.out_features // lanes, vectors)


def panel_codes(qweight: torch.Tensor, bits: int, in_features: int, width: int) -> torch.Tensor:
    """Packed rows ``(N, row_bytes)`` → panel bytes ``(N/W, K/pb, W)`` of the module doc."""
    codes = packing.unpack(qweight, bits, in_features).to(torch.int32)
    n_out, pb = codes.shape[0], 8 // bits
    # [panel, column, byte, code-in-byte] → [panel, byte, column, code-in-byte]
    blocks = codes.reshape(n_out // width, width, in_features // pb, pb).permute(0, 2, 1, 3)
    shifts = torch.arange(pb, dtype=torch.int32) * bits
    return (blocks << shifts).sum(dim=3).to(torch.uint8).contiguous()


def panels(per_group: torch.Tensor, width: int) -> torch.Tensor:
    """Per-group values ``(N, G)`` → ``(N/W, G, W)``: a panel's values of one group are one vector row."""
    n_out, groups = per_group.shape
    return per_group.reshape(n_out // width, width, groups).transpose(1, 2).contiguous()


def packed_gemm_func(
    spec: PackedLinearSpec,
    lanes: int,
    row_tile: int,
    vectors: int,
    row_block: int,
    name: str | None = None,
    packed_rows: bool = False,
) -> tirx.PrimFunc:
    """The scheduled PrimFunc; arguments ``x (M, K) f32``, the constants of `plan`, output ``y (M, N) f32``.

    ``packed_rows``: the constants are `packed_linear`'s instead (the project's packed rows ``(N, row_bytes)``,
    scales [and zero points] ``(N, G)``); each group's tile then gathers its panel's columns from ``W`` rows."""
    reason = unsupported_reason(spec, lanes)
    if reason is not None:
        raise ValueError(f"panel GEMM cannot compute {spec}: {reason}")
    width = panel_width(spec, lanes, vectors)
    # Whole tiles only: the row tile divides the row block, which divides the batch.
    block = divisor_at_most(spec.batch, row_block)
    rows = divisor_at_most(block, row_tile)
    sch = s_tir.Schedule(packed_gemm_compute(spec, width, packed_rows))
    _schedule(sch, spec, lanes, width, rows, block)
    log.debug("scheduled %s: panels of %d, %d-row tiles, %d-row blocks", spec, width, rows, block)
    return finish(sch.mod["main"], name)


def packed_gemm_compute(spec: PackedLinearSpec, width: int, packed_rows: bool = False) -> tirx.PrimFunc:
    """The unscheduled computation of the module doc, for panels of ``width`` columns (``packed_rows``: read from
    `packed_linear`'s constants, see `packed_gemm_func`)."""
    m_rows, k_in, n_out, bits, group = spec.batch, spec.in_features, spec.out_features, spec.bits, spec.group_size
    pb, groups = spec.codes_per_byte, spec.groups
    x = te.placeholder((m_rows, k_in), "float32", name="x")
    if packed_rows:
        codes = te.placeholder((n_out, spec.row_bytes), "uint8", name="qweight")
        per_group: tuple[int, ...] = (n_out, groups)

        def at(table: te.Tensor, p: tirx.Var, row: tirx.PrimExpr, v: tirx.Var) -> tirx.PrimExpr:
            return table[p * width + v, row]

    else:
        codes = te.placeholder((n_out // width, k_in // pb, width), "uint8", name="codes")
        per_group = (n_out // width, groups, width)

        def at(table: te.Tensor, p: tirx.Var, row: tirx.PrimExpr, v: tirx.Var) -> tirx.PrimExpr:
            return table[p, row, v]

    scales = te.placeholder(per_group, "float32", name="scales")
    zeros = te.placeholder(per_group, "float32", name="zeros") if spec.asymmetric else None
    bias = te.placeholder((n_out,), "float32", name="bias") if spec.has_bias else None

    def dequant(p: tirx.Var, k: tirx.Var, v: tirx.Var) -> tirx.PrimExpr:
        byte = at(codes, p, k // pb, v)
        code = tirx.bitwise_and(
            tirx.shift_right(byte, ((k % pb) * bits).astype("uint8")), tirx.const((1 << bits) - 1, "uint8")
        ).astype("float32")
        default = tirx.const(packing.default_zero(bits), "float32")
        zero = at(zeros, p, k // group, v) if zeros is not None else default
        return (code - zero) * at(scales, p, k // group, v)

    weight = te.compute((n_out // width, k_in, width), dequant, name="weight")
    k = te.reduce_axis((0, k_in), name="k")
    acc = te.compute(
        (m_rows, n_out), lambda m, n: te.sum(x[m, k] * weight[n // width, k, n % width], axis=k), name="acc"
    )
    y = te.compute((m_rows, n_out), lambda m, n: acc[m, n] + bias[n], name="y") if bias is not None else acc
    args = [x, codes, scales] + [t for t in (zeros, bias) if t is not None] + [y]
    return te.create_prim_func(args)


def _schedule(sch: s_tir.Schedule, spec: PackedLinearSpec, lanes: int, width: int, rows: int, block: int) -> None:
    """`schedule_panels` over the groups, each group's weight tile dequantized at the top of its iteration."""
    group = schedule_panels(sch, sch.get_sblock("acc"), lanes, width, rows, block, spec.group_size)
    weight = sch.get_sblock("weight")
    sch.compute_at(weight, group, preserve_unit_loops=True)
    w_k, w_v = sch.get_loops(weight)[-2:]
    _, w_code = sch.split(w_k, factors=[None, spec.codes_per_byte])
    w_vec, w_lane = sch.split(w_v, factors=[None, lanes])
    sch.unroll(w_code)
    sch.unroll(w_vec)
    sch.vectorize(w_lane)


def schedule_panels(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int, width: int, rows: int, row_block: int, k_block: int
) -> s_tir.schedule.LoopRV:
    """The panel micro-kernel schedule of a ``(m, n, k)`` matmul block whose weight is read in panels of ``width``.

    Parallel tasks of (``row_block`` rows, one panel); in each, the reduction in blocks of
    ``k_block`` (the loop returned, where a producer of the block's weight tile can be
    computed), then register tiles of ``rows × width`` accumulators over the block's
    inputs: rows and vectors unrolled, lanes vectorized. The row block's accumulators
    live in a per-task buffer written back (with any elementwise consumer such as a bias
    folded in) after the last block. ``rows`` divides ``row_block``, which divides the batch.
    """
    m, n, k = sch.get_loops(block)
    panel, vec, lane = sch.split(n, factors=[None, width // lanes, lanes])
    m_block, m_tile, row = sch.split(m, factors=[None, row_block // rows, rows])
    k_outer, k_inner = sch.split(k, factors=[None, k_block])
    sch.reorder(m_block, panel, k_outer, m_tile, k_inner, row, vec, lane)
    task = sch.fuse(m_block, panel)
    sch.parallel(task)
    write_back = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(write_back, task)
    for consumer in sch.get_consumers(write_back):
        sch.reverse_compute_inline(consumer)
    sch.vectorize(sch.split(sch.get_loops(write_back)[-1], factors=[None, lanes])[-1])
    sch.unroll(row)
    sch.unroll(vec)
    sch.vectorize(lane)
    init = sch.decompose_reduction(block, k_outer)
    sch.vectorize(sch.split(sch.get_loops(init)[-1], factors=[None, lanes])[-1])
    return k_outer


__all__ = [
    "KERNEL",
    "KERNEL_NAME",
    "KNOBS",
    "MIN_ROWS",
    "PackedGemm",
    "packed_gemm_compute",
    "packed_gemm_func",
    "panel_codes",
    "panel_width",
    "panels",
    "schedule_panels",
    "tile_rows",
    "unsupported_reason",
]
