"""Int8 activations as `lowbit.ir.ops_a8` defines them (dynamic per token or a static step), for every kernel.

The CPU int8 kernels (x86, ARM) share their layout checks and `activation_codes`. `fake_quant_compute` is the
fake-quantized input ``x̂`` that the fallbacks of int8-activation layers multiply by the dequantized weight, on
CPU and CUDA alike; it is written in an `Arithmetic` (CUDA's explicitly rounded intrinsics, or `PlainArithmetic`:
the same IEEE operations in plain TIR), so it equals the reference bit for bit on either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tvm import s_tir, te, tirx

from lowbit.backends.tvm.kernels.generic.common import finish, power_of_two_divisor
from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.ir.ops_a8 import ACT_ABSMAX_FLOOR, ACT_QMAX, ACT_QMIN


def layout_reason(
    spec: PackedLinearSpec, kernel: str, kernel_bits: tuple[int, ...], rows: int, columns: int
) -> str | None:
    """Why ``kernel`` (its name in messages) cannot compute ``spec`` (shape and format alone), or None."""
    if spec.act_bits != 8:
        return f"the {kernel} needs 8-bit activations, got act_bits={spec.act_bits}"
    if getattr(spec, "conv_groups", 1) != 1:
        return f"the {kernel} computes ungrouped convolutions only ({spec.conv_groups} groups)"
    if spec.bits not in kernel_bits:
        return f"{spec.bits}-bit codes are not handled by the {kernel} (it takes {kernel_bits} bits)"
    if spec.has_g_idx:
        return f"act-order g_idx permutes groups; the {kernel} needs contiguous groups"
    if spec.out_features % rows:
        return f"out_features={spec.out_features} is not a multiple of {rows} (the {kernel}'s row tile)"
    if spec.in_features % spec.group_size:
        return f"in_features={spec.in_features} is not a multiple of group_size={spec.group_size}"
    width = word_columns(spec.bits, columns)
    if spec.group_size % width:
        return (
            f"group_size={spec.group_size} is not a multiple of {width} "
            f"(the columns of one {spec.bits}-bit weight word)"
        )
    return None


def word_columns(bits: int, columns: int) -> int:
    """Input columns one interleaved word covers: ``columns · (8 // bits)`` codes per row."""
    return columns * (8 // bits)


def zeros_reason(zeros: torch.Tensor | None, kernel: str) -> str | None:
    """Why integer arithmetic cannot remove these zero points (fractional ones), or None."""
    if zeros is not None and not torch.equal(zeros, zeros.round()):
        return f"fractional zero points: the {kernel} removes integer zero points in int32"
    return None


def static_or_symbolic(extent: tirx.PrimExpr) -> int | tirx.PrimExpr:
    """A buffer's extent as an int when static, else the symbolic expression (a row count known at run time)."""
    return int(extent) if isinstance(extent, tirx.IntImm) else extent


def activation_codes(
    x: te.Tensor, step: te.Tensor | None, rint: Callable[[tirx.PrimExpr], tirx.PrimExpr] = tirx.nearbyint
) -> tuple[Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr], te.Tensor | None]:
    """The int8 code of ``x[m, k]`` as an expression builder, and the per-row multiplier ``s`` (None when static).

    ``rint`` rounds half to even: ``tirx.nearbyint``, or on LLVM CPU targets ``tirx.round`` (it lowers to the
    same ``llvm.nearbyint``, and TVM vectorizes it where it scalarizes ``nearbyint``).
    """
    m_rows, k_in = static_or_symbolic(x.shape[0]), int(x.shape[1])
    mult = None
    if step is None:
        k = te.reduce_axis((0, k_in), name="k")
        absmax = te.compute((m_rows,), lambda m: te.max(tirx.abs(x[m, k]), axis=k), name="absmax")
        mult = te.compute(
            (m_rows,),
            lambda m: tirx.const(127.0, "float32") / tirx.max(absmax[m], tirx.const(ACT_ABSMAX_FLOOR, "float32")),
            name="mult",
        )

    def code(m: tirx.PrimExpr, kk: tirx.PrimExpr) -> tirx.PrimExpr:
        scaled = x[m, kk] * mult[m] if step is None else x[m, kk] / step[0]
        return tirx.max(tirx.min(rint(scaled), float(ACT_QMAX)), float(ACT_QMIN)).astype("int8")

    return code, mult


class Arithmetic:
    """The rounded float operations and ``dp4a`` the CUDA kernels are written in, as CUDA intrinsics.

    `PlainArithmetic` spells the same operations in plain TIR, for CPUs (and to check a
    CUDA computation against the torch reference where no GPU is available).
    """

    def fmul(self, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.call_pure_extern("float32", "__fmul_rn", a, b)

    def fadd(self, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.call_pure_extern("float32", "__fadd_rn", a, b)

    def fdiv(self, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.call_pure_extern("float32", "__fdiv_rn", a, b)

    def rint(self, a: tirx.PrimExpr) -> tirx.PrimExpr:
        """float32 → int32, rounding half to even."""
        return tirx.call_pure_extern("int32", "__float2int_rn", a)

    def dp4a(self, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
        """Σ of the four products of the signed bytes of ``a`` and ``b``."""
        return tirx.call_pure_extern("int32", "__dp4a", a, b, tirx.const(0, "int32"))


class PlainArithmetic(Arithmetic):
    """`Arithmetic` in ordinary TIR operations (IEEE float32 on CPUs, bytes sign-extended by shifts)."""

    def fmul(self, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
        return a * b

    def fadd(self, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
        return a + b

    def fdiv(self, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
        return a / b

    def rint(self, a: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.nearbyint(a).astype("int32")

    def dp4a(self, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
        total = tirx.const(0, "int32")
        for j in range(4):
            total = total + _signed_byte(a, j) * _signed_byte(b, j)
        return total


def _signed_byte(value: tirx.PrimExpr, j: int) -> tirx.PrimExpr:
    return tirx.shift_right(tirx.shift_left(value, 24 - 8 * j), 24)


def rounded_codes(
    x: te.Tensor, step: float | None, arith: Arithmetic
) -> tuple[te.Tensor | None, Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]]:
    """The reference's step 1 in ``arith``: the per-row scale stage ``act_scale`` (dynamic only) and ``code(m, k)``,
    the int8 code as int32."""
    m_rows, k_in = static_or_symbolic(x.shape[0]), int(x.shape[1])
    if step is None:
        k = te.reduce_axis((0, k_in), name="k")
        absmax = te.compute((m_rows,), lambda m: te.max(tirx.abs(x[m, k]), axis=k), name="absmax")
        scale = te.compute(
            (m_rows,),
            lambda m: arith.fdiv(
                tirx.const(127.0, "float32"), tirx.max(absmax[m], tirx.const(ACT_ABSMAX_FLOOR, "float32"))
            ),
            name="act_scale",
        )

        def code(m: tirx.PrimExpr, col: tirx.PrimExpr) -> tirx.PrimExpr:
            return clamp_code(arith.rint(arith.fmul(x[m, col], scale[m])))

        return scale, code
    delta = tirx.const(step, "float32")

    def static_code(m: tirx.PrimExpr, col: tirx.PrimExpr) -> tirx.PrimExpr:
        return clamp_code(arith.rint(arith.fdiv(x[m, col], delta)))

    return None, static_code


def clamp_code(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """An int32 code clamped to the int8 range of the reference."""
    return tirx.min(tirx.max(value, tirx.const(ACT_QMIN, "int32")), tirx.const(ACT_QMAX, "int32"))


def fake_quant_compute(
    batch: int, in_features: int, step: float | None, arith: Arithmetic | None = None
) -> tirx.PrimFunc:
    """``x̂ = x_int / s`` (dynamic) or ``x_int · Δ`` (static ``step``) unscheduled: float32 ``(M, K)`` →
    ``xhat (M, K)`` (CUDA intrinsics by default)."""
    arith = arith or Arithmetic()
    x = te.placeholder((batch, in_features), "float32", name="x")
    scale, code = rounded_codes(x, step, arith)

    def decoded(m: tirx.Var, k: tirx.Var) -> tirx.PrimExpr:
        value = code(m, k).astype("float32")
        return arith.fdiv(value, scale[m]) if scale is not None else arith.fmul(value, tirx.const(step, "float32"))

    return te.create_prim_func([x, te.compute((batch, in_features), decoded, name="xhat")])


def fake_quant_cpu_func(batch: int, in_features: int, step: float | None, name: str | None = None) -> tirx.PrimFunc:
    """`fake_quant_compute` in `PlainArithmetic`, scheduled for CPUs: rows in parallel, columns vectorized."""
    sch = s_tir.Schedule(fake_quant_compute(batch, in_features, step, PlainArithmetic()))
    m, k = sch.get_loops(sch.get_sblock("xhat"))
    sch.parallel(m)
    sch.vectorize(sch.split(k, factors=[None, power_of_two_divisor(in_features, 16)])[-1])
    return finish(sch.mod["main"], name)


__all__ = [
    "Arithmetic",
    "PlainArithmetic",
    "activation_codes",
    "clamp_code",
    "fake_quant_compute",
    "fake_quant_cpu_func",
    "layout_reason",
    "rounded_codes",
    "static_or_symbolic",
    "word_columns",
    "zeros_reason",
]
