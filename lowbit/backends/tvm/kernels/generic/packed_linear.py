"""Weight-only packed linear for CPUs: ``y = x · dequant(W)ᵀ + b`` reading packed bytes directly.

The weight stays in the project's packed format (`lowbit.ir.packing`: an LSB-first
bit stream per output row, ``8 // bits`` codes per byte). The kernel unpacks codes with
shifts and masks in the inner loop, so it reads ``bits/32`` of the bytes an fp32 GEMV
reads. Activations are fp32; scales (and zero points when asymmetric) are per group.

Computation, for a group of ``G`` input columns stored in ``G/pb`` bytes (``pb = 8 //
bits`` codes per byte):

* ``xp[m, g, l, j] = x[m, g·G + j·pb + l]`` — the activations reordered once so that
  code lane ``l`` of byte ``j`` meets a contiguous run of ``x`` (M·K work, negligible);
* ``deq[n, g, l, j] = (q[n, g·G/pb + j] >> l·bits) & mask`` — the codes, without the zero point;
* ``gacc[m, n, g, v] = Σ_{l, jo} xp · deq`` over ``j = jo·V + v`` (V vector lanes) — the
  per-group fp32 accumulator, one vector register per row of ``x``;
* ``xsum[m, g] = Σ_c x[m, g·G + c]`` and ``shift[m, n] = Σ_g zero[n, g] · scale[n, g] · xsum[m, g]``
  — the zero points, applied once per group and row instead of once per code, since
  ``Σ x·(q − z) = Σ x·q − z·Σ x`` (a subtraction less per vector of codes in the inner loop);
* ``part[m, n, v] = Σ_g gacc · scale[n, g]`` and ``y = Σ_v part − shift + bias``.

Schedule: parallel over tasks of ``out_tile`` output rows ``n``; rows of ``x`` in
register tiles of ``row_tile`` sharing each dequantized weight vector; the lane axis
``v`` vectorized in every stage; the code lanes ``l`` unrolled so one byte load feeds
``pb`` codes. The per-row buffers keep the default global scope, which TVM turns into stack
arrays that LLVM keeps in registers: as ``local`` buffers they came from
``TVMBackendAllocWorkspace``, three allocations and frees per output row, which cost more than
a row's arithmetic at SmolLM2's widths. On x86 cores other
than AMD's (`common.stream_locality`), each output row starts with a ``prefetcht0`` of the
weight row `PREFETCH_BYTES` ahead: the hardware prefetcher alone streamed the cold weights of
a GEMV at about half the read bandwidth on Emerald Rapids.
Supported: bits ∈ {2, 4, 8}, ``K % group_size == 0``, ``group_size % pb == 0``, no
``g_idx``; `unsupported_reason` says why anything else must use the dense fallback.

From `GEMM_ROWS` rows of ``x`` on (a decoder's prefill step, which keeps the decode step's kernel and constants)
with ``N`` a multiple of the vector width, the plan is `packed_gemm`'s panel GEMM reading these same packed rows:
each weight is then unpacked once per block of rows instead of once per register tile of rows.

`PackedLinear` is the kernel (`kernels.spec.LinearKernel`); ``KNOBS`` is the tuning
space of ``row_tile`` and ``out_tile`` (upper bounds: the row tile is capped by the
batch, the output tile is the largest divisor of ``N`` not above it).
"""

from __future__ import annotations

import logging

from tvm import s_tir, te, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic import packed_gemm
from lowbit.backends.tvm.kernels.generic.common import (
    KERNEL_BITS,
    LINE_BYTES,
    T0,
    divisor_at_most,
    finish,
    loops_below,
    power_of_two_divisor,
    prefetch,
    prepend_to_loop,
    stream_locality,
    unsupported_reason,
)
from lowbit.backends.tvm.kernels.spec import (
    KernelPlan,
    LinearKernel,
    PackedLinearSpec,
    Tensors,
)
from lowbit.backends.tvm.target import float32_lanes
from lowbit.ir.packing import default_zero

log = logging.getLogger(__name__)

#: The kernel name tuning records are keyed by.
KERNEL_NAME = "packed_linear"
#: Tuning space: ``row_tile`` rows of ``x`` share each dequantized weight vector;
#: ``out_tile`` output rows per parallel task amortize the per-task setup.
KNOBS: dict[str, tuple[int, ...]] = {"row_tile": (1, 2, 4, 8), "out_tile": (4, 8, 16, 32, 64)}
#: The hand schedule's row tile (capped by the batch) and output tile.
ROW_TILE, OUT_TILE = 4, 16
#: Rows of ``x`` from which the plan is the panel GEMM of `gemm_on_rows` (a prefill step) instead of the GEMV.
GEMM_ROWS = 16
#: Its vectors per panel and rows of ``x`` per block (its register tile is `packed_gemm.tile_rows` rows).
GEMM_VECTORS, GEMM_ROW_BLOCK = 2, 128
#: How far ahead of the row being computed the weight stream is prefetched (bytes), one prefetch per line.
PREFETCH_BYTES = 4096


class PackedLinear(LinearKernel):
    """The packed-weight GEMV of the module doc (float activations; several rows in register tiles)."""

    name = KERNEL_NAME
    knobs = KNOBS

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        return unsupported_reason(spec)

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule: row tiles of up to ``ROW_TILE`` rows, tasks of ``OUT_TILE`` output rows."""
        rows = max(v for v in KNOBS["row_tile"] if v <= min(spec.batch, ROW_TILE))
        return {"row_tile": rows, "out_tile": OUT_TILE}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """The constants are passed in the project's packed format unchanged; from `GEMM_ROWS` rows on (a prefill
        step), the function is `gemm_on_rows` (the knobs, of the GEMV, are kept as given)."""
        lanes = float32_lanes(target)
        if spec.batch >= GEMM_ROWS and spec.out_features % lanes == 0:
            func = gemm_on_rows(spec, lanes)
        else:
            func = packed_linear_func(
                spec,
                lanes,
                row_tile=knobs["row_tile"],
                out_tile=knobs["out_tile"],
                prefetch_weights=stream_locality(target) == T0,
            )
        consts = [tensors[key] for key in ("qweight", "scales", "zeros", "bias") if tensors.get(key) is not None]
        return KernelPlan(func, consts, KERNEL_NAME, knobs)


KERNEL = PackedLinear()


def gemm_on_rows(spec: PackedLinearSpec, lanes: int) -> tirx.PrimFunc:
    """`packed_gemm`'s panel GEMM reading this kernel's constants: each group's codes are unpacked once per block of
    `GEMM_ROW_BLOCK` rows into an fp32 tile, which a register-blocked micro-kernel runs over."""
    return packed_gemm.packed_gemm_func(
        spec, lanes, packed_gemm.tile_rows(lanes), GEMM_VECTORS, GEMM_ROW_BLOCK, packed_rows=True
    )


def packed_linear_func(
    spec: PackedLinearSpec,
    lanes: int,
    name: str | None = None,
    row_tile: int = ROW_TILE,
    out_tile: int = OUT_TILE,
    prefetch_weights: bool = False,
) -> tirx.PrimFunc:
    """The scheduled PrimFunc for ``spec`` with ``lanes``-wide fp32 vectors.

    Arguments, in order: ``x (M, K) f32``, ``qweight (N, row_bytes) u8``, ``scales (N, G)
    f32``, then ``zeros (N, G) f32`` if asymmetric and ``bias (N,) f32`` if present, and
    the output ``y (M, N) f32``. ``name`` becomes the ``global_symbol`` a standalone build
    needs; leave it None when the function goes into a Relax module (which names it).
    ``prefetch_weights``: each output row prefetches (``prefetcht0``) the weights `PREFETCH_BYTES` ahead.
    """
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(f"packed kernel cannot compute {spec}: {reason}")
    vec = vector_width(spec, lanes)
    sch = s_tir.Schedule(packed_linear_compute(spec, vec))
    rows = _schedule(sch, spec, row_tile, out_tile)
    if prefetch_weights:
        _prefetch(sch, spec, rows, divisor_at_most(spec.out_features, out_tile))
    log.debug("scheduled %s with %d lanes, weight prefetch %s", spec, vec, prefetch_weights)
    return finish(sch.mod["main"], name)


def vector_width(spec: PackedLinearSpec, lanes: int) -> int:
    """The largest power of two ≤ ``lanes`` that divides the bytes of one group."""
    return power_of_two_divisor(spec.group_bytes, lanes)


def packed_linear_compute(spec: PackedLinearSpec, vec: int) -> tirx.PrimFunc:
    """The unscheduled computation (block structure described in the module doc)."""
    m_rows, k_in, n_out, groups = spec.batch, spec.in_features, spec.out_features, spec.groups
    pb, gbytes, bits = spec.codes_per_byte, spec.group_bytes, spec.bits
    x = te.placeholder((m_rows, k_in), "float32", name="x")
    qweight = te.placeholder((n_out, spec.row_bytes), "uint8", name="qweight")
    scales = te.placeholder((n_out, groups), "float32", name="scales")
    zeros = te.placeholder((n_out, groups), "float32", name="zeros") if spec.asymmetric else None
    bias = te.placeholder((n_out,), "float32", name="bias") if spec.has_bias else None

    xp = te.compute((m_rows, groups, pb, gbytes), lambda m, g, l, j: x[m, g * spec.group_size + j * pb + l], name="xp")

    def dequant(n: tirx.Var, g: tirx.Var, l: tirx.Var, j: tirx.Var) -> tirx.PrimExpr:
        byte = qweight[n, g * gbytes + j].astype("int32")
        return tirx.bitwise_and(tirx.shift_right(byte, l * bits), (1 << bits) - 1).astype("float32")

    deq = te.compute((n_out, groups, pb, gbytes), dequant, name="deq")
    column = te.reduce_axis((0, spec.group_size), name="c")
    xsum = te.compute(
        (m_rows, groups), lambda m, g: te.sum(x[m, g * spec.group_size + column], axis=column), name="xsum"
    )

    def zero_at(n: tirx.Var, g: tirx.Var) -> tirx.PrimExpr:
        return zeros[n, g] if zeros is not None else tirx.const(default_zero(bits), "float32")

    shift_group = te.reduce_axis((0, groups), name="gz")
    shift = te.compute(
        (m_rows, n_out),
        lambda m, n: te.sum(zero_at(n, shift_group) * scales[n, shift_group] * xsum[m, shift_group], axis=shift_group),
        name="shift",
    )
    lane = te.reduce_axis((0, pb), name="l")
    outer = te.reduce_axis((0, gbytes // vec), name="jo")
    gacc = te.compute(
        (m_rows, n_out, groups, vec),
        lambda m, n, g, v: te.sum(
            xp[m, g, lane, outer * vec + v] * deq[n, g, lane, outer * vec + v], axis=[lane, outer]
        ),
        name="gacc",
    )
    group = te.reduce_axis((0, groups), name="g")
    part = te.compute(
        (m_rows, n_out, vec), lambda m, n, v: te.sum(gacc[m, n, group, v] * scales[n, group], axis=group), name="part"
    )

    def total(m: tirx.Var, n: tirx.Var) -> tirx.PrimExpr:
        acc = part[m, n, 0]
        for v in range(1, vec):
            acc = acc + part[m, n, v]
        acc = acc - shift[m, n]
        return acc + bias[n] if bias is not None else acc

    y = te.compute((m_rows, n_out), total, name="y")
    args = [x, qweight, scales] + [t for t in (zeros, bias) if t is not None] + [y]
    return te.create_prim_func(args)


def _schedule(
    sch: s_tir.Schedule, spec: PackedLinearSpec, row_tile: int, out_tile: int
) -> tuple[s_tir.schedule.LoopRV, s_tir.schedule.LoopRV]:
    """Parallel rows of W, register tiles of x rows, vector lanes; see the module doc. Returns the task loop and
    the loop over its output rows."""
    y, part, gacc, deq = (sch.get_sblock(name) for name in ("y", "part", "gacc", "deq"))
    m, n = sch.get_loops(y)
    m_outer, m_inner = sch.split(m, factors=[None, min(spec.batch, row_tile)])
    n_outer, n = sch.split(n, factors=[None, divisor_at_most(spec.out_features, out_tile)])
    sch.reorder(n_outer, n, m_outer, m_inner)
    sch.parallel(n_outer)
    sch.compute_at(sch.get_sblock("shift"), m_inner, preserve_unit_loops=True)

    sch.compute_at(part, m_outer, preserve_unit_loops=True)
    p_m, _, p_v, p_g = loops_below(sch, part, m_outer)  # the n loop has extent 1 here
    sch.reorder(p_g, p_m, p_v)

    sch.compute_at(gacc, p_g, preserve_unit_loops=True)
    a_m, _, _, a_v, a_l, a_jo = loops_below(sch, gacc, p_g)  # n, g have extent 1
    sch.reorder(a_jo, a_l, a_m, a_v)  # the lanes of one byte load are unrolled next to each other

    sch.compute_at(deq, a_l, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(deq)[-1])

    sch.vectorize(a_v)
    sch.unroll(a_m)
    sch.unroll(a_l)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(gacc, a_jo))[-1])

    sch.vectorize(p_v)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(part, p_g))[-1])
    return n_outer, n


def _prefetch(
    sch: s_tir.Schedule,
    spec: PackedLinearSpec,
    loops: tuple[s_tir.schedule.LoopRV, s_tir.schedule.LoopRV],
    tile: int,
) -> None:
    """Start each output row (``loops``: the task loop, of ``tile`` rows, and its row loop) with a ``prefetcht0``
    per line of the weights `PREFETCH_BYTES` ahead, clamped to their last byte."""
    qweight = next(r.source for r in sch.get(sch.get_sblock("deq")).reads if r.source.name == "qweight")
    last = spec.out_features * spec.row_bytes - 1
    if last + PREFETCH_BYTES + spec.row_bytes >= 2**31:
        log.debug("no prefetch: %d weight bytes overflow the int32 loop index", last + 1)
        return
    task, row = (sch.get(loop) for loop in loops)
    start = (task.loop_var * tile + row.loop_var) * spec.row_bytes + PREFETCH_BYTES
    prepend_to_loop(
        sch,
        sch.get_sref(loops[1]),
        [prefetch(qweight, tirx.min(start + line, last), T0) for line in range(0, spec.row_bytes, LINE_BYTES)],
    )


__all__ = [
    "KERNEL",
    "KERNEL_BITS",
    "KERNEL_NAME",
    "GEMM_ROWS",
    "GEMM_ROW_BLOCK",
    "GEMM_VECTORS",
    "KNOBS",
    "PackedLinear",
    "gemm_on_rows",
    "packed_linear_compute",
    "packed_linear_func",
    "unsupported_reason",
    "vector_width",
]
