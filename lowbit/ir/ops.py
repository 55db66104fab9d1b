"""The ``lowbit`` custom operators (torch.library), registered when this module is imported.

``torch.ops.lowbit.linear_packed(x, qweight, scales, zeros, g_idx, bias, bits, group_size,
in_features)`` is a linear layer whose weight is in the packed format of
`lowbit.ir.packing`. Its PyTorch implementation (unpack, dequantize to float32, then
``F.linear`` in ``x``'s dtype) is the numerical reference of the project: every backend
that lowers this op is tested against it. A fake implementation makes FakeTensor shape
propagation and ``torch.export`` work, and an autograd formula (gradient for ``x`` and
``bias``; the packed weight is frozen) lets layers around a quantized one keep training.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.ir import packing

log = logging.getLogger(__name__)

NAMESPACE = "lowbit"
LINEAR_PACKED_SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? g_idx, Tensor? bias, "
    "int bits, int group_size, int in_features) -> Tensor"
)


def _linear_packed(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Reference kernel: dequantize the packed weight and apply ``F.linear`` in ``x``'s dtype."""
    _check_input(x, qweight, bias, in_features)
    weight = packing.dequantize(qweight, scales, zeros, g_idx, bits, group_size, in_features)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _linear_packed_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Shape function: ``(..., in_features) -> (..., N)`` in ``x``'s dtype and device."""
    packing.check_layout(qweight, scales, zeros, g_idx, bits, group_size, in_features)
    _check_input(x, qweight, bias, in_features)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _check_input(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> None:
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise packing.PackedFormatError(
            f"linear_packed: input of shape {tuple(x.shape)} does not end in in_features={in_features}"
        )
    if bias is not None and tuple(bias.shape) != (qweight.shape[0],):
        raise packing.PackedFormatError(
            f"linear_packed: bias of shape {tuple(bias.shape)} does not match {qweight.shape[0]} outputs"
        )


def setup_packed_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    """Autograd context of a packed-linear op; its first nine inputs are those of ``linear_packed``."""
    x, qweight, scales, zeros, g_idx, bias, bits, group_size, in_features = inputs[:9]
    ctx.save_for_backward(qweight, scales, zeros, g_idx)
    ctx.layout = (bits, group_size, in_features)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.num_inputs = len(inputs)


def packed_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    """``dL/dx = grad · W`` and ``dL/dbias = Σ grad``; the packed tensors get no gradient.

    For ops that also quantize ``x`` this is the straight-through estimator of that rounding.
    """
    qweight, scales, zeros, g_idx = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = packing.dequantize(qweight, scales, zeros, g_idx, *ctx.layout)
        grad_x = grad.matmul(weight.to(grad.dtype)).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0)
    return (grad_x, None, None, None, None, grad_bias) + (None,) * (ctx.num_inputs - 6)


def _is_registered() -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), "linear_packed")


def _register() -> None:
    op = torch.library.custom_op(
        f"{NAMESPACE}::linear_packed", _linear_packed, mutates_args=(), schema=LINEAR_PACKED_SCHEMA
    )
    op.register_fake(_linear_packed_fake)
    op.register_autograd(packed_backward, setup_context=setup_packed_context)
    log.debug("registered %s::linear_packed", NAMESPACE)


if not _is_registered():
    _register()

#: The op overload that graphs call and backends match on.
linear_packed = torch.ops.lowbit.linear_packed.default

__all__ = ["LINEAR_PACKED_SCHEMA", "NAMESPACE", "linear_packed"]
