"""Integer kernel for ``torch.ops.lowbit.linear_packed_a8`` on aarch64 (W2A8, W4A8, W1.58A8, W8A8).

The reference (`lowbit.ir.ops_a8`) quantizes the input to int8 and multiplies it by
the integer codes group by group; this kernel computes the same values in the same
order, with integer arithmetic where the reference is exact:

1. ``x_int`` per row: dynamic ``s = 127 / max(max_k |x|, 2⁻¹¹⁹)`` (a true division),
   ``x_int = clamp(nearbyint(x · s), −128, 127)``; static ``x_int = clamp(nearbyint(x /
   Δ), −128, 127)``. ``asum[m, g] = Σ_{k∈g} x_int`` is kept for the zero points.
2. ``dot[m, g, n] = Σ_{k∈g} x_int · c`` in int32 with the NEON ``sdot`` intrinsic of
   `kernels.arm.intrin` (4 output rows × 4 columns per call), where ``c = q − o`` are the codes
   as int8: ``o = 128`` for 8-bit codes (``q ∈ [0, 255]`` does not fit int8), ``o = 0``
   otherwise. The zero point is removed algebraically, ``Σ x_int · (q − z) = dot − (z −
   o) · asum`` (exact in int32; for the symmetric 8-bit default ``z = o = 128``).
3. ``acc[m, n] = Σ_g float32(dot − (z − o)·asum) · scale[n, g]``, groups in increasing
   order (float32 of an int32 rounds like the reference's float64 → float32; each product is `fenced` from
   its sum).
4. ``y = acc / s`` (dynamic) or ``acc · Δ`` (static), then (`fenced`) ``+ bias`` (a convolution: then the steps
   of its epilogue, `conv.conv_epilogue`, in the same vectors of output rows).

Weight layout, made at lowering time from the project's packed rows: output rows in
tiles of 4 and input columns in quads of 4; one 16-byte word holds, for one tile, ``pb
= 8 // bits`` consecutive quads, quad ``l`` in bits ``[l·bits, (l+1)·bits)`` of every
byte, byte ``4·i + c`` for row ``i`` and column ``c``. So one 16-byte load, a shift and
a mask give the 4×4 codes one ``sdot`` takes (``pb`` calls per load). 8-bit words hold
``q − 128`` as int8 bytes. Scales and zero points are transposed to ``(G, N)`` so the
epilogue runs along output rows in vectors of 4.

Schedule: parallel tasks of ``out_tile`` output rows; inside, each task runs all rows
of ``x`` in register tiles of ``row_tile`` (one unpacked code vector feeds ``row_tile``
accumulators) over ``row_vectors`` 4-row weight tiles at once (independent accumulator
chains; NEON has 32 vector registers). Ternary (W1.58) weights are 2-bit codes and run
as W2A8. Anything else (g_idx, 1 or 3 bits, ragged groups, ``N`` not a multiple of 4,
fractional zero points, a target without the dot-product extension) gets a reason
from `ArmA8Linear.supports`, and the lowering uses its fallback.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tvm import s_tir, te, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.arm import intrin as intrin_arm
from lowbit.backends.tvm.kernels.generic import activations
from lowbit.backends.tvm.kernels.generic.activations import (
    activation_codes,
    layout_reason,
    zeros_reason,
)
from lowbit.backends.tvm.kernels.generic.common import (
    divisor_at_most,
    fenced,
    finish,
    loops_below,
    power_of_two_divisor,
)
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec, conv_epilogue, quantized_input, schedule_patches
from lowbit.backends.tvm.kernels.spec import (
    KernelPlan,
    LinearKernel,
    PackedLinearSpec,
    Tensors,
)
from lowbit.backends.tvm.target import has_features, target_arch
from lowbit.errors import BackendError
from lowbit.ir import packing

log = logging.getLogger(__name__)

KERNEL_NAME = "a8_linear_arm"
KERNEL_BITS: tuple[int, ...] = (2, 4, 8)
ROWS, COLUMNS = intrin_arm.ROWS, intrin_arm.COLUMNS
MMLA_ROWS, MMLA_COLUMNS = intrin_arm.MMLA_ROWS, intrin_arm.MMLA_COLUMNS
#: Bytes of one interleaved weight word (one NEON register).
WORD_BYTES = ROWS * COLUMNS
#: Tuning space: ``row_tile`` rows of ``x`` share each unpacked code vector; ``out_tile``
#: output rows (a multiple of 4) per parallel task; ``row_vectors`` weight tiles (4 rows
#: for ``sdot``, 2 for ``smmla``) computed together (independent accumulator chains);
#: ``i8mm`` 1 uses ``smmla`` (targets with ``+i8mm``, an even number of rows), 0 ``sdot``.
KNOBS: dict[str, tuple[int, ...]] = {
    "row_tile": (1, 2, 4, 8),
    "out_tile": (4, 8, 16, 32, 64, 128),
    "row_vectors": (1, 2, 4, 8),
    "i8mm": (0, 1),
}


def code_offset(bits: int) -> int:
    """``o``: what the int8 codes ``q − o`` subtract so that they fit int8 (128 for 8 bits, else 0)."""
    return 128 if bits == 8 else 0


def unsupported_reason(spec: PackedLinearSpec) -> str | None:
    """Why the integer kernel cannot compute ``spec`` (the shape and format alone), or None."""
    return layout_reason(spec, "ARM int8 kernel", KERNEL_BITS, ROWS, COLUMNS)


def word_columns(bits: int) -> int:
    """Input columns one interleaved 16-byte word covers: ``4 · (8 // bits)``."""
    return activations.word_columns(bits, COLUMNS)


class ArmA8Linear(LinearKernel):
    """The int8-activation kernel of the module doc, for aarch64 LLVM targets with the dot-product extension."""

    name = KERNEL_NAME
    knobs = KNOBS
    convolutions = True
    epilogues = True

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        return (
            unsupported_reason(spec) or _target_reason(target) or zeros_reason(tensors.get("zeros"), "ARM int8 kernel")
        )

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule: 4 accumulator chains for GEMV (1 row × 4 weight tiles), 4 rows × 2 tiles for GEMM;
        tasks of ≤ 32 rows.

        GEMM on a target with i8mm uses ``smmla`` (4 rows × 4 two-row tiles: 8 accumulators) where
        its words fit the groups, else ``sdot``.
        """
        rows = max(v for v in KNOBS["row_tile"] if v <= min(spec.batch, 4))
        tile = max(v for v in KNOBS["out_tile"] if v <= 32 and spec.out_features % v == 0)
        i8mm = int(_i8mm_reason(spec, target) is None)
        return {"row_tile": rows, "out_tile": tile, "row_vectors": 4 if rows == 1 or i8mm else 2, "i8mm": i8mm}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """The constants are, in order: interleaved int8 codes, scales ``(G, N)``, zero points minus the code
        offset ``(G, N)`` int32, [bias], [the static step ``Δ`` as a 1-element array]."""
        if spec.out_features % knobs["out_tile"] or knobs["out_tile"] % ROWS:
            raise BackendError(
                f"out_tile={knobs['out_tile']} does not tile out_features={spec.out_features} in rows of {ROWS}"
            )
        if knobs["i8mm"] > 1:
            raise BackendError(f"knob i8mm is 0 (sdot) or 1 (smmla), got {knobs['i8mm']}")
        if knobs["i8mm"]:
            reason = _i8mm_reason(spec, target)
            if reason is not None:
                raise BackendError(reason)
            func = a8_linear_arm_i8mm_func(spec, knobs["row_tile"], knobs["out_tile"], knobs["row_vectors"])
        else:
            func = a8_linear_arm_func(spec, knobs["row_tile"], knobs["out_tile"], knobs["row_vectors"])
        scales = tensors["scales"].to(torch.float32)
        zeros = tensors.get("zeros")
        zeros = torch.full_like(scales, packing.default_zero(spec.bits)) if zeros is None else zeros.to(torch.float32)
        words = interleave(
            tensors["qweight"],
            spec.bits,
            spec.in_features,
            *((MMLA_ROWS, MMLA_COLUMNS) if knobs["i8mm"] else (ROWS, COLUMNS)),
        )
        consts = [words, scales.t().contiguous(), (zeros - code_offset(spec.bits)).t().to(torch.int32).contiguous()]
        if tensors.get("bias") is not None:
            consts.append(tensors["bias"].to(torch.float32).contiguous())
        if not spec.act_dynamic:
            consts.append(tensors["act_scale"].to(torch.float32).reshape(1))
        return KernelPlan(func, consts, KERNEL_NAME, knobs)


KERNEL = ArmA8Linear()


def interleave(
    qweight: torch.Tensor, bits: int, in_features: int, rows: int = ROWS, columns: int = COLUMNS
) -> torch.Tensor:
    """Packed rows ``(N, row_bytes)`` → words ``(N/rows, K/(columns·pb), 16)`` of the module doc (8-bit:
    ``q − 128``).

    ``sdot`` words are 4 rows × 4 columns per code lane, ``smmla`` words 2 rows × 8 columns.
    """
    codes = packing.unpack(qweight, bits, in_features).to(torch.int32)
    if bits == 8:
        codes = codes ^ 0x80  # the byte of the int8 value q − 128
    n_out, pb = codes.shape[0], 8 // bits
    # [tile, row, word, lane-in-word, column] → [tile, word, lane-in-word, row, column]
    blocks = codes.reshape(n_out // rows, rows, in_features // (columns * pb), pb, columns).permute(0, 2, 3, 1, 4)
    shifts = (torch.arange(pb, dtype=torch.int32) * bits).reshape(1, 1, pb, 1, 1)
    words = (blocks << shifts).sum(dim=2)
    return words.reshape(n_out // rows, -1, WORD_BYTES).to(torch.uint8).contiguous()


def a8_linear_arm_func(
    spec: PackedLinearSpec, row_tile: int, out_tile: int, row_vectors: int, name: str | None = None
) -> tirx.PrimFunc:
    """The scheduled PrimFunc; arguments ``x (M, K) f32``, the constants of `plan`, output ``y (M, N) f32``."""
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(f"ARM int8 kernel cannot compute {spec}: {reason}")
    intrin_arm.register()
    sch = s_tir.Schedule(a8_linear_arm_compute(spec))
    # Tensorize needs whole tiles: the row tile divides the batch, the weight tiles divide the task.
    rows = divisor_at_most(spec.batch, row_tile)
    vectors = divisor_at_most(out_tile // ROWS, row_vectors)
    _schedule(sch, spec, rows, out_tile, vectors)
    log.debug("scheduled %s: row_tile=%d, out_tile=%d, row_vectors=%d", spec, rows, out_tile, vectors)
    return finish(sch.mod["main"], name)


def a8_linear_arm_compute(spec: PackedLinearSpec) -> tirx.PrimFunc:
    """The unscheduled computation (stages of the module doc)."""
    m_rows, k_in, n_out, bits = spec.batch, spec.in_features, spec.out_features, spec.bits
    group, groups, pb = spec.group_size, spec.groups, 8 // bits
    quads = group // COLUMNS  # column quads per group
    words = te.placeholder((n_out // ROWS, k_in // (COLUMNS * pb), WORD_BYTES), "uint8", name="words")
    scales = te.placeholder((groups, n_out), "float32", name="scales")
    zeros = te.placeholder((groups, n_out), "int32", name="zeros")
    bias = te.placeholder((n_out,), "float32", name="bias") if spec.has_bias else None
    step = None if spec.act_dynamic else te.placeholder((1,), "float32", name="act_scale")

    x, xq, mult = quantized_input(spec, step, tirx.nearbyint)
    kg = te.reduce_axis((0, group), name="kg")
    asum = te.compute(
        (m_rows, groups), lambda m, g: te.sum(xq[m, g * group + kg].astype("int32"), axis=kg), name="asum"
    )
    codes = te.compute(
        (n_out // ROWS, k_in // COLUMNS, ROWS, COLUMNS),
        lambda t, q, i, c: tirx.bitwise_and(
            tirx.shift_right(words[t, q // pb, i * COLUMNS + c], ((q % pb) * bits).astype("uint8")),
            tirx.const((1 << bits) - 1, "uint8"),
        ).astype("int8"),
        name="codes",
    )
    w = te.reduce_axis((0, quads // pb), name="w")
    lane = te.reduce_axis((0, pb), name="l")
    c = te.reduce_axis((0, COLUMNS), name="c")
    dot = te.compute(
        (m_rows, groups, n_out // ROWS, ROWS),
        lambda m, g, t, i: te.sum(
            xq[m, g * group + (w * pb + lane) * COLUMNS + c].astype("int32")
            * codes[t, g * quads + w * pb + lane, i, c].astype("int32"),
            axis=[w, lane, c],
        ),
        name="dot",
    )

    def centered(m: tirx.Var, g: tirx.Var, t: tirx.Var, i: tirx.Var) -> tirx.PrimExpr:
        return fenced(
            (dot[m, g, t, i] - zeros[g, t * ROWS + i] * asum[m, g]).astype("float32") * scales[g, t * ROWS + i]
        )

    g_axis = te.reduce_axis((0, groups), name="g")
    acc = te.compute(
        (m_rows, n_out // ROWS, ROWS), lambda m, t, i: te.sum(centered(m, g_axis, t, i), axis=g_axis), name="acc"
    )

    y = te.compute(
        (m_rows, n_out), _epilogue(spec, lambda m, n: acc[m, n // ROWS, n % ROWS], mult, step, bias), name="y"
    )
    args = [x, words, scales, zeros] + [t for t in (bias, step) if t is not None] + [y]
    return te.create_prim_func(args)


def _epilogue(
    spec: PackedLinearSpec, acc: Any, mult: te.Tensor | None, step: te.Tensor | None, bias: te.Tensor | None
) -> Any:
    """Step 4: ``y[m, n]`` from the float32 accumulator ``acc(m, n)``, the rescale `fenced` from the bias; a
    convolution's bias and epilogue steps by `conv_epilogue`."""

    def output(m: tirx.Var, n: tirx.Var) -> tirx.PrimExpr:
        value = acc(m, n)
        value = value / mult[m] if step is None else value * step[0]
        if isinstance(spec, ConvSpec):
            return conv_epilogue(spec, value, bias[n] if bias is not None else None)
        return fenced(value) + bias[n] if bias is not None else value

    return output


def a8_linear_arm_i8mm_func(
    spec: PackedLinearSpec, row_tile: int, out_tile: int, row_vectors: int, name: str | None = None
) -> tirx.PrimFunc:
    """The ``smmla`` variant (even batch): same arguments as `a8_linear_arm_func`, 2×8 code words."""
    reason = unsupported_reason(spec) or (None if spec.batch % 2 == 0 else "i8mm takes rows of x in pairs")
    if reason is not None:
        raise ValueError(f"ARM i8mm kernel cannot compute {spec}: {reason}")
    intrin_arm.register()
    sch = s_tir.Schedule(a8_linear_arm_i8mm_compute(spec))
    rows = max(d for d in range(2, max(row_tile, 2) + 1, 2) if spec.batch % d == 0)
    vectors = divisor_at_most(out_tile // MMLA_ROWS, row_vectors)
    _schedule_i8mm(sch, spec, rows, out_tile, vectors)
    log.debug("scheduled %s with i8mm: row_tile=%d, out_tile=%d, row_vectors=%d", spec, rows, out_tile, vectors)
    return finish(sch.mod["main"], name)


def a8_linear_arm_i8mm_compute(spec: PackedLinearSpec) -> tirx.PrimFunc:
    """Stages of the module doc with ``smmla`` tiles: x_int in 2×8 blocks ``xqp[m/2, k/8, 2, 8]``, dot in 2×2
    blocks."""
    m_rows, k_in, n_out, bits = spec.batch, spec.in_features, spec.out_features, spec.bits
    group, groups, pb = spec.group_size, spec.groups, 8 // bits
    octets = group // MMLA_COLUMNS  # 8-column blocks per group
    x = te.placeholder((m_rows, k_in), "float32", name="x")
    words = te.placeholder((n_out // MMLA_ROWS, k_in // (MMLA_COLUMNS * pb), WORD_BYTES), "uint8", name="words")
    scales = te.placeholder((groups, n_out), "float32", name="scales")
    zeros = te.placeholder((groups, n_out), "int32", name="zeros")
    bias = te.placeholder((n_out,), "float32", name="bias") if spec.has_bias else None
    step = None if spec.act_dynamic else te.placeholder((1,), "float32", name="act_scale")

    quantize, mult = activation_codes(x, step)
    xqp = te.compute(
        (m_rows // 2, k_in // MMLA_COLUMNS, 2, MMLA_COLUMNS),
        lambda mp, kb, mi, kk: quantize(mp * 2 + mi, kb * MMLA_COLUMNS + kk),
        name="xqp",
    )
    kg = te.reduce_axis((0, group), name="kg")
    asum = te.compute(
        (m_rows, groups),
        lambda m, g: te.sum(
            xqp[m // 2, (g * group + kg) // MMLA_COLUMNS, m % 2, (g * group + kg) % MMLA_COLUMNS].astype("int32"),
            axis=kg,
        ),
        name="asum",
    )
    codes = te.compute(
        (n_out // MMLA_ROWS, k_in // MMLA_COLUMNS, MMLA_ROWS, MMLA_COLUMNS),
        lambda t, o, i, c: tirx.bitwise_and(
            tirx.shift_right(words[t, o // pb, i * MMLA_COLUMNS + c], ((o % pb) * bits).astype("uint8")),
            tirx.const((1 << bits) - 1, "uint8"),
        ).astype("int8"),
        name="codes",
    )
    w = te.reduce_axis((0, octets // pb), name="w")
    lane = te.reduce_axis((0, pb), name="l")
    c = te.reduce_axis((0, MMLA_COLUMNS), name="c")
    dot = te.compute(
        (m_rows // 2, groups, n_out // MMLA_ROWS, 2, MMLA_ROWS),
        lambda mp, g, t, mi, i: te.sum(
            xqp[mp, g * octets + w * pb + lane, mi, c].astype("int32")
            * codes[t, g * octets + w * pb + lane, i, c].astype("int32"),
            axis=[w, lane, c],
        ),
        name="dot",
    )

    def centered(mp: tirx.Var, g: tirx.Var, t: tirx.Var, mi: tirx.Var, i: tirx.Var) -> tirx.PrimExpr:
        n = t * MMLA_ROWS + i
        return fenced((dot[mp, g, t, mi, i] - zeros[g, n] * asum[mp * 2 + mi, g]).astype("float32") * scales[g, n])

    g_axis = te.reduce_axis((0, groups), name="g")
    acc = te.compute(
        (m_rows // 2, n_out // MMLA_ROWS, 2, MMLA_ROWS),
        lambda mp, t, mi, i: te.sum(centered(mp, g_axis, t, mi, i), axis=g_axis),
        name="acc",
    )
    y = te.compute(
        (m_rows, n_out),
        _epilogue(spec, lambda m, n: acc[m // 2, n // MMLA_ROWS, m % 2, n % MMLA_ROWS], mult, step, bias),
        name="y",
    )
    args = [x, words, scales, zeros] + [t for t in (bias, step) if t is not None] + [y]
    return te.create_prim_func(args)


def _schedule(sch: s_tir.Schedule, spec: PackedLinearSpec, row_tile: int, out_tile: int, row_vectors: int) -> None:
    """Parallel output tasks, register tiles of rows × 4-row weight tiles, the ``sdot`` intrinsic."""
    y, acc, dot, codes = (sch.get_sblock(name) for name in ("y", "acc", "dot", "codes"))
    m, n = sch.get_loops(y)
    n_task, n_tile, n_vec, n_lane = sch.split(n, factors=[None, out_tile // (ROWS * row_vectors), row_vectors, ROWS])
    m_outer, m_inner = sch.split(m, factors=[None, row_tile])
    sch.reorder(n_task, n_tile, m_outer, m_inner, n_vec, n_lane)
    sch.parallel(n_task)
    sch.vectorize(n_lane)
    sch.unroll(m_inner)
    sch.unroll(n_vec)

    sch.compute_at(acc, m_outer, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    a_m, a_t, a_i, a_g = loops_below(sch, acc, m_outer)
    sch.reorder(a_g, a_m, a_t, a_i)
    sch.compute_at(dot, a_g, preserve_unit_loops=True)
    sch.set_scope(dot, 0, "local")
    d_m, _, d_t, d_i, d_w, d_l, d_c = loops_below(sch, dot, a_g)
    sch.reorder(d_w, d_l, d_m, d_t, d_i, d_c)
    sch.compute_at(codes, d_l, preserve_unit_loops=True)
    sch.set_scope(codes, 0, "local")
    c_i, c_c = sch.get_loops(codes)[-2:]
    sch.vectorize(sch.fuse(c_i, c_c))
    sch.unroll(sch.get_loops(codes)[-3])

    init = sch.decompose_reduction(dot, d_w)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(d_i, intrin_arm.SDOT)
    sch.unroll(d_m)
    sch.unroll(d_t)
    sch.unroll(d_l)

    sch.unroll(a_t)
    sch.vectorize(a_i)
    sch.unroll(a_m)
    acc_init = sch.decompose_reduction(acc, a_g)
    sch.vectorize(sch.get_loops(acc_init)[-1])

    if isinstance(spec, ConvSpec):
        schedule_patches(sch, spec)
        return
    xq = sch.get_sblock("xq")
    k_inner = sch.split(sch.get_loops(xq)[-1], factors=[None, power_of_two_divisor(spec.in_features, 16)])[-1]
    sch.vectorize(k_inner)


def _schedule_i8mm(sch: s_tir.Schedule, spec: PackedLinearSpec, row_tile: int, out_tile: int, row_vectors: int) -> None:
    """Parallel output tasks, pairs of rows × 2-row weight tiles, the ``smmla`` intrinsic."""
    y, acc, dot, codes = (sch.get_sblock(name) for name in ("y", "acc", "dot", "codes"))
    m, n = sch.get_loops(y)
    n_task, n_tile, n_vec, n_lane = sch.split(
        n, factors=[None, out_tile // (MMLA_ROWS * row_vectors), row_vectors, MMLA_ROWS]
    )
    m_outer, m_inner = sch.split(m, factors=[None, row_tile])
    sch.reorder(n_task, n_tile, m_outer, m_inner, n_vec, n_lane)
    sch.parallel(n_task)
    sch.unroll(m_inner)
    sch.unroll(n_vec)

    sch.compute_at(acc, m_outer, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    a_mp, a_t, a_mi, a_i, a_g = loops_below(sch, acc, m_outer)
    sch.reorder(a_g, a_mp, a_t, a_mi, a_i)
    sch.compute_at(dot, a_g, preserve_unit_loops=True)
    sch.set_scope(dot, 0, "local")
    d_mp, _, d_t, d_mi, d_i, d_w, d_l, d_c = loops_below(sch, dot, a_g)
    sch.reorder(d_w, d_l, d_mp, d_t, d_mi, d_i, d_c)
    sch.compute_at(codes, d_l, preserve_unit_loops=True)
    sch.set_scope(codes, 0, "local")
    c_i, c_c = sch.get_loops(codes)[-2:]
    sch.vectorize(sch.fuse(c_i, c_c))
    sch.unroll(sch.get_loops(codes)[-3])

    init = sch.decompose_reduction(dot, d_w)
    sch.vectorize(sch.fuse(*sch.get_loops(init)[-2:]))
    sch.tensorize(d_mi, intrin_arm.I8MM)
    sch.unroll(d_mp)
    sch.unroll(d_t)
    sch.unroll(d_l)

    sch.unroll(a_mp)
    sch.unroll(a_t)
    sch.vectorize(sch.fuse(a_mi, a_i))
    acc_init = sch.decompose_reduction(acc, a_g)
    sch.vectorize(sch.fuse(*sch.get_loops(acc_init)[-2:]))

    xqp = sch.get_sblock("xqp")
    sch.vectorize(sch.fuse(*sch.get_loops(xqp)[-2:]))


def _target_reason(target: Target) -> str | None:
    if target.kind.name != "llvm" or target_arch(target) != "aarch64":
        return f"the ARM int8 kernel needs an aarch64 LLVM target, got {target}"
    if not has_features(target, "dotprod"):
        return "the ARM int8 kernel needs the dot-product extension (add '+dotprod' to the target's mattr)"
    return None


def _i8mm_reason(spec: PackedLinearSpec, target: Target) -> str | None:
    if isinstance(spec, ConvSpec):
        return "knob i8mm=1 reads rows of x in pairs, not a convolution's patches (sdot takes them)"
    if not has_features(target, "i8mm"):
        return "knob i8mm=1 needs the int8 matrix-multiply extension (add '+i8mm' to the target's mattr)"
    if spec.batch % 2:
        return f"knob i8mm=1 takes rows of x in pairs; batch={spec.batch} is odd"
    if spec.group_size % (MMLA_COLUMNS * (8 // spec.bits)):
        return f"group_size={spec.group_size} is not a multiple of {MMLA_COLUMNS * (8 // spec.bits)} (an i8mm word)"
    return None


__all__ = [
    "KERNEL",
    "KERNEL_BITS",
    "KERNEL_NAME",
    "KNOBS",
    "ArmA8Linear",
    "a8_linear_arm_compute",
    "a8_linear_arm_func",
    "a8_linear_arm_i8mm_compute",
    "a8_linear_arm_i8mm_func",
    "code_offset",
    "interleave",
    "unsupported_reason",
    "word_columns",
]
