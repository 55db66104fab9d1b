"""Int8 depthwise convolution (``conv_packed_a8`` with one group per channel) on x86, channels in vector lanes.

The reference computes each channel's outputs as the int8 linear of its ``kh·kw`` patch columns
(`lowbit.ir.ops_conv`): one exact integer sum per output, ``float32(acc) · scale``, ``· Δ`` (the bias is the
following ``add``). Here the input is quantized into the padded int8 copy of `conv.padded_codes`, and each output
pixel accumulates ``kh·kw`` products of codes and centered weights ``q − z`` (int32, laid out ``(kh, kw, C)`` at
compile time) in int32 lanes of channels, so the sums are the reference's exactly and so is the epilogue. A depthwise
layer has no reduction over channels to feed a dot-product instruction, so the kernel is a direct loop: parallel
over output rows, ``col_tile`` output pixels × ``channel_tile`` channels per register tile.
"""

from __future__ import annotations

import torch
from tvm import s_tir, te, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic.common import divisor_at_most, finish
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec, padded_codes, schedule_padded
from lowbit.backends.tvm.kernels.spec import KernelPlan, LinearKernel, PackedLinearSpec, Tensors
from lowbit.backends.tvm.kernels.x86.a8_linear import _target_reason
from lowbit.errors import BackendError
from lowbit.ir import packing

KERNEL_NAME = "a8_depthwise_x86"
#: Tuning space: output pixels and channels of one register tile (channels: a multiple of the 16 int32 lanes).
KNOBS: dict[str, tuple[int, ...]] = {"col_tile": (1, 2, 4, 7, 8), "channel_tile": (16, 32, 64)}
LANES = 16


class X86A8Depthwise(LinearKernel):
    """The depthwise kernel of the module doc, for x86 LLVM targets with AVX2."""

    name = KERNEL_NAME
    knobs = KNOBS
    convolutions = True

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        if not isinstance(spec, ConvSpec) or spec.conv_groups == 1:
            return "the depthwise kernel takes depthwise convolutions only"
        if spec.conv_groups != spec.image[3] or spec.out_features != spec.conv_groups:
            return f"{spec.conv_groups} groups of {spec.image[3]} channels to {spec.out_features}: not one channel each"
        if spec.conv_groups % LANES:
            return f"{spec.conv_groups} channels are not a multiple of the {LANES} int32 lanes"
        if spec.act_bits != 8 or spec.act_dynamic or spec.has_g_idx or spec.group_size != spec.in_features:
            return "the depthwise kernel takes a static int8 input step and one weight group per channel"
        zeros = tensors.get("zeros")
        if zeros is not None and not torch.equal(zeros, zeros.round()):
            return "fractional zero points"
        return _target_reason(target)

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule: 4 output pixels × 32 channels (8 accumulator vectors)."""
        return {"col_tile": 4, "channel_tile": 32}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """Constants: the centered codes ``(kh, kw, C)`` int32, the scales ``(C,)``, the static step ``(1,)``."""
        if knobs["channel_tile"] % LANES:
            raise BackendError(f"channel_tile={knobs['channel_tile']} is not a multiple of {LANES}")
        codes = packing.unpack(tensors["qweight"], spec.bits, spec.in_features).to(torch.int32)
        zeros = tensors.get("zeros")
        zero = torch.full((codes.shape[0], 1), packing.default_zero(spec.bits)) if zeros is None else zeros
        centered = (codes - zero.to(torch.int32)).view(-1, *spec.kernel_size).permute(1, 2, 0).contiguous()
        consts = [centered, tensors["scales"].to(torch.float32).reshape(-1), tensors["act_scale"].reshape(1)]
        channel_tile = LANES * divisor_at_most(spec.conv_groups // LANES, knobs["channel_tile"] // LANES)
        func = depthwise_func(spec, knobs["col_tile"], channel_tile)
        return KernelPlan(func, consts, KERNEL_NAME, knobs)


KERNEL = X86A8Depthwise()


def depthwise_compute(spec: ConvSpec) -> tirx.PrimFunc:
    """``x (B, H, W·C) f32``, centered codes, scales, step → ``y (B·OH·OW, C) f32``."""
    step = te.placeholder((1,), "float32", name="act_scale")
    x, xp = padded_codes(spec, step, tirx.round)
    channels = spec.image[3]
    (kh, kw), (out_h, out_w) = spec.kernel_size, spec.out_size
    weights = te.placeholder((kh, kw, channels), "int32", name="weights")
    scales = te.placeholder((channels,), "float32", name="scales")
    r = te.reduce_axis((0, kh), name="r")
    s = te.reduce_axis((0, kw), name="s")
    (stride_h, stride_w), (dil_h, dil_w) = spec.stride, spec.dilation

    def tap(b: tirx.Var, oh: tirx.Var, ow: tirx.Var, c: tirx.Var) -> tirx.PrimExpr:
        code = xp[b, oh * stride_h + r * dil_h, (ow * stride_w + s * dil_w) * channels + c]
        return code.astype("int32") * weights[r, s, c]

    acc = te.compute((spec.image[0], out_h, out_w, channels), lambda *i: te.sum(tap(*i), axis=[r, s]), name="acc")
    y = te.compute(
        (spec.batch, channels),
        lambda m, c: (
            acc[m // (out_h * out_w), m % (out_h * out_w) // out_w, m % out_w, c].astype("float32")
            * scales[c]
            * step[0]
        ),
        name="y",
    )
    return te.create_prim_func([x, weights, scales, step, y])


def depthwise_func(spec: ConvSpec, col_tile: int, channel_tile: int, name: str | None = None) -> tirx.PrimFunc:
    """The scheduled PrimFunc (`depthwise_compute`)."""
    sch = s_tir.Schedule(depthwise_compute(spec))
    schedule_padded(sch, spec.image[3])
    acc, y = sch.get_sblock("acc"), sch.get_sblock("y")
    b, oh, ow, c = sch.get_loops(acc)[:4]
    cols = divisor_at_most(spec.out_size[1], col_tile)
    ow_outer, ow_inner = sch.split(ow, factors=[None, cols])
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
    sch.vectorize(sch.split(c, factors=[None, LANES])[-1])
    return finish(sch.mod["main"], name)


__all__ = ["KERNEL", "KERNEL_NAME", "KNOBS", "X86A8Depthwise", "depthwise_compute", "depthwise_func"]
