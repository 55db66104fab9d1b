"""Int8 convolutions as the int8 GEMM over their patches: `ConvSpec` and the quantized patch matrix.

``conv_packed_a8`` computes each output pixel as the int8-activation linear of its unfolded patch
(`lowbit.ir.ops_conv`), so an int8 linear kernel computes it bit for bit once its input stage reads the patch
codes: row ``m`` is output pixel ``(b, oh, ow)``, column ``k`` one (kernel row, kernel column, input channel) of
the NHWC input, quantized with the static step and 0 where the patch overlaps the padding (the reference
quantizes, then pads with zero codes). `quantized_input` builds that stage (one pass: quantize, pad, gather) or a
linear layer's plain one; the kernels' GEMM, weight layout and epilogue stay those of the linear layer.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

import torch
from tvm import s_tir, te, tirx

from lowbit.backends.tvm.fastmath import silu_of
from lowbit.backends.tvm.kernels.generic.activations import activation_codes
from lowbit.backends.tvm.kernels.generic.common import fenced, power_of_two_divisor
from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.ir import packing
from lowbit.ir.ops_a8 import ACT_QMAX, ACT_QMIN


@dataclass(frozen=True)
class ConvSpec(PackedLinearSpec):
    """A 2-D int8 convolution as a linear layer over its patches (``batch`` = ``B·OH·OW`` output pixels,
    ``in_features`` = the patch width ``kh·kw·C_in`` rounded up to whole weight words) on an NHWC ``image``."""

    image: tuple[int, ...] = ()
    out_size: tuple[int, ...] = ()
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    #: Patch columns in (kernel row, kernel column, channel) order; False: torch's (channel, row, column) order,
    #: kept when the weight has several quantization groups per row.
    channels_last: bool = True
    #: Convolution groups: 1, or one per channel (depthwise: `kernels.x86.a8_depthwise`, `kernels.arm.a8_depthwise`).
    conv_groups: int = 1
    #: Elementwise steps after the bias that the kernel's output stage applies (`conv_epilogue`), each a name of
    #: `EPILOGUE_STEPS` and its constant: the activation that follows the layer in the graph.
    epilogue: tuple[tuple[str, float], ...] = ()

    @property
    def patch(self) -> int:
        """Columns of one patch before the rounding up."""
        return self.image[3] * self.kernel_size[0] * self.kernel_size[1]


def conv_epilogue(spec: ConvSpec, value: tirx.PrimExpr, bias: tirx.PrimExpr | None) -> tirx.PrimExpr:
    """A convolution's dequantized output ``value`` plus its ``bias``, then the steps of the spec's ``epilogue``,
    each the float32 operation of the graph operator it replaces (`EPILOGUE_STEPS`), so the result is the graph's.

    The product is `fenced` before the bias, so the two round apart as in the reference.
    """
    if bias is not None:
        value = fenced(value) + bias
    for name, constant in spec.epilogue:
        value = EPILOGUE_STEPS[name](value, tirx.const(constant, "float32"))
    return value


def _hardswish(value: tirx.PrimExpr, _: tirx.PrimExpr) -> tirx.PrimExpr:
    """Relax's decomposition of ``hardswish``: ``x · (min(max(x + 3, 0), 6) / 6)``."""
    three, zero, six = (tirx.const(c, "float32") for c in (3.0, 0.0, 6.0))
    return value * (tirx.min(tirx.max(value + three, zero), six) / six)


def _silu(value: tirx.PrimExpr, _: tirx.PrimExpr) -> tirx.PrimExpr:
    """The compiled graph's ``silu``: ``x · (1 / (1 + fast_exp(−x)))`` (`fastmath.silu_of`)."""
    return silu_of(value)


#: The elementwise steps an epilogue takes: ``maximum``/``minimum`` with a constant (ReLU, ReLU6, clamps),
#: ``hardswish`` and ``silu`` (their constant unused).
EPILOGUE_STEPS: dict[str, Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]] = {
    "maximum": tirx.max,
    "minimum": tirx.min,
    "hardswish": _hardswish,
    "silu": _silu,
}


def depthwise_reason(spec: PackedLinearSpec) -> str | None:
    """Why a depthwise kernel cannot take ``spec`` (None: it is a depthwise convolution, one channel in and out per
    group, with a static int8 input step and one weight group per channel), shared by every architecture's."""
    if not isinstance(spec, ConvSpec) or spec.conv_groups == 1:
        return "the depthwise kernel takes depthwise convolutions only"
    if spec.conv_groups != spec.image[3] or spec.out_features != spec.conv_groups:
        return f"{spec.conv_groups} groups of {spec.image[3]} channels to {spec.out_features}: not one channel each"
    if spec.act_bits != 8 or spec.act_dynamic or spec.has_g_idx or spec.group_size != spec.in_features:
        return "the depthwise kernel takes a static int8 input step and one weight group per channel"
    return None


def patch_weight(
    qweight: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    channels: int,
    kernel_size: tuple[int, ...],
    columns: int,
    channels_last: bool,
) -> torch.Tensor:
    """The packed rows ``(C_out, C_in·kh·kw)`` of ``conv_packed_a8`` with their columns in the order of the patch
    matrix (``channels_last``: (kh, kw, ic)), then codes equal to the row's zero point up to ``columns`` (one weight
    group per row): ``q − z = 0`` there, whatever activation code they meet."""
    patch = channels * kernel_size[0] * kernel_size[1]
    codes = packing.unpack(qweight, bits, patch)
    if channels_last:
        codes = codes.view(-1, channels, *kernel_size).permute(0, 2, 3, 1).reshape(-1, patch)
    if columns == patch:
        return packing.pack(codes.contiguous(), bits)
    zero = torch.full((codes.shape[0], 1), packing.default_zero(bits)) if zeros is None else zeros[:, :1]
    fill = zero.to(torch.uint8).expand(-1, columns - patch)
    return packing.pack(torch.cat([codes, fill], dim=1).contiguous(), bits)


def padded_codes(
    spec: ConvSpec, step: te.Tensor | None, rint: Callable[[tirx.PrimExpr], tirx.PrimExpr], dtype: str = "int8"
) -> tuple[te.Tensor, te.Tensor]:
    """The input ``x`` ``(B, H, W·C)`` (NHWC, pixel rows of interleaved channels) and its int8 codes with the static
    step, zero-padded: ``xp`` ``(B, H + 2·pad_h, W + 2·pad_w, C)``, the codes stored as ``dtype``. Indexed by
    pixel and channel (no division of a flat index), its inner loop over channels is one contiguous vector load."""
    if step is None:
        raise ValueError("an int8 convolution quantizes its input with a static step")
    batch, height, width, channels = spec.image
    pad_h, pad_w = spec.padding
    x = te.placeholder((batch, height, width * channels), "float32", name="x")

    def code(value: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.max(tirx.min(rint(value / step[0]), float(ACT_QMAX)), float(ACT_QMIN)).astype(dtype)

    source, quantized = x, False
    if power_of_two_divisor(channels, 16) < MIN_CHANNEL_LANES:  # quantize along whole pixel rows first
        source = te.compute(x.shape, lambda b, h, wc: code(x[b, h, wc]), name="xc")
        quantized = True

    def padded(b: tirx.PrimExpr, h: tirx.PrimExpr, w: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
        inside = tirx.all(h >= pad_h, h < height + pad_h, w >= pad_w, w < width + pad_w)
        # Clamped indices: a vectorized select may load both sides; the codes outside are replaced by 0.
        value = source[b, clamp_index(h - pad_h, height), clamp_index(w - pad_w, width) * channels + c]
        return tirx.if_then_else(inside, value if quantized else code(value), tirx.const(0, dtype))

    shape = (batch, height + 2 * pad_h, width + 2 * pad_w, channels)
    return x, te.compute(shape, padded, name="xp")


def quantized_input(
    spec: PackedLinearSpec, step: te.Tensor | None, rint: Callable[[tirx.PrimExpr], tirx.PrimExpr]
) -> tuple[te.Tensor, te.Tensor, te.Tensor | None]:
    """The kernel's input ``x``, its int8 codes ``xq`` ``(batch, in_features)`` and the per-row multiplier (None when
    static): a linear layer's rows, or a `ConvSpec`'s patches of the NHWC image (static step only)."""
    if not isinstance(spec, ConvSpec):
        x = te.placeholder((spec.rows, spec.in_features), "float32", name="x")
        code, mult = activation_codes(x, step, rint)
        return x, te.compute((spec.rows, spec.in_features), code, name="xq"), mult
    x, xp = padded_codes(spec, step, rint)
    channels = spec.image[3]
    (kh, kw), (out_h, out_w) = spec.kernel_size, spec.out_size
    dil_h, dil_w = spec.dilation
    padded_h = int(xp.shape[1])

    def patch(m: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
        b, pixel = m // (out_h * out_w), m % (out_h * out_w)
        top, left = pixel // out_w * spec.stride[0], pixel % out_w * spec.stride[1]
        if spec.channels_last:
            row, span = k // (kw * channels), k % (kw * channels)
            wc = left * channels + span + (dil_w - 1) * channels * (span // channels)
        else:
            channel, row, col = k // (kh * kw), k // kw % kh, k % kw
            wc = (left + col * dil_w) * channels + clamp_index(channel, channels)
        # Columns past the patch (whole weight words) meet zero-point codes: any finite code there adds nothing.
        # Channels-last patches read 0 there, so that their code sums are the patch's (`code_sums`).
        code = xp[b, clamp_index(top + row * dil_h, padded_h), wc // channels, wc % channels]
        if spec.channels_last and spec.in_features > spec.patch:
            return tirx.Select(k < spec.patch, code, tirx.const(0, "int8"))
        return code

    return x, te.compute((spec.batch, spec.in_features), patch, name="xq"), None


def sums_by_pixel(spec: PackedLinearSpec) -> TypeGuard[ConvSpec]:
    """Whether `code_sums` adds a patch's codes from per-pixel sums (an ungrouped convolution's channels-last
    patches, one weight group per row, over a padded copy: not `pointwise`, whose patch is one pixel)."""
    return (
        isinstance(spec, ConvSpec)
        and spec.channels_last
        and spec.groups == 1
        and spec.conv_groups == 1
        and not pointwise(spec)
    )


def code_sums(spec: PackedLinearSpec, xq: te.Tensor) -> te.Tensor:
    """``asum[m, g] = Σ_{k∈g} xq[m, k]`` (int32), the sums the zero points multiply.

    A channels-last patch (`sums_by_pixel`) adds the ``kh·kw`` sums over channels of its pixels in the padded codes
    (``pixel_sums``, each pixel summed once instead of once per patch that holds it): exact in int32, so the
    same values. Otherwise each row's codes are added group by group (``kg``).
    """
    if not sums_by_pixel(spec):
        group = spec.group_size
        kg = te.reduce_axis((0, group), name="kg")
        return te.compute(
            (spec.rows, spec.groups),
            lambda m, g: te.sum(xq[m, g * group + kg].astype("int32"), axis=kg),
            name="asum",
        )
    xp = xq.op.input_tensors[0]  # the padded codes the patches read (`padded_codes`)
    batch, padded_h, padded_w, channels = (int(extent) for extent in xp.shape)
    c = te.reduce_axis((0, channels), name="c")
    pixels = te.compute(
        (batch, padded_h, padded_w),
        lambda b, h, w: te.sum(xp[b, h, w, c].astype("int32"), axis=c),
        name="pixel_sums",
    )
    (kh, kw), (out_h, out_w) = spec.kernel_size, spec.out_size

    def patch_sum(m: tirx.PrimExpr, g: tirx.PrimExpr) -> tirx.PrimExpr:
        b, pixel = m // (out_h * out_w), m % (out_h * out_w)
        top, left = pixel // out_w * spec.stride[0], pixel % out_w * spec.stride[1]
        terms = [
            pixels[b, top + row * spec.dilation[0], left + col * spec.dilation[1]]
            for row in range(kh)
            for col in range(kw)
        ]
        return functools.reduce(operator.add, terms)

    return te.compute((spec.rows, 1), patch_sum, name="asum")


def schedule_patches(sch: s_tir.Schedule, spec: ConvSpec, rows: s_tir.schedule.LoopRV | None = None) -> None:
    """The input stage of a `ConvSpec` kernel: the padded codes by pixel rows, channels in vector lanes; the patch
    rows in parallel, or each register tile's rows under its loop ``rows`` (gathered into a few cache lines just
    before the tile reads them, not written out for the whole image first); each kernel row of a patch (``kw·C``
    consecutive codes in channels-last order) one inner loop, vectorized in its largest power-of-two part. A
    `pointwise` layer's patch matrix is its input: its rows quantize the input's pixels in place of the padded
    copy."""
    channels = spec.image[3]
    if pointwise(spec):
        sch.compute_inline(sch.get_sblock("xp"))  # whole words of columns: at least 4 channels, no ``xc``
    else:
        schedule_padded(sch, channels)
    xq = sch.get_sblock("xq")
    if rows is None:
        sch.parallel(sch.get_loops(xq)[0])
    else:
        sch.compute_at(xq, rows, preserve_unit_loops=True)
    k = sch.get_loops(xq)[-1]
    span = spec.kernel_size[1] * channels if spec.channels_last else spec.in_features
    # A copy of int8 codes: up to 64 lanes, one zmm register.
    _vectorize(sch, sch.split(k, factors=[None, span])[-1], span, 64)


def schedule_code_sums(sch: s_tir.Schedule, spec: ConvSpec, tiles: s_tir.schedule.LoopRV | None = None) -> None:
    """`code_sums` by pixel, after `schedule_padded`: each padded row's pixel sums right after its codes, in the
    same parallel task (channels in vector lanes: partial sums per lane, then across them, exact in int32); the
    patch sums by output pixels in parallel, or each register tile's under its loop ``tiles``."""
    rows = sch.get_loops(sch.get_sblock("xp"))[0]
    block = sch.get_sblock("pixel_sums")
    lanes = power_of_two_divisor(spec.image[3], 16)
    if lanes > 1:
        partial = sch.rfactor(sch.split(sch.get_loops(block)[-1], factors=[None, lanes])[-1], 3)
        sch.reverse_compute_at(partial, rows, preserve_unit_loops=True)
        lane, *_, pixel, step = sch.get_loops(partial)[1:]  # the block's iterators in order: the lane first
        sch.reorder(pixel, step, lane)
        sch.vectorize(lane)
    sch.reverse_compute_at(block, rows, preserve_unit_loops=True)
    if tiles is None:
        sch.parallel(sch.get_loops(sch.get_sblock("asum"))[0])
    else:
        sch.compute_at(sch.get_sblock("asum"), tiles, preserve_unit_loops=True)


#: Fewest channel lanes the padded copy quantizes in (fewer: whole pixel rows are quantized first).
MIN_CHANNEL_LANES = 4


def pointwise(spec: ConvSpec) -> bool:
    """Whether the patch matrix is the NHWC input itself: a 1x1 kernel, stride 1, no padding, channels-last
    columns and no columns past the channels."""
    return (
        tuple(spec.kernel_size) == (1, 1)
        and tuple(spec.stride) == (1, 1)
        and tuple(spec.padding) == (0, 0)
        and spec.channels_last
        and spec.in_features == spec.image[3]
    )


def schedule_padded(sch: s_tir.Schedule, channels: int) -> None:
    """The padded codes ``xp``: pixel rows in parallel, channels in vector lanes; with fewer channels than
    `MIN_CHANNEL_LANES` (an RGB image), the codes ``xc`` first, whole pixel rows in vector lanes."""
    b, h, _, c = sch.get_loops(sch.get_sblock("xp"))
    sch.parallel(sch.fuse(b, h))
    _vectorize(sch, c, channels)
    _schedule_row_codes(sch, channels)


def _schedule_row_codes(sch: s_tir.Schedule, channels: int) -> None:
    """The codes ``xc`` of an input with fewer channels than `MIN_CHANNEL_LANES`: pixel rows in parallel, each in
    vector lanes."""
    if power_of_two_divisor(channels, 16) < MIN_CHANNEL_LANES:
        b, h, wc = sch.get_loops(sch.get_sblock("xc"))
        sch.parallel(sch.fuse(b, h))
        _vectorize(sch, wc, int(sch.get(wc).extent))


def _vectorize(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV, extent: int, lanes: int = 16) -> None:
    width = power_of_two_divisor(extent, lanes)
    if width > 1:
        sch.vectorize(sch.split(loop, factors=[None, width])[-1])


def clamp_index(index: tirx.PrimExpr, extent: int) -> tirx.PrimExpr:
    """``index`` clamped to ``[0, extent)``: a load that stays inside its buffer (the caller masks the value)."""
    return tirx.max(tirx.min(index, extent - 1), 0)


__all__ = [
    "EPILOGUE_STEPS",
    "ConvSpec",
    "clamp_index",
    "code_sums",
    "conv_epilogue",
    "depthwise_reason",
    "padded_codes",
    "patch_weight",
    "pointwise",
    "quantized_input",
    "schedule_code_sums",
    "schedule_padded",
    "schedule_patches",
    "sums_by_pixel",
]
