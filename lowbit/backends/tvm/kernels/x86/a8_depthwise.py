"""Int8 depthwise convolution (``conv_packed_a8`` with one group per channel) on x86, channels in vector lanes.

The reference computes each channel's outputs as the int8 linear of its ``kh·kw`` patch columns
(`lowbit.ir.ops_conv`): one exact integer sum per output, ``float32(acc) · scale``, ``· Δ`` (the bias is the
following ``add``, which the kernel applies itself when planned with an epilogue). Here the input is quantized once
into a zero-padded copy of its codes (`conv.padded_codes`), stored as float32 (as int8 where that copy would leave
the L2 cache: `code_dtype`), and each output pixel accumulates ``kh·kw`` products of codes and centered weights
``q − z`` (float32, laid out ``(kh, kw, C)`` at compile time) with fused multiply-adds in float32 lanes of channels.
Every product and partial sum is an integer below 2²⁴ (`MAX_TAPS` bounds the taps), so float32 holds them exactly,
in any order: the sums are the reference's integers and the epilogue is its float32 arithmetic. One ``vfmadd`` with
a memory operand per 16 products replaces the int32 ``vpmovsxbd`` + ``vpmulld`` + ``vpaddd`` of an integer loop (a
depthwise layer has no reduction over channels to feed a dot-product instruction). The kernel is a direct loop:
parallel over output rows, ``col_tile`` output pixels × ``channel_tile`` channels per register tile, the epilogue
applied to the tile while it is in registers. Channel counts that are not a multiple of 16 run in the largest
power-of-two vectors that divide them (72, 88 and 120 channels: 8 lanes).
"""

from __future__ import annotations

import torch
from tvm import s_tir, te, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic.common import divisor_at_most, finish, power_of_two_divisor
from lowbit.backends.tvm.kernels.generic.conv import (
    ConvSpec,
    conv_epilogue,
    depthwise_reason,
    padded_codes,
    schedule_padded,
)
from lowbit.backends.tvm.kernels.spec import KernelPlan, LinearKernel, PackedLinearSpec, Tensors
from lowbit.backends.tvm.kernels.x86.a8_linear import _target_reason
from lowbit.ir import packing

KERNEL_NAME = "a8_depthwise_x86"
#: Tuning space: output pixels and channels of one register tile (channels: rounded to whole vectors).
KNOBS: dict[str, tuple[int, ...]] = {"col_tile": (1, 2, 4, 7, 8), "channel_tile": (16, 32, 64)}
#: float32 lanes of one AVX-512 register, the widest vector the kernel uses.
LANES = 16
#: Narrowest vector it takes: a channel count with fewer lanes (odd, or twice odd) keeps the fp32 convolution.
MIN_LANES = 4
#: Largest float32 padded copy (bytes): a larger one would leave the L2 cache; its codes are stored as int8 instead.
FLOAT_COPY_BYTES = 1 << 20
#: Most taps whose integer sum stays exact in float32: ``taps · 128 · 255 < 2²⁴`` (codes of up to 8 bits).
MAX_TAPS = (1 << 24) // (128 * 255)


class X86A8Depthwise(LinearKernel):
    """The depthwise kernel of the module doc, for x86 LLVM targets with AVX2."""

    name = KERNEL_NAME
    knobs = KNOBS
    convolutions = True
    epilogues = True

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        reason = depthwise_reason(spec)
        if reason is not None:
            return reason
        if channel_lanes(spec.conv_groups) < MIN_LANES:
            return f"{spec.conv_groups} channels fill no vector of {MIN_LANES} lanes"
        if spec.bits > 8 or spec.kernel_size[0] * spec.kernel_size[1] > MAX_TAPS:
            return f"the float32 sums of {spec.bits}-bit codes over a {spec.kernel_size} kernel may not be exact"
        zeros = tensors.get("zeros")
        if zeros is not None and not torch.equal(zeros, zeros.round()):
            return "fractional zero points"
        return _target_reason(target)

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule: up to 8 output pixels × 32 channels (14 to 16 independent accumulator vectors of 16
        lanes: enough to keep both FMA ports busy)."""
        return {"col_tile": 8, "channel_tile": 32}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """Constants: the centered codes ``(kh, kw, C)`` float32, the scales ``(C,)``, the static step ``(1,)``, [the
        bias ``(C,)``]."""
        codes = packing.unpack(tensors["qweight"], spec.bits, spec.in_features).to(torch.int32)
        zeros = tensors.get("zeros")
        zero = torch.full((codes.shape[0], 1), packing.default_zero(spec.bits)) if zeros is None else zeros
        centered = (codes - zero.to(torch.int32)).view(-1, *spec.kernel_size).permute(1, 2, 0)
        scales = tensors["scales"].to(torch.float32).reshape(-1)
        consts = [centered.to(torch.float32).contiguous(), scales, tensors["act_scale"].reshape(1)]
        if spec.has_bias:
            consts.append(tensors["bias"].to(torch.float32).reshape(-1))
        func = depthwise_func(spec, knobs["col_tile"], knobs["channel_tile"])
        return KernelPlan(func, consts, KERNEL_NAME, knobs)


KERNEL = X86A8Depthwise()


def channel_lanes(channels: int) -> int:
    """The vector width of a layer's channels: the largest power of two up to `LANES` that divides them."""
    return power_of_two_divisor(channels, LANES)


def code_dtype(spec: ConvSpec) -> str:
    """How the padded copy stores its codes: float32 (each tap one ``vfmadd`` with a memory operand) while the copy
    stays within `FLOAT_COPY_BYTES`, else int8 (a quarter of the bytes, widened to float32 as the taps load it)."""
    batch, height, width, channels = spec.image
    pad_h, pad_w = spec.padding
    elements = batch * (height + 2 * pad_h) * (width + 2 * pad_w) * channels
    return "float32" if 4 * elements <= FLOAT_COPY_BYTES else "int8"


def depthwise_compute(spec: ConvSpec) -> tirx.PrimFunc:
    """``x (B, H, W·C) f32``, centered codes, scales, step, [bias] → ``y (B, OH, OW, C) f32``, then the spec's
    epilogue (`conv.conv_epilogue`)."""
    step = te.placeholder((1,), "float32", name="act_scale")
    x, xp = padded_codes(spec, step, tirx.round, code_dtype(spec))
    channels = spec.image[3]
    (kh, kw), (out_h, out_w) = spec.kernel_size, spec.out_size
    weights = te.placeholder((kh, kw, channels), "float32", name="weights")
    scales = te.placeholder((channels,), "float32", name="scales")
    r = te.reduce_axis((0, kh), name="r")
    s = te.reduce_axis((0, kw), name="s")
    (stride_h, stride_w), (dil_h, dil_w) = spec.stride, spec.dilation

    def tap(b: tirx.Var, oh: tirx.Var, ow: tirx.Var, c: tirx.Var) -> tirx.PrimExpr:
        code = xp[b, oh * stride_h + r * dil_h, ow * stride_w + s * dil_w, c]
        return code.astype("float32") * weights[r, s, c]

    shape = (spec.image[0], out_h, out_w, channels)
    acc = te.compute(shape, lambda *i: te.sum(tap(*i), axis=[r, s]), name="acc")
    bias = te.placeholder((channels,), "float32", name="bias") if spec.has_bias else None

    def output(b: tirx.Var, oh: tirx.Var, ow: tirx.Var, c: tirx.Var) -> tirx.PrimExpr:
        return conv_epilogue(spec, acc[b, oh, ow, c] * scales[c] * step[0], bias[c] if bias is not None else None)

    y = te.compute(shape, output, name="y")
    return te.create_prim_func([x, weights, scales, step] + ([bias] if bias is not None else []) + [y])


def depthwise_func(spec: ConvSpec, col_tile: int, channel_tile: int, name: str | None = None) -> tirx.PrimFunc:
    """The scheduled PrimFunc (`depthwise_compute`): ``channel_tile`` rounded to whole vectors dividing the
    channels."""
    channels = spec.image[3]
    lanes = channel_lanes(channels)
    vectors = divisor_at_most(channels // lanes, max(channel_tile // lanes, 1))
    sch = s_tir.Schedule(depthwise_compute(spec))
    schedule_padded(sch, channels)
    acc, y = sch.get_sblock("acc"), sch.get_sblock("y")
    b, oh, ow, c = sch.get_loops(acc)[:4]
    cols = divisor_at_most(spec.out_size[1], col_tile)
    ow_outer, ow_inner = sch.split(ow, factors=[None, cols])
    c_outer, c_vec, c_lane = sch.split(c, factors=[None, vectors, lanes])
    r, s = sch.get_loops(acc)[-2:]
    sch.reorder(b, oh, ow_outer, c_outer, r, s, ow_inner, c_vec, c_lane)
    sch.parallel(sch.fuse(b, oh))
    sch.unroll(s)
    sch.unroll(ow_inner)
    sch.unroll(c_vec)
    sch.vectorize(c_lane)
    init = sch.decompose_reduction(acc, r)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.reverse_compute_at(y, c_outer)
    y_col, y_c = sch.get_loops(y)[-2:]
    _, y_lane = sch.split(y_c, factors=[None, lanes])
    sch.unroll(y_col)
    sch.vectorize(y_lane)
    return finish(sch.mod["main"], name)


__all__ = ["KERNEL", "KERNEL_NAME", "KNOBS", "X86A8Depthwise", "channel_lanes", "depthwise_compute", "depthwise_func"]
