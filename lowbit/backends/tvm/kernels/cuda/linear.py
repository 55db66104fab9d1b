"""Weight-only packed linear for CUDA: ``y = x · dequant(W)ᵀ + b`` reading packed words directly.

The packed weight (`lowbit.ir.packing`: an LSB-first bit stream per output row) is
passed as 32-bit words, ``cw = 32 // bits`` codes per word, code ``c`` of word ``w``
being input column ``w·cw + c`` at bits ``[c·bits, (c+1)·bits)``. Each code is decoded
in registers as ``q · scale + zs`` with ``zs = −zero · scale`` per group (computed once
at lowering time), so one multiply-add turns a code into its weight:

* ``part[t, m, n] = Σ_{w ∈ thread t, c} x[m, w·cw + c] · (q[n, w, c] · s[n, g] + zs[n, g])``
  — each thread's share of the reduction (``rfactor``), in a register;
* ``y[m, n] = Σ_t part[t, m, n] + bias[n]`` — a cross-thread (warp shuffle) reduction.

Schedule (the knobs): a thread block computes ``rows`` outputs ``n`` (``threadIdx.y``) for
``m_tile`` rows of ``x`` (``blockIdx.y``); the ``threads`` lanes of ``threadIdx.x`` split
the words of a row, ``vector`` consecutive words per lane loaded at once (a 16-byte
load for 4). For every step of the reduction, the block stages the slice of ``x`` it
needs (``m_tile`` rows × ``threads·vector·cw`` columns) in shared memory, so a decoded
weight is reused for all ``m_tile`` rows: GEMV for ``M = 1`` (warps over output rows,
shuffle reduction), shared-memory block tiling for ``M > 1``.

Supported: bits ∈ {1, 2, 4, 8}, ``K % group_size == 0``, groups of whole words
(``group_size % cw == 0``), no ``g_idx``, float activations; `CudaLinear.supports` names anything else.
The sum order differs from torch's, so results agree to float32 rounding (1e-5
relative), not bit for bit.
"""

from __future__ import annotations

import logging

import torch
from tvm import s_tir, te, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic.common import (
    divisor_at_most,
    finish,
    power_of_two_divisor,
)
from lowbit.backends.tvm.kernels.spec import (
    KernelPlan,
    LinearKernel,
    PackedLinearSpec,
    Tensors,
)
from lowbit.ir.packing import default_zero

log = logging.getLogger(__name__)

KERNEL_NAME = "cuda_linear"
KERNEL_BITS: tuple[int, ...] = (1, 2, 4, 8)
#: Tuning space: ``threads`` lanes split a weight row, ``vector`` words per lane and load,
#: ``rows`` output rows per block (warps), ``m_tile`` rows of ``x`` sharing each decoded weight.
KNOBS: dict[str, tuple[int, ...]] = {
    "threads": (8, 16, 32, 64),
    "vector": (1, 2, 4),
    "rows": (1, 2, 4, 8),
    "m_tile": (1, 2, 4, 8, 16),
}
#: The hand schedule: one warp per output row, 16-byte loads, 4 rows per block, up to 8 rows of x.
THREADS, VECTOR, ROWS, M_TILE = 32, 4, 4, 8
#: Bound on the shared-memory slice of ``x`` (the 48 KiB a block gets without opting in to more).
SHARED_BYTES = 48 * 1024


def unsupported_reason(spec: PackedLinearSpec) -> str | None:
    """Why ``spec`` cannot run on this kernel (the lowering then falls back), or None."""
    if spec.bits not in KERNEL_BITS:
        return f"{spec.bits}-bit codes straddle 32-bit words; the CUDA kernel handles {KERNEL_BITS} bits"
    if spec.has_g_idx:
        return "act-order g_idx permutes groups; the CUDA kernel needs contiguous groups"
    if spec.in_features % spec.group_size:
        return f"in_features={spec.in_features} is not a multiple of group_size={spec.group_size}"
    if spec.group_size % codes_per_word(spec.bits):
        return f"group_size={spec.group_size} does not fill whole 32-bit words of {spec.bits}-bit codes"
    return None


def codes_per_word(bits: int) -> int:
    return 32 // bits


class CudaLinear(LinearKernel):
    """The weight-only kernel of the module doc (float activations)."""

    name = KERNEL_NAME
    knobs = KNOBS

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        reason = unsupported_reason(spec)
        if reason is None and spec.act_bits is not None:
            return "int8-activation layers go to the dp4a kernel"
        return reason

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule (see the module doc), with ``m_tile`` capped by the batch."""
        return {
            "threads": THREADS,
            "vector": VECTOR,
            "rows": ROWS,
            "m_tile": max(v for v in KNOBS["m_tile"] if v <= min(spec.batch, M_TILE)),
        }

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """Constants, in order: the packed weight as int32 words ``(N, K / cw)``, ``scales (N, G)``,
        ``zs = −zero · scale (N, G)`` and the bias if present."""
        scales = tensors["scales"].to(torch.float32)
        zeros = tensors["zeros"]
        zero = torch.full_like(scales, default_zero(spec.bits)) if zeros is None else zeros.to(torch.float32)
        consts = [packed_words(tensors["qweight"]), scales.contiguous(), (-zero * scales).contiguous()]
        if tensors.get("bias") is not None:
            consts.append(tensors["bias"].to(torch.float32).contiguous())
        return KernelPlan(cuda_linear_func(spec, **knobs), consts, KERNEL_NAME, knobs)


KERNEL = CudaLinear()


def packed_words(qweight: torch.Tensor) -> torch.Tensor:
    """The packed bytes ``(N, bytes)`` as little-endian int32 words ``(N, bytes / 4)`` (byte 0 lowest)."""
    if qweight.shape[1] % 4:
        raise ValueError(f"packed rows of {qweight.shape[1]} bytes are not whole 32-bit words")
    return qweight.contiguous().view(torch.int32).clone()


def cuda_linear_func(
    spec: PackedLinearSpec, threads: int = THREADS, vector: int = VECTOR, rows: int = ROWS, m_tile: int = M_TILE
) -> tirx.PrimFunc:
    """The scheduled PrimFunc: ``x (M, K)``, words, scales, zs, [bias], output ``y (M, N)``."""
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(f"CUDA packed kernel cannot compute {spec}: {reason}")
    sch = s_tir.Schedule(cuda_linear_compute(spec))
    _schedule(sch, spec, threads, vector, rows, m_tile)
    return finish(sch.mod["main"], None)


def cuda_linear_compute(spec: PackedLinearSpec) -> tirx.PrimFunc:
    """The unscheduled computation (module doc)."""
    m_rows, n_out, k_in, bits = spec.batch, spec.out_features, spec.in_features, spec.bits
    cw = codes_per_word(bits)
    words, groups, group_words = k_in // cw, spec.groups, spec.group_size // cw
    x = te.placeholder((m_rows, k_in), "float32", name="x")
    qwords = te.placeholder((n_out, words), "int32", name="qwords")
    scales = te.placeholder((n_out, groups), "float32", name="scales")
    zs = te.placeholder((n_out, groups), "float32", name="zs")
    bias = te.placeholder((n_out,), "float32", name="bias") if spec.has_bias else None
    w = te.reduce_axis((0, words), name="w")
    c = te.reduce_axis((0, cw), name="c")

    def weight(n: tirx.Var, word: tirx.Var, code: tirx.Var) -> tirx.PrimExpr:
        value = tirx.bitwise_and(tirx.shift_right(qwords[n, word], code * bits), (1 << bits) - 1)
        g = word // group_words
        return value.astype("float32") * scales[n, g] + zs[n, g]

    y = te.compute((m_rows, n_out), lambda m, n: te.sum(x[m, w * cw + c] * weight(n, w, c), axis=[w, c]), name="y")
    args = [x, qwords, scales, zs]
    if bias is not None:
        y = te.compute((m_rows, n_out), lambda m, n: y[m, n] + bias[n], name="bias_add")
        args.append(bias)
    return te.create_prim_func([*args, y])


def _schedule(sch: s_tir.Schedule, spec: PackedLinearSpec, threads: int, vector: int, rows: int, m_tile: int) -> None:
    """Blocks of ``rows × m_tile`` outputs, ``threads`` lanes per row, rfactor + shuffle reduction."""
    words = spec.in_features // codes_per_word(spec.bits)
    vector = power_of_two_divisor(words, vector)
    threads = min(threads, max(1, words // vector))
    while vector > 1 and words % (threads * vector):  # narrower loads before fewer lanes
        vector //= 2
    while words % (threads * vector):
        threads //= 2
    rows = divisor_at_most(spec.out_features, rows)
    m_tile = divisor_at_most(spec.batch, m_tile)
    while m_tile > 1 and m_tile * threads * vector * codes_per_word(spec.bits) * 4 > SHARED_BYTES:
        m_tile = divisor_at_most(spec.batch, m_tile // 2)

    block = sch.get_sblock("y")
    m, n, w, c = sch.get_loops(block)
    m_outer, m_inner = sch.split(m, factors=[None, m_tile])
    n_outer, n_inner = sch.split(n, factors=[None, rows])
    w_outer, w_thread, w_vec = sch.split(w, factors=[None, threads, vector])
    sch.reorder(n_outer, m_outer, n_inner, w_thread, w_outer, w_vec, c, m_inner)
    partial = sch.rfactor(w_thread, 0)  # part[t, m, n]: one register per lane and row of x

    n_outer, m_outer, n_inner, w_thread_y, m_inner = sch.get_loops(block)
    sch.reorder(m_inner, w_thread_y)  # one shuffle reduction per row of x
    sch.bind(n_outer, "blockIdx.x")
    sch.bind(m_outer, "blockIdx.y")
    sch.bind(n_inner, "threadIdx.y")
    sch.bind(w_thread_y, "threadIdx.x")

    sch.compute_at(partial, n_inner, preserve_unit_loops=True)
    sch.set_scope(partial, 0, "local")
    loops = sch.get_loops(partial)
    t_loop, m_loop, _, w_o, w_v, c_loop = loops[-6:]  # below n_inner: t, m, n(1), wo, wv, c
    sch.reorder(t_loop, w_o, w_v, c_loop, m_loop)
    sch.bind(t_loop, "threadIdx.x")
    sch.unroll(c_loop)
    sch.unroll(m_loop)

    words_local = sch.cache_read(partial, 1, "local")  # the packed words: one vector load per step
    sch.compute_at(words_local, w_o, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(words_local)[-1])

    x_shared = sch.cache_read(partial, 0, "shared")  # the slice of x this step of the block needs
    sch.compute_at(x_shared, w_o, preserve_unit_loops=True)
    fused = sch.fuse(*sch.get_loops(x_shared)[-2:])
    _, ty, tx = sch.split(fused, factors=[None, rows, threads])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.decompose_reduction(partial, w_o)

    if spec.has_bias:  # the reduced value stays in registers; the bias is added on the way out
        sch.set_scope(block, 0, "local")
        sch.reverse_compute_at(sch.get_sblock("bias_add"), n_inner, preserve_unit_loops=True)
    log.debug("CUDA packed linear %s: threads=%d vector=%d rows=%d m_tile=%d", spec, threads, vector, rows, m_tile)


__all__ = [
    "KERNEL",
    "KERNEL_BITS",
    "KERNEL_NAME",
    "KNOBS",
    "CudaLinear",
    "codes_per_word",
    "cuda_linear_compute",
    "cuda_linear_func",
    "packed_words",
    "unsupported_reason",
]
