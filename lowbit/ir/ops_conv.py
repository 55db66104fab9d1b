"""``torch.ops.lowbit.conv_packed`` and ``conv_packed_a8``: 1-D and 2-D convolutions with a packed low-bit weight.

The weight ``(C_out, C_in/groups, *kernel)`` is stored as the matrix ``(C_out, C_in/groups · prod(kernel))`` (its
rows flattened channel-major, as ``F.unfold`` orders a patch) in exactly the packed format of a linear layer
(`lowbit.ir.packing`), so grids, groups and packing are shared; the geometry (kernel size, stride, padding,
dilation, groups) is in the op's arguments, one entry per spatial dimension. ``conv_packed``'s reference
dequantizes the weight and calls ``F.conv1d``/``F.conv2d`` in ``x``'s dtype. ``conv_packed_a8`` quantizes its input
to int8 with one static per-tensor step (as ONNX Runtime's and TFLite's int8 convolutions) and computes each output
as the int8-activation linear of its unfolded patch (`lowbit.ir.ops_a8.integer_linear`), so its arithmetic is the
linear one's bit for bit (docs/methods.md (Convolutions)). Both have fake implementations and a straight-through
gradient for ``x`` and ``bias``. Importing this module registers them and their verifier check.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lowbit.errors import VerificationError
from lowbit.ir import ops, ops_a8, packing
from lowbit.ir.annotations import get_meta
from lowbit.ir.graph import get_attr
from lowbit.ir.verify import check

log = logging.getLogger(__name__)

_CONV_ARGS = f"{ops_a8.PACKED_ARGS_SCHEMA}, int[] kernel_size, int[] stride, int[] padding, int[] dilation, int groups"
CONV_PACKED_SCHEMA = f"({_CONV_ARGS}) -> Tensor"
CONV_PACKED_A8_SCHEMA = f"({_CONV_ARGS}, Tensor act_scale) -> Tensor"


def conv_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    kernel_size: list[int],
) -> torch.Tensor:
    """The float32 convolution weight ``(C_out, C_in/groups, *kernel_size)`` a packed weight stands for."""
    weight = packing.dequantize(qweight, scales, zeros, g_idx, bits, group_size, in_features)
    return weight.view(qweight.shape[0], -1, *kernel_size)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: tuple) -> torch.Tensor:
    stride, padding, dilation, groups = geometry
    conv = F.conv1d if x.dim() == 3 else F.conv2d
    return conv(x, weight, bias, stride, padding, dilation, groups)


def _conv_packed(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """Reference kernel: dequantize the packed weight and convolve in ``x``'s dtype."""
    _check(x, qweight, bias, in_features, kernel_size, stride, padding, dilation, groups, "conv_packed")
    weight = conv_weight(qweight, scales, zeros, g_idx, bits, group_size, in_features, kernel_size).to(x.dtype)
    return _conv(x, weight, None if bias is None else bias.to(x.dtype), (stride, padding, dilation, groups))


def _conv_packed_a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act_scale: torch.Tensor,
) -> torch.Tensor:
    """Reference kernel: int8 codes of ``x``, each group's patches times its rows as the int8 linear, ``· Δ + bias``."""
    packing.check_layout(qweight, scales, zeros, g_idx, bits, group_size, in_features)
    _check(x, qweight, bias, in_features, kernel_size, stride, padding, dilation, groups, "conv_packed_a8")
    ops_a8.check_act_scale(act_scale, "conv_packed_a8")
    x_int, step = ops_a8.quantize_activation(x, act_scale)
    patches, out_shape = unfold_patches(x_int, kernel_size, stride, padding, dilation, groups)
    y = ops_a8.integer_linear(patches, qweight, scales, zeros, g_idx, bits, group_size, in_features)
    y = ops_a8.decode_activation(y, step, dynamic=False)
    if bias is not None:
        y = y + bias.to(torch.float32)
    batch = x.shape[0]
    return y.view(batch, -1, qweight.shape[0]).transpose(1, 2).reshape(batch, -1, *out_shape).to(x.dtype)


def unfold_patches(
    x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int], groups: int
) -> tuple[torch.Tensor, list[int]]:
    """Each group's patches ``(groups, B · L, C_in/groups · prod(kernel))`` (rows: batch-major, then output positions
    in row-major order) and the output's spatial shape; a 1-D input is unfolded as a 2-D one of height 1."""
    if x.dim() == 3:
        x = x.unsqueeze(2)
        kernel_size, stride, padding, dilation = [1, *kernel_size], [1, *stride], [0, *padding], [1, *dilation]
        squeeze = True
    else:
        squeeze = False
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (B, C·k, L)
    batch, width, positions = cols.shape
    cols = cols.view(batch, groups, width // groups, positions).permute(1, 0, 3, 2)
    out_shape = [
        (size + 2 * pad - dil * (k - 1) - 1) // st + 1
        for size, k, st, pad, dil in zip(x.shape[2:], kernel_size, stride, padding, dilation)
    ]
    return cols.reshape(groups, batch * positions, width // groups), out_shape[1:] if squeeze else out_shape


def _conv_packed_fake(x: torch.Tensor, qweight: torch.Tensor, *args: Any) -> torch.Tensor:
    """Shape function: ``(B, C_in, *spatial) -> (B, C_out, *spatial_out)`` in ``x``'s dtype and device."""
    scales, zeros, g_idx, bias, bits, group_size, in_features, kernel_size, stride, padding, dilation, groups = args[
        :12
    ]
    packing.check_layout(qweight, scales, zeros, g_idx, bits, group_size, in_features)
    _check(x, qweight, bias, in_features, kernel_size, stride, padding, dilation, groups, "conv_packed")
    spatial = [
        (size + 2 * pad - dil * (k - 1) - 1) // st + 1
        for size, k, st, pad, dil in zip(x.shape[2:], kernel_size, stride, padding, dilation)
    ]
    return x.new_empty((x.shape[0], qweight.shape[0], *spatial))


def _check(
    x: torch.Tensor,
    qweight: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    where: str,
) -> None:
    dims = len(kernel_size)
    if dims not in (1, 2) or any(len(v) != dims for v in (stride, padding, dilation)):
        raise packing.PackedFormatError(
            f"{where}: kernel_size, stride, padding and dilation must all have 1 or 2 entries, got "
            f"{kernel_size}, {stride}, {padding}, {dilation}"
        )
    if x.dim() != dims + 2:
        raise packing.PackedFormatError(
            f"{where}: a {dims}-D convolution takes a {dims + 2}-D input (batch, channels, ...), "
            f"got shape {tuple(x.shape)}"
        )
    patch = (x.shape[1] // groups) * math.prod(kernel_size)
    if groups < 1 or x.shape[1] % groups or qweight.shape[0] % groups or patch != in_features:
        raise packing.PackedFormatError(
            f"{where}: input of {x.shape[1]} channels in {groups} group(s) with kernel {kernel_size} does not match "
            f"in_features={in_features} and {qweight.shape[0]} outputs"
        )
    if bias is not None and tuple(bias.shape) != (qweight.shape[0],):
        raise packing.PackedFormatError(
            f"{where}: bias of shape {tuple(bias.shape)} does not match {qweight.shape[0]} outputs"
        )


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, qweight, scales, zeros, g_idx, bias, bits, group_size, in_features, kernel_size = inputs[:10]
    ctx.save_for_backward(qweight, scales, zeros, g_idx)
    ctx.layout = (bits, group_size, in_features, kernel_size)
    ctx.geometry = inputs[10:14]
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.num_inputs = len(inputs)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    """``dL/dx`` through the dequantized weight and ``dL/dbias``; straight-through for the int8 rounding."""
    qweight, scales, zeros, g_idx = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = conv_weight(qweight, scales, zeros, g_idx, *ctx.layout).to(grad.dtype)
        conv_input = torch.nn.grad.conv1d_input if len(ctx.x_shape) == 3 else torch.nn.grad.conv2d_input
        grad_x = conv_input(ctx.x_shape, weight, grad, *ctx.geometry).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad.transpose(0, 1).reshape(grad.shape[1], -1).sum(dim=1)
    return (grad_x, None, None, None, None, grad_bias) + (None,) * (ctx.num_inputs - 6)


def _register(name: str, impl: Any, schema: str) -> None:
    op = torch.library.custom_op(f"{ops.NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(_conv_packed_fake)
    op.register_autograd(_backward, setup_context=_setup_context)
    log.debug("registered %s::%s", ops.NAMESPACE, name)


for _name, _impl, _schema in (
    ("conv_packed", _conv_packed, CONV_PACKED_SCHEMA),
    ("conv_packed_a8", _conv_packed_a8, CONV_PACKED_A8_SCHEMA),
):
    if not hasattr(getattr(torch.ops, ops.NAMESPACE), _name):
        _register(_name, _impl, _schema)

#: The op overloads that graphs call and backends match on.
conv_packed = torch.ops.lowbit.conv_packed.default
conv_packed_a8 = torch.ops.lowbit.conv_packed_a8.default


@check
def _packed_convs_are_consistent(gm: fx.GraphModule) -> None:
    """Each packed convolution: annotated with the bits and group size it computes, buffers in the packed layout."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (conv_packed, conv_packed_a8):
            continue
        bits, group_size, in_features = node.args[6:9]
        meta = get_meta(node)
        if meta is None or meta.quant is None:
            raise VerificationError(f"packed convolution '{node.name}' has no quantization annotation")
        if (meta.quant.bits, meta.quant.group_size) != (bits, group_size):
            raise VerificationError(
                f"packed convolution '{node.name}' computes w{bits} g{group_size} "
                f"but is annotated {meta.quant.describe()}"
            )
        tensors = []
        for arg in node.args[1:5]:
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                tensors.append(get_attr(gm, arg))
            elif arg is None:
                tensors.append(None)
            else:
                raise VerificationError(f"packed convolution '{node.name}': input {arg} must be a get_attr of a buffer")
        try:
            packing.check_layout(*tensors, bits, group_size, in_features)
        except packing.PackedFormatError as exc:
            raise VerificationError(f"packed convolution '{node.name}': {exc}") from exc


__all__ = [
    "CONV_PACKED_A8_SCHEMA",
    "CONV_PACKED_SCHEMA",
    "conv_packed",
    "conv_packed_a8",
    "conv_weight",
    "unfold_patches",
]
