"""Int8 depthwise convolution (``conv_packed_a8`` with one group per channel) on aarch64, channels in NEON lanes.

The arithmetic is that of `kernels.x86.a8_depthwise`, so the values are the reference's bit for bit: the input is
quantized with the static step (``nearbyint``, clamped to int8) into a zero-padded copy, each output pixel sums
``kh·kw`` products of codes and centered weights ``q − z`` exactly in int32, then ``float32(acc) · scale · Δ``.
The centered weights are stored as int16 (laid out ``(kh, kw, C)`` at compile time), so LLVM lowers each
product-and-add to the widening multiply-accumulate ``smlal``/``smlal2`` (8 channels per int16 vector, two int32
accumulators). A channel count that is not a multiple of 8 is padded inside the kernel: the padded codes and weights
of the extra channels are 0 and the output keeps the real ones. Planned with an epilogue, the output stage also adds
the bias and applies the activation after the layer (`conv.conv_epilogue`), in the same float32 vectors. Schedule:
parallel over output rows, ``col_tile`` output pixels × ``channel_tile`` channels per register tile.
"""

from __future__ import annotations

import torch
from tvm import s_tir, te, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic.common import divisor_at_most, finish, power_of_two_divisor
from lowbit.backends.tvm.kernels.generic.conv import (
    ConvSpec,
    clamp_index,
    conv_epilogue,
    depthwise_reason,
    schedule_padded,
)
from lowbit.backends.tvm.kernels.spec import KernelPlan, LinearKernel, PackedLinearSpec, Tensors
from lowbit.backends.tvm.target import target_arch
from lowbit.errors import BackendError
from lowbit.ir import packing
from lowbit.ir.ops_a8 import ACT_QMAX, ACT_QMIN

KERNEL_NAME = "a8_depthwise_arm"
#: Channels of one int16 vector; the kernel's channels are padded to a multiple of it.
LANES = 8
#: Tuning space: output pixels and channels of one register tile (channels: a multiple of the 8 int16 lanes).
KNOBS: dict[str, tuple[int, ...]] = {"col_tile": (1, 2, 4, 7, 8), "channel_tile": (8, 16, 32)}
#: The centered weights ``q − z`` are stored as int16.
INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1


def padded_channels(channels: int) -> int:
    """The kernel's channel count: ``channels`` rounded up to whole vectors of `LANES`."""
    return -(-channels // LANES) * LANES


class ArmA8Depthwise(LinearKernel):
    """The depthwise kernel of the module doc, for any aarch64 LLVM target (``smlal`` is base NEON)."""

    name = KERNEL_NAME
    knobs = KNOBS
    convolutions = True
    epilogues = True

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        reason = depthwise_reason(spec)
        if reason is not None:
            return reason
        zeros = tensors.get("zeros")
        if zeros is not None:
            if not torch.equal(zeros, zeros.round()):
                return "fractional zero points"
            if -zeros.max() < INT16_MIN or (1 << spec.bits) - 1 - zeros.min() > INT16_MAX:  # q − z, q ∈ [0, 2^bits)
                return "zero points whose centered codes q − z do not fit int16"
        if target.kind.name != "llvm" or target_arch(target) != "aarch64":
            return f"the ARM depthwise kernel needs an aarch64 LLVM target, got {target}"
        return None

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule: 4 output pixels × 16 channels (16 of the 32 vector registers hold int32 sums)."""
        return {"col_tile": 4, "channel_tile": 16}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """Constants: the centered codes ``(kh, kw, C')`` int16 (0 in padded channels), the scales ``(C,)``, the
        static step ``(1,)``, [the bias ``(C,)``]."""
        if knobs["channel_tile"] % LANES:
            raise BackendError(f"channel_tile={knobs['channel_tile']} is not a multiple of {LANES}")
        channels = spec.image[3]
        codes = packing.unpack(tensors["qweight"], spec.bits, spec.in_features).to(torch.int32)
        zeros = tensors.get("zeros")
        zero = torch.full((channels, 1), packing.default_zero(spec.bits)) if zeros is None else zeros
        centered = torch.zeros(padded_channels(channels), spec.in_features, dtype=torch.int16)
        centered[:channels] = codes - zero.to(torch.int32)
        weights = centered.view(-1, *spec.kernel_size).permute(1, 2, 0).contiguous()
        consts = [weights, tensors["scales"].to(torch.float32).reshape(-1), tensors["act_scale"].reshape(1)]
        if spec.has_bias:
            consts.append(tensors["bias"].to(torch.float32).reshape(-1))
        vectors = padded_channels(channels) // LANES
        channel_tile = LANES * divisor_at_most(vectors, knobs["channel_tile"] // LANES)
        func = depthwise_func(spec, knobs["col_tile"], channel_tile)
        return KernelPlan(func, consts, KERNEL_NAME, knobs)


KERNEL = ArmA8Depthwise()


def depthwise_compute(spec: ConvSpec) -> tirx.PrimFunc:
    """``x (B, H, W·C) f32``, centered codes ``(kh, kw, C')`` int16, scales, step, [bias] → ``y (B·OH·OW, C) f32``,
    then the spec's epilogue (`conv.conv_epilogue`)."""
    batch, height, width, channels = spec.image
    wide = padded_channels(channels)
    (pad_h, pad_w), (kh, kw), (out_h, out_w) = spec.padding, spec.kernel_size, spec.out_size
    step = te.placeholder((1,), "float32", name="act_scale")
    x = te.placeholder((batch, height, width * channels), "float32", name="x")
    weights = te.placeholder((kh, kw, wide), "int16", name="weights")
    scales = te.placeholder((channels,), "float32", name="scales")

    def padded(b: tirx.PrimExpr, h: tirx.PrimExpr, w: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
        inside = tirx.all(h >= pad_h, h < height + pad_h, w >= pad_w, w < width + pad_w, c < channels)
        # Clamped indices: a vectorized select may load both sides; the codes outside are replaced by 0.
        value = x[
            b, clamp_index(h - pad_h, height), clamp_index(w - pad_w, width) * channels + clamp_index(c, channels)
        ]
        rounded = tirx.max(tirx.min(tirx.nearbyint(value / step[0]), float(ACT_QMAX)), float(ACT_QMIN))
        return tirx.if_then_else(inside, rounded.astype("int8"), tirx.const(0, "int8"))

    xp = te.compute((batch, height + 2 * pad_h, width + 2 * pad_w, wide), padded, name="xp")
    r = te.reduce_axis((0, kh), name="r")
    s = te.reduce_axis((0, kw), name="s")
    (stride_h, stride_w), (dil_h, dil_w) = spec.stride, spec.dilation

    def tap(b: tirx.Var, oh: tirx.Var, ow: tirx.Var, c: tirx.Var) -> tirx.PrimExpr:
        code = xp[b, oh * stride_h + r * dil_h, ow * stride_w + s * dil_w, c]
        return code.astype("int32") * weights[r, s, c].astype("int32")

    acc = te.compute((batch, out_h, out_w, wide), lambda *i: te.sum(tap(*i), axis=[r, s]), name="acc")
    bias = te.placeholder((channels,), "float32", name="bias") if spec.has_bias else None

    def output(m: tirx.Var, c: tirx.Var) -> tirx.PrimExpr:
        total = acc[m // (out_h * out_w), m % (out_h * out_w) // out_w, m % out_w, c]
        return conv_epilogue(spec, total.astype("float32") * scales[c] * step[0], bias[c] if bias is not None else None)

    y = te.compute((spec.batch, channels), output, name="y")
    return te.create_prim_func([x, weights, scales, step] + ([bias] if bias is not None else []) + [y])


def depthwise_func(spec: ConvSpec, col_tile: int, channel_tile: int, name: str | None = None) -> tirx.PrimFunc:
    """The scheduled PrimFunc (`depthwise_compute`); ``channel_tile`` divides the padded channel count."""
    sch = s_tir.Schedule(depthwise_compute(spec))
    schedule_padded(sch, padded_channels(spec.image[3]))
    acc, y = sch.get_sblock("acc"), sch.get_sblock("y")
    b, oh, ow, c = sch.get_loops(acc)[:4]
    ow_outer, ow_inner = sch.split(ow, factors=[None, divisor_at_most(spec.out_size[1], col_tile)])
    c_outer, c_vec, c_lane = sch.split(c, factors=[None, channel_tile // LANES, LANES])
    r, s = sch.get_loops(acc)[-2:]
    sch.reorder(b, oh, ow_outer, c_outer, r, s, ow_inner, c_vec, c_lane)
    sch.parallel(sch.fuse(b, oh))
    sch.unroll(ow_inner)
    sch.unroll(c_vec)
    sch.vectorize(c_lane)
    init = sch.decompose_reduction(acc, r)
    sch.vectorize(sch.get_loops(init)[-1])
    m, c = sch.get_loops(y)
    sch.parallel(m)
    lanes = power_of_two_divisor(spec.image[3], LANES)
    if lanes > 1:
        sch.vectorize(sch.split(c, factors=[None, lanes])[-1])
    return finish(sch.mod["main"], name)


__all__ = [
    "KERNEL",
    "KERNEL_NAME",
    "KNOBS",
    "LANES",
    "ArmA8Depthwise",
    "depthwise_compute",
    "depthwise_func",
    "padded_channels",
]
