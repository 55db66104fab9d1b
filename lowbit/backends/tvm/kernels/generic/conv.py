"""Int8 convolutions as the int8 GEMM over their patches: `ConvSpec` and the quantized patch matrix.

``conv_packed_a8`` computes each output pixel as the int8-activation linear of its unfolded patch
(`lowbit.ir.ops_conv`), so an int8 linear kernel computes it bit for bit once its input stage reads the patch
codes: row ``m`` is output pixel ``(b, oh, ow)``, column ``k`` one (kernel row, kernel column, input channel) of
the NHWC input, quantized with the static step and 0 where the patch overlaps the padding (the reference
quantizes, then pads with zero codes). `quantized_input` builds that stage (one pass: quantize, pad, gather) or a
linear layer's plain one; the kernels' GEMM, weight layout and epilogue stay those of the linear layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tvm import te, tirx

from lowbit.backends.tvm.kernels.generic.activations import activation_codes
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

    @property
    def patch(self) -> int:
        """Columns of one patch before the rounding up."""
        return self.image[3] * self.kernel_size[0] * self.kernel_size[1]


def patch_weight(
    qweight: torch.Tensor, bits: int, channels: int, kernel_size: tuple[int, ...], columns: int, channels_last: bool
) -> torch.Tensor:
    """The packed rows ``(C_out, C_in·kh·kw)`` of ``conv_packed_a8`` with their columns in the order of the patch
    matrix (``channels_last``: (kh, kw, ic)) and zero codes up to ``columns`` (they meet zero activation codes)."""
    patch = channels * kernel_size[0] * kernel_size[1]
    codes = packing.unpack(qweight, bits, patch)
    if channels_last:
        codes = codes.view(-1, channels, *kernel_size).permute(0, 2, 3, 1).reshape(-1, patch)
    return packing.pack(torch.nn.functional.pad(codes, (0, columns - patch)).contiguous(), bits)


def quantized_input(
    spec: PackedLinearSpec, step: te.Tensor | None, rint: Callable[[tirx.PrimExpr], tirx.PrimExpr]
) -> tuple[te.Tensor, te.Tensor, te.Tensor | None]:
    """The kernel's input ``x``, its int8 codes ``xq`` ``(batch, in_features)`` and the per-row multiplier (None when
    static): a linear layer's rows, or a `ConvSpec`'s patches of the NHWC image (static step only)."""
    if not isinstance(spec, ConvSpec):
        x = te.placeholder((spec.batch, spec.in_features), "float32", name="x")
        code, mult = activation_codes(x, step, rint)
        return x, te.compute((spec.batch, spec.in_features), code, name="xq"), mult
    if step is None:
        raise ValueError("an int8 convolution quantizes its input with a static step")
    x = te.placeholder(spec.image, "float32", name="x")
    _, height, width, channels = spec.image
    kh, kw = spec.kernel_size
    out_h, out_w = spec.out_size

    def code(m: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
        b, pixel = m // (out_h * out_w), m % (out_h * out_w)
        if spec.channels_last:
            row, col, channel = k // (kw * channels), k // channels % kw, k % channels
        else:
            channel, row, col = k // (kh * kw), k // kw % kh, k % kw
        h = pixel // out_w * spec.stride[0] + row * spec.dilation[0] - spec.padding[0]
        w = pixel % out_w * spec.stride[1] + col * spec.dilation[1] - spec.padding[1]
        inside = tirx.all(k < spec.patch, h >= 0, h < height, w >= 0, w < width)
        # Clamped indices: a vectorized select may load both sides; the codes outside are replaced by 0.
        pixel_value = x[b, _clamp(h, height), _clamp(w, width), _clamp(channel, channels)]
        value = tirx.max(tirx.min(rint(pixel_value / step[0]), float(ACT_QMAX)), float(ACT_QMIN))
        return tirx.if_then_else(inside, value.astype("int8"), tirx.const(0, "int8"))

    return x, te.compute((spec.batch, spec.in_features), code, name="xq"), None


def _clamp(index: tirx.PrimExpr, extent: int) -> tirx.PrimExpr:
    return tirx.max(tirx.min(index, extent - 1), 0)


__all__ = ["ConvSpec", "patch_weight", "quantized_input"]
