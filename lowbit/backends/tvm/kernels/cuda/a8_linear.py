"""Packed-weight linear with int8 activations for CUDA (``linear_packed_a8``), on ``__dp4a``.

Reproduces `lowbit.ir.ops_a8` bit for bit (power-of-two scales or not): every float
operation of the reference is an explicitly rounded CUDA intrinsic (``__fmul_rn``,
``__fadd_rn``, ``__fdiv_rn``, ``__float2int_rn``), so neither ``-fmad`` contraction nor
fast-math can change a result, and integer dot products are exact in any order.

One PrimFunc, several kernel launches:

1. (dynamic activations) ``s[m] = 127 / max(max_k |x[m, k]|, 2⁻¹¹⁹)`` — a block per row,
   shuffle reduction;
2. ``xq[m, w, l]`` — the int8 codes ``clamp(rint(x · s), −128, 127)`` (static: ``rint(x /
   Δ)``) packed four to an int32 word in the order the weight words unpack: weight word
   ``w`` holds ``cw = 32 // bits`` codes; its lane ``l < pb = 8 // bits`` is ``(word >>
   l·bits) & mask`` replicated per byte, i.e. codes ``w·cw + j·pb + l`` for bytes ``j =
   0..3``, so ``xq[m, w, l]`` packs ``x`` codes at those same columns;
3. (only for zero points other than the centre ``c``: asymmetric or 1-bit)
   ``asum[m, g] = Σ_{k ∈ g} x_int[m, k]``;
4. the product: per group, ``isum = Σ __dp4a(xq, lane(word))`` over codes centred per
   byte, ``q − c`` with ``c = 2^(bits−1)`` (``word ^ 0x80808080`` for 8 bits, ``((lane |
   0x80) − c) ^ 0x80`` below; 1-bit codes stay uncentred); ``2·acc = 2·isum − zz·asum``
   with ``zz = 2·(zero − c)`` (exact for the integer and half-integer zero points of the
   format); ``y = Σ_g float(2·acc)/2 · scale`` in group order with rounded multiplies
   and adds; ``out = y / s + bias`` (static: ``y · Δ + bias``; a convolution's patches: then the steps of its
   epilogue, `conv.conv_epilogue`).

Schedule of the product (the knobs): a block computes ``rows`` outputs ``n``
(``threadIdx.y``) for ``m_tile`` rows of ``x``; ``threads`` lanes (``threadIdx.x``) take
(group, part) pairs, a group's words being split in ``parts`` so that few or
per-channel groups still fill the warp; each lane loads its words with
``vector``-word loads, reuses each decoded word for all ``m_tile`` rows, and leaves its
integer partial sum in shared memory; the ordered float sum over groups follows. The
packed activations of the block's rows are staged in shared memory when they fit.
Supported: bits ∈ {1, 2, 4, 8}, contiguous groups of whole words, integer or
half-integer zero points; `CudaA8Linear.supports` names anything else. The float
operations are those of `kernels.generic.activations.Arithmetic`, which the fallback's
fake-quantized input (`fake_quant_func`) shares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tvm import s_tir, te, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.cuda.linear import (
    SHARED_BYTES,
    codes_per_word,
    packed_words,
)
from lowbit.backends.tvm.kernels.cuda.linear import unsupported_reason as weight_reason
from lowbit.backends.tvm.kernels.generic.activations import (
    Arithmetic,
    fake_quant_compute,
    rounded_codes,
)
from lowbit.backends.tvm.kernels.generic.common import (
    divisor_at_most,
    finish,
    power_of_two_divisor,
)
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec, conv_epilogue
from lowbit.backends.tvm.kernels.spec import (
    KernelPlan,
    LinearKernel,
    PackedLinearSpec,
    Tensors,
)
from lowbit.ir.packing import default_zero

log = logging.getLogger(__name__)

KERNEL_NAME = "cuda_a8_linear"
#: Tuning space: ``threads`` lanes over (group, part) pairs, ``parts`` per group, ``vector``
#: words per load, ``rows`` outputs per block, ``m_tile`` rows of ``x`` per block.
KNOBS: dict[str, tuple[int, ...]] = {
    "threads": (16, 32, 64),
    "parts": (1, 2, 4, 8, 16, 32),
    "vector": (1, 2, 4),
    "rows": (1, 2, 4, 8),
    "m_tile": (1, 2, 4, 8, 16),
}
THREADS, VECTOR, ROWS, M_TILE = 32, 4, 4, 8
#: Threads of the per-row and elementwise activation kernels.
ACT_THREADS = 256


def unsupported_reason(spec: PackedLinearSpec, zeros: torch.Tensor | None = None) -> str | None:
    """Why ``spec`` (with these zero points) cannot run on the dp4a kernel, or None."""
    if spec.act_bits != 8:
        return f"the dp4a kernel takes int8 activations, not act_bits={spec.act_bits}"
    reason = weight_reason(spec)
    if reason is not None:
        return reason
    if zeros is not None and not torch.equal(zeros * 2, torch.round(zeros * 2)):
        return "zero points are not integers or half-integers; the integer dot product would be inexact"
    return None


class CudaA8Linear(LinearKernel):
    """The dp4a kernel of the module doc (int8 activations)."""

    name = KERNEL_NAME
    knobs = KNOBS

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        return unsupported_reason(spec, tensors.get("zeros"))

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule: a warp per output row, 16-byte loads, the fewest parts per group that fill the warp.

        (group, part) pairs are dealt to lanes evenly, so ``groups · parts`` should be a
        multiple of the warp: 86 groups (K = 11008, groups of 128) take 16 parts.
        """
        group_words = spec.group_size // codes_per_word(spec.bits)
        candidates = [p for p in KNOBS["parts"] if group_words % p == 0] or [1]
        parts = max(candidates, key=lambda p: (divisor_at_most(spec.groups * p, THREADS), -p))
        return {
            "threads": THREADS,
            "parts": parts,
            "vector": VECTOR,
            "rows": ROWS,
            "m_tile": max(v for v in KNOBS["m_tile"] if v <= min(spec.batch, M_TILE)),
        }

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """Constants, in order: the packed weight as int32 words ``(N, K / cw)``, ``scales (N, G)``,
        ``zz (N, G)`` int32 (only when some zero point is off-centre), the bias if present.
        A static activation step is folded into the kernel as a constant."""
        scales = tensors["scales"].to(torch.float32).contiguous()
        zz = off_centre(spec, scales.shape, tensors.get("zeros"))
        step = None if spec.act_dynamic else float(tensors["act_scale"])
        consts = [packed_words(tensors["qweight"]), scales]
        if zz is not None:
            consts.append(zz)
        if tensors.get("bias") is not None:
            consts.append(tensors["bias"].to(torch.float32).contiguous())
        func = cuda_a8_linear_func(spec, zz is not None, step, **knobs, compute=self.compute)
        return KernelPlan(func, consts, self.name, knobs)

    def compute(self, spec: PackedLinearSpec, has_zz: bool, step: float | None, parts: int) -> tirx.PrimFunc:
        """The unscheduled stages (`a8_linear_compute`): the input stage reads the rows of ``x``."""
        return a8_linear_compute(spec, has_zz, step, parts)


KERNEL = CudaA8Linear()


def centre(bits: int) -> int:
    """The code ``c`` subtracted from every weight byte before ``dp4a``: ``2^(bits−1)`` (0 for 1 bit).

    It is the symmetric zero point of 2- to 8-bit formats, so symmetric layers need no
    activation sums.
    """
    return 1 << (bits - 1) if bits >= 2 else 0


def off_centre(spec: PackedLinearSpec, shape: torch.Size, zeros: torch.Tensor | None) -> torch.Tensor | None:
    """``zz = 2·(zero − centre)`` as int32 ``(N, G)``, or None when it is zero everywhere."""
    zero = torch.full(shape, default_zero(spec.bits), dtype=torch.float64) if zeros is None else zeros.double()
    zz = torch.round(2 * (zero - centre(spec.bits))).to(torch.int32)
    return zz.contiguous() if bool(zz.any()) else None


def cuda_a8_linear_func(
    spec: PackedLinearSpec,
    has_zz: bool,
    step: float | None,
    threads: int = THREADS,
    parts: int = 1,
    vector: int = VECTOR,
    rows: int = ROWS,
    m_tile: int = M_TILE,
    compute: Callable[[PackedLinearSpec, bool, float | None, int], tirx.PrimFunc] | None = None,
) -> tirx.PrimFunc:
    """The scheduled PrimFunc: ``x (M, K)``, words, scales, [zz], [bias], output ``y (M, N)``; ``compute``
    (`a8_linear_compute` by default) builds its unscheduled stages from ``(spec, has_zz, step, parts)``."""
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(f"dp4a kernel cannot compute {spec}: {reason}")
    if spec.act_dynamic == (step is not None):
        raise ValueError("a static activation step is needed exactly when activations are not dynamic")
    group_words = spec.group_size // codes_per_word(spec.bits)
    parts = divisor_at_most(group_words, parts)
    sch = s_tir.Schedule((compute or a8_linear_compute)(spec, has_zz, step, parts))
    _schedule_activations(sch, spec.in_features, spec.act_dynamic, ["xq"] + (["asum"] if has_zz else []))
    _schedule_product(sch, spec, threads, parts, vector, rows, m_tile)
    return finish(sch.mod["main"], None)


def a8_linear_compute(
    spec: PackedLinearSpec, has_zz: bool, step: float | None, parts: int = 1, arith: Arithmetic | None = None
) -> tirx.PrimFunc:
    """The unscheduled stages of the module doc, arguments as in `cuda_a8_linear_func` (CUDA intrinsics by default)."""
    arith = arith or Arithmetic()
    x = te.placeholder((spec.batch, spec.in_features), "float32", name="x")
    scale, code = rounded_codes(x, step, arith)
    return packed_product_compute(spec, x, scale, code, has_zz, step, parts, arith)


def packed_product_compute(
    spec: PackedLinearSpec,
    x: te.Tensor,
    scale: te.Tensor | None,
    code: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr],
    has_zz: bool,
    step: float | None,
    parts: int,
    arith: Arithmetic,
) -> tirx.PrimFunc:
    """Stages 2–4 of the module doc on the int32 codes ``code(m, k)`` of row ``m`` of the input ``x`` (a linear
    layer's rows, or a convolution's patches read from its image), ``scale`` its per-row multiplier (dynamic)."""
    m_rows, n_out, k_in, bits = spec.batch, spec.out_features, spec.in_features, spec.bits
    cw, pb = codes_per_word(bits), 8 // bits
    words, groups = k_in // cw, spec.groups
    group_words = spec.group_size // cw
    if group_words % parts:
        raise ValueError(f"{parts} parts do not split a group of {group_words} words evenly")
    part_words = group_words // parts
    qwords = te.placeholder((n_out, words), "int32", name="qwords")
    scales = te.placeholder((n_out, groups), "float32", name="scales")
    zz = te.placeholder((n_out, groups), "int32", name="zz") if has_zz else None
    bias = te.placeholder((n_out,), "float32", name="bias") if spec.has_bias else None

    def packed(m: tirx.Var, w: tirx.Var, lane: tirx.Var) -> tirx.PrimExpr:
        value = tirx.const(0, "int32")
        for j in range(4):
            byte = tirx.bitwise_and(code(m, w * cw + j * pb + lane), 255)
            value = tirx.bitwise_or(value, tirx.shift_left(byte, 8 * j)) if j else byte
        return value

    xq = te.compute((m_rows, words, pb), packed, name="xq")
    asum = None
    if has_zz:
        kk = te.reduce_axis((0, spec.group_size), name="kk")
        asum = te.compute(
            (m_rows, groups), lambda m, g: te.sum(code(m, g * spec.group_size + kk), axis=kk), name="asum"
        )

    def lane_codes(n: tirx.PrimExpr, word: tirx.PrimExpr, lane: tirx.PrimExpr) -> tirx.PrimExpr:
        """Four codes of lane ``lane`` of a word, each byte ``q − c`` as a signed int8 (uint32 math: no overflow)."""
        value = qwords[n, word].astype("uint32")
        top = _bytes(0x80)
        if bits == 8:
            return tirx.bitwise_xor(value, top).astype("int32")
        value = tirx.bitwise_and(tirx.shift_right(value, (lane * bits).astype("uint32")), _bytes((1 << bits) - 1))
        if centre(bits):
            value = tirx.bitwise_xor(tirx.bitwise_or(value, top) - _bytes(centre(bits)), top)
        return value.astype("int32")

    wi = te.reduce_axis((0, part_words), name="wi")
    li = te.reduce_axis((0, pb), name="li")

    def part_sum(m: tirx.Var, n: tirx.Var, g: tirx.Var, p: tirx.Var) -> tirx.PrimExpr:
        word = g * group_words + p * part_words + wi
        return te.sum(arith.dp4a(xq[m, word, li], lane_codes(n, word, li)), axis=[wi, li])

    part = te.compute((m_rows, n_out, groups, parts), part_sum, name="part")
    pi = te.reduce_axis((0, parts), name="pi")
    isum = te.compute((m_rows, n_out, groups), lambda m, n, g: te.sum(part[m, n, g, pi], axis=pi), name="isum")

    def product(m: tirx.PrimExpr, n: tirx.PrimExpr, g: tirx.PrimExpr) -> tirx.PrimExpr:
        twice = isum[m, n, g] * 2
        if zz is not None:
            twice = twice - zz[n, g] * asum[m, g]
        acc = twice.astype("float32") * tirx.const(0.5, "float32")  # exact: a power-of-two rescale
        return arith.fmul(acc, scales[n, g])

    ordered_sum = te.comm_reducer(lambda a, b: arith.fadd(a, b), lambda dtype: tirx.const(0.0, dtype), name="fadd_rn")
    g_axis = te.reduce_axis((0, groups), name="g")
    y = te.compute((m_rows, n_out), lambda m, n: ordered_sum(product(m, n, g_axis), axis=g_axis), name="y")

    def finish_row(m: tirx.Var, n: tirx.Var) -> tirx.PrimExpr:
        value = arith.fdiv(y[m, n], scale[m]) if scale is not None else arith.fmul(y[m, n], tirx.const(step, "float32"))
        value = arith.fadd(value, bias[n]) if bias is not None else value
        return conv_epilogue(spec, value, None) if isinstance(spec, ConvSpec) else value

    out = te.compute((m_rows, n_out), finish_row, name="out")
    args = [x, qwords, scales] + [t for t in (zz, bias) if t is not None]
    return te.create_prim_func([*args, out])


def fake_quant_func(batch: int, in_features: int, step: float | None) -> tirx.PrimFunc:
    """`kernels.generic.activations.fake_quant_compute` in CUDA intrinsics, scheduled on the GPU: the fallback's
    input for layers the dp4a kernel cannot take.

    They multiply ``x̂`` by their dequantized weight, which equals the reference up to
    float32 rounding.
    """
    sch = s_tir.Schedule(fake_quant_compute(batch, in_features, step))
    _schedule_activations(sch, in_features, step is None, ["xhat"])
    return finish(sch.mod["main"], None)


def _bytes(value: int) -> tirx.PrimExpr:
    """``value`` in each of the four bytes of a uint32."""
    return tirx.const(int.from_bytes(bytes([value] * 4), "little"), "uint32")


def _schedule_activations(sch: s_tir.Schedule, in_features: int, dynamic: bool, elementwise: list[str]) -> None:
    """The per-row scale (a block per row, shuffle reduction), then each ``elementwise`` block over a 1-D grid."""
    if dynamic:
        absmax = sch.get_sblock("absmax")
        scale = sch.get_sblock("act_scale")
        (m,) = sch.get_loops(scale)
        sch.bind(m, "blockIdx.x")
        sch.compute_at(absmax, m, preserve_unit_loops=True)
        sch.set_scope(absmax, 0, "shared")
        k = sch.get_loops(absmax)[-1]
        _, k_thread = sch.split(k, factors=[None, min(ACT_THREADS, in_features)])
        sch.bind(k_thread, "threadIdx.x")
    for name in elementwise:
        block = sch.get_sblock(name)
        info = sch.get(block)
        spatial = sch.get_loops(block)[: sum(1 for var in info.iter_vars if var.iter_type == 0)]
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        bx, tx = sch.split(fused, factors=[None, min(ACT_THREADS, _extent(sch, fused))])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")


def _schedule_product(
    sch: s_tir.Schedule, spec: PackedLinearSpec, threads: int, parts: int, vector: int, rows: int, m_tile: int
) -> None:
    """Kernel 4 (see the module doc)."""
    group_words = spec.group_size // codes_per_word(spec.bits)
    part_words = group_words // parts
    vector = power_of_two_divisor(part_words, vector)
    lanes = spec.groups * parts
    threads = divisor_at_most(lanes, threads)
    rows = divisor_at_most(spec.out_features, rows)
    m_tile = divisor_at_most(spec.batch, m_tile)

    out = sch.get_sblock("out")
    m, n = sch.get_loops(out)
    m_outer, m_inner = sch.split(m, factors=[None, m_tile])
    n_outer, n_inner = sch.split(n, factors=[None, rows])
    sch.reorder(n_outer, m_outer, n_inner, m_inner)
    sch.bind(n_outer, "blockIdx.x")
    sch.bind(m_outer, "blockIdx.y")
    sch.bind(n_inner, "threadIdx.y")

    y, isum, part = sch.get_sblock("y"), sch.get_sblock("isum"), sch.get_sblock("part")
    sch.compute_at(y, n_inner, preserve_unit_loops=True)
    sch.set_scope(y, 0, "local")
    sch.compute_at(isum, sch.get_loops(y)[-1], preserve_unit_loops=True)  # inside the ordered group loop
    sch.set_scope(isum, 0, "local")
    sch.compute_at(part, n_inner, preserve_unit_loops=True)
    sch.set_scope(part, 0, "shared")

    p_m, _, p_g, p_p, p_w, p_l = sch.get_loops(part)[-6:]
    fused = sch.fuse(p_g, p_p)
    lane_outer, lane = sch.split(fused, factors=[None, threads])
    w_outer, w_vec = sch.split(p_w, factors=[None, vector])
    sch.reorder(lane, lane_outer, w_outer, w_vec, p_l, p_m)
    sch.bind(lane, "threadIdx.x")
    sch.unroll(p_l)
    sch.unroll(p_m)
    to_shared = sch.cache_write(part, 0, "local")  # accumulate in registers, store once
    sch.reverse_compute_at(to_shared, lane_outer, preserve_unit_loops=True)
    words_local = sch.cache_read(part, 1, "local")
    sch.compute_at(words_local, w_outer, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(words_local)[-1])

    if m_tile * spec.in_features <= SHARED_BYTES:  # the block's packed activations: m_tile · K/4 words
        xq_shared = sch.cache_read(part, 0, "shared")
        sch.compute_at(xq_shared, n_inner, preserve_unit_loops=True)
        loops = sch.get_loops(xq_shared)
        fused = sch.fuse(*loops[-3:])
        _, ty, tx = sch.split(fused, factors=[None, rows, threads])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
    sch.decompose_reduction(part, w_outer)
    log.debug(
        "CUDA dp4a linear %s: threads=%d parts=%d vector=%d rows=%d m_tile=%d",
        spec,
        threads,
        parts,
        vector,
        rows,
        m_tile,
    )


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int:
    return int(sch.get(loop).extent)


__all__ = [
    "KERNEL",
    "KERNEL_NAME",
    "KNOBS",
    "CudaA8Linear",
    "a8_linear_compute",
    "centre",
    "cuda_a8_linear_func",
    "fake_quant_func",
    "off_centre",
    "packed_product_compute",
    "unsupported_reason",
]
