"""Lowering of packed convolutions (``lowbit.conv_packed`` / ``conv_packed_a8``) to Relax.

No low-bit convolution kernel exists yet, so each call becomes Relax's ``conv1d``/``conv2d`` on the weight
dequantized at compile time (a Relax constant), after the static int8 fake-quantization of the input
``clip(round(x / Δ), −128, 127) · Δ`` for ``conv_packed_a8``; the fp32 convolution schedules of the toolchain run it.
Every such layer is recorded as a fallback (`convert.LoweredLinear` with the reason), like a linear no kernel takes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function
from tvm import relax

from lowbit.backends.tvm.convert import FALLBACK, LoweredLinear, layer_spec, packed_constant
from lowbit.errors import BackendError
from lowbit.ir import ops_a8, ops_conv
from lowbit.ir.annotations import packed_layer

#: How the frontend names the packed convolution ops (``OpOverload.__name__``).
CONV_PACKED_NAME = ops_conv.conv_packed.__name__
CONV_PACKED_A8_NAME = ops_conv.conv_packed_a8.__name__


class PackedConvConverter:
    """``custom_convert_map`` entry: a packed convolution → fp32 Relax convolution on its dequantized weight
    (module doc); each layer is appended to ``linears`` as a fallback with its reason."""

    def __init__(self, gm: fx.GraphModule, linears: list[LoweredLinear]) -> None:
        self.gm = gm
        self.linears = linears

    def __call__(self, node: fx.Node, importer: Any) -> relax.Expr:
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        x = importer.env[call["x"]]
        if x.ty.dtype != "float32":
            raise BackendError(f"node '{node.name}': the TVM backend takes float32 activations, got {x.ty.dtype}")
        a8 = node.target is ops_conv.conv_packed_a8
        names = ("qweight", "scales", "zeros", "g_idx", "bias") + (("act_scale",) if a8 else ())
        tensors = {name: packed_constant(self.gm, node, call.get(name)) for name in names}
        geometry = [call[name] for name in ("kernel_size", "stride", "padding", "dilation", "groups")]
        weight = ops_conv.conv_weight(
            tensors["qweight"],
            tensors["scales"],
            tensors["zeros"],
            tensors["g_idx"],
            call["bits"],
            call["group_size"],
            call["in_features"],
            geometry[0],
        )
        bb = importer.block_builder
        if a8:
            x = _fake_quantize(bb, x, tensors["act_scale"])
        out = bb.emit(_conv(x, weight, *geometry[1:]))
        if tensors["bias"] is not None:
            shape = (1, weight.shape[0]) + (1,) * len(geometry[0])
            out = bb.emit(relax.op.add(out, relax.const(tensors["bias"].reshape(shape).cpu().numpy())))
        self._record(node, call, tensors, [int(d) for d in out.ty.shape], a8)
        return out

    def _record(self, node: fx.Node, call: dict, tensors: dict, out_shape: list[int], a8: bool) -> None:
        rows = out_shape[0] * math.prod(out_shape[2:])
        spec = layer_spec(call, rows, tensors, a8)
        kind = "int8-activation" if a8 else "low-bit"
        reason = f"no {kind} convolution kernel yet: an fp32 convolution on the dequantized weight runs it"
        layer = packed_layer(node, call["qweight"]) or None
        self.linears.append(LoweredLinear(node.name, spec, FALLBACK, reason, None, layer))


def _fake_quantize(bb: relax.BlockBuilder, x: relax.Expr, act_scale: torch.Tensor) -> relax.Expr:
    """``clip(round(x / Δ), −128, 127) · Δ``, the static int8 input of `lowbit.ir.ops_a8`."""
    step = relax.const(act_scale.to(torch.float32).cpu().numpy())
    codes = bb.emit(relax.op.round(relax.op.divide(x, step)))
    clipped = bb.emit(relax.op.clip(codes, ops_a8.ACT_QMIN, ops_a8.ACT_QMAX))
    return bb.emit(relax.op.multiply(clipped, step))


def _conv(
    x: relax.Expr, weight: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int
) -> relax.Expr:
    const = relax.const(weight.contiguous().cpu().numpy())
    if len(stride) == 1:
        return relax.op.nn.conv1d(x, const, strides=stride, padding=padding, dilation=dilation, groups=groups)
    return relax.op.nn.conv2d(x, const, strides=stride, padding=padding, dilation=dilation, groups=groups)


__all__ = ["CONV_PACKED_A8_NAME", "CONV_PACKED_NAME", "PackedConvConverter"]
