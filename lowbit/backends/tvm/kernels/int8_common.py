"""What the CPU int8-activation kernels (x86 and ARM) share: layout checks and activation codes.

Both kernels take ``linear_packed_a8`` layers whose codes fit one interleaved word of
``rows × columns`` bytes and quantize their input to int8 inside the module, exactly
as `lowbit.ir.ops_a8` defines it (dynamic per token or a static step).
"""

from __future__ import annotations

from typing import Callable

import torch
from tvm import te, tirx

from lowbit.backends.tvm.kernels.packed_linear import PackedLinearSpec
from lowbit.ir.ops_a8 import ACT_EPS, ACT_QMAX, ACT_QMIN


def layout_reason(spec: PackedLinearSpec, kernel: str, kernel_bits: tuple[int, ...], rows: int,
                  columns: int) -> str | None:
    """Why ``kernel`` (its name in messages) cannot compute ``spec`` (shape and format alone), or None."""
    if spec.act_bits != 8:
        return f"the {kernel} needs 8-bit activations, got act_bits={spec.act_bits}"
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
        return f"group_size={spec.group_size} is not a multiple of {width} (the columns of one {spec.bits}-bit weight word)"
    return None


def word_columns(bits: int, columns: int) -> int:
    """Input columns one interleaved word covers: ``columns · (8 // bits)`` codes per row."""
    return columns * (8 // bits)


def zeros_reason(zeros: torch.Tensor | None, kernel: str) -> str | None:
    """Why integer arithmetic cannot remove these zero points (fractional ones), or None."""
    if zeros is not None and not torch.equal(zeros, zeros.round()):
        return f"fractional zero points: the {kernel} removes integer zero points in int32"
    return None


def activation_codes(x: te.Tensor, step: te.Tensor | None
                     ) -> tuple[Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr], te.Tensor | None]:
    """The int8 code of ``x[m, k]`` as an expression builder, and the per-row multiplier ``s`` (None when static)."""
    m_rows, k_in = (int(d) for d in x.shape)
    mult = None
    if step is None:
        k = te.reduce_axis((0, k_in), name="k")
        absmax = te.compute((m_rows,), lambda m: te.max(tirx.abs(x[m, k]), axis=k), name="absmax")
        mult = te.compute((m_rows,), lambda m: tirx.const(127.0, "float32")
                          / tirx.max(absmax[m], tirx.const(ACT_EPS, "float32")), name="mult")

    def code(m: tirx.PrimExpr, kk: tirx.PrimExpr) -> tirx.PrimExpr:
        scaled = x[m, kk] * mult[m] if step is None else x[m, kk] / step[0]
        return tirx.max(tirx.min(tirx.nearbyint(scaled), float(ACT_QMAX)), float(ACT_QMIN)).astype("int8")

    return code, mult


__all__ = ["activation_codes", "layout_reason", "word_columns", "zeros_reason"]
