"""``torch.ops.lowbit.linear_packed_a8``: a packed-weight linear layer with int8 activations.

``linear_packed_a8(x, qweight, scales, zeros, g_idx, bias, bits, group_size, in_features, act_scale)``
quantizes its input to symmetric int8 (per token, or with one static step ``act_scale``) and
multiplies it by the packed weight. Its PyTorch implementation is the numerical reference every
backend reproduces bit for bit, so its order of operations is fixed: docs/methods.md (Int8
activations) gives it. A fake implementation serves FakeTensor propagation and torch.export, and
a straight-through gradient for ``x`` and ``bias`` lets the layers around it keep training.
Importing this module registers the op and its verifier check.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from lowbit.errors import VerificationError
from lowbit.ir import ops, packing
from lowbit.ir.annotations import get_meta
from lowbit.ir.graph import get_attr
from lowbit.ir.verify import check

log = logging.getLogger(__name__)

#: int8 range of the quantized activations (asymmetric clamp; docs/methods.md (BitNet b1.58)).
ACT_QMIN, ACT_QMAX = -128, 127
#: Floor of an absmax before ``127 / absmax`` or ``absmax / 127``: the largest power of two that keeps the multiplier
#: finite and the static step a normal float32. It only guards all-zero rows (exactly zero out) and rows below it
#: (subnormal scale), which quantize on its grid; every other row keeps its own scale (docs/methods.md).
ACT_ABSMAX_FLOOR = 2.0**-119

#: The arguments every packed-weight op starts with: the input, the weight's buffers and its packed layout.
PACKED_ARGS_SCHEMA = (
    "Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? g_idx, Tensor? bias, "
    "int bits, int group_size, int in_features"
)
LINEAR_PACKED_A8_SCHEMA = f"({PACKED_ARGS_SCHEMA}, Tensor? act_scale) -> Tensor"


def quantize_activation(x: torch.Tensor, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: the int8 codes of ``x`` (float32 values) and the scale that decodes them.

    Dynamic (``act_scale`` None): the per-token multiplier ``s`` ``(..., 1)``; static:
    the step ``Δ`` itself. `decode_activation` applies it the way the op does.
    """
    xf = x.to(torch.float32)
    if act_scale is None:
        absmax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_ABSMAX_FLOOR)
        # A true division (``127.0 / tensor`` would compute ``reciprocal(tensor) · 127``).
        multiplier = torch.full_like(absmax, 127.0) / absmax
        return torch.clamp(torch.round(xf * multiplier), ACT_QMIN, ACT_QMAX), multiplier
    step = act_scale.to(torch.float32)
    return torch.clamp(torch.round(xf / step), ACT_QMIN, ACT_QMAX), step


def decode_activation(values: torch.Tensor, scale: torch.Tensor, dynamic: bool) -> torch.Tensor:
    """Step 4's rescale: ``values / s`` (dynamic) or ``values · Δ`` (static)."""
    return values / scale if dynamic else values * scale


def fake_quantize_activation(x: torch.Tensor, act_scale: torch.Tensor | None) -> torch.Tensor:
    """``x̂``: the float32 value the int8 codes of ``x`` stand for (``x_int / s`` or ``x_int · Δ``)."""
    codes, scale = quantize_activation(x, act_scale)
    return decode_activation(codes, scale, act_scale is None)


def _linear_packed_a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    act_scale: torch.Tensor | None,
) -> torch.Tensor:
    """Reference kernel, in the order of operations of the module doc."""
    packing.check_layout(qweight, scales, zeros, g_idx, bits, group_size, in_features)
    _check_inputs(x, qweight, bias, in_features, act_scale)
    x_int, act = quantize_activation(x.reshape(-1, in_features), act_scale)
    y = integer_linear(x_int, qweight, scales, zeros, g_idx, bits, group_size, in_features)
    y = decode_activation(y, act, act_scale is None)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)


def integer_linear(
    x_int: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Steps 2 and 3: ``Σ_g scale_g · (x_int · (q − zero))_g`` for int8 codes ``x_int`` ``(T, K)``, float32 ``(T, N)``.

    ``x_int`` may also be ``(C, T, K)``: one input per convolution group, each multiplied by its ``N/C`` consecutive
    rows, the outputs side by side in ``(T, N)``. Each weight group's dot product is exact (float64 sums of integers);
    the groups are added in order in float32.
    """
    batched = x_int if x_int.dim() == 3 else x_int.unsqueeze(0)
    convs, tokens, _ = batched.shape
    count = scales.shape[1]
    columns = packing.group_index(in_features, group_size, g_idx, qweight.device)
    centered = _centered_codes(qweight, zeros, columns, bits, in_features).view(convs, -1, in_features)
    x_groups, w_groups = _grouped(batched.to(torch.float64), centered, columns, count)
    scale = scales.view(convs, 1, -1, count)
    y = torch.zeros(convs, tokens, centered.shape[1], dtype=torch.float32, device=x_int.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, y.numel()))
    for first in range(0, count, chunk):
        part = slice(first, first + chunk)
        acc = torch.matmul(x_groups[part], w_groups[part])  # exact (module doc)
        for offset in range(acc.shape[0]):
            y = y + acc[offset].to(torch.float32) * scale[..., first + offset]
    return y.transpose(0, 1).reshape(tokens, -1)


#: Bound on the float64 elements of one batch of per-group dot products (128 MiB).
_CHUNK_ELEMENTS = 1 << 24


def _centered_codes(
    qweight: torch.Tensor,
    zeros: torch.Tensor | None,
    columns: torch.Tensor,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """``q − zero`` per weight, float64 ``(N, in_features)`` (integers or half-integers)."""
    codes = packing.unpack(qweight, bits, in_features).to(torch.float64)
    if zeros is None:
        return codes - packing.default_zero(bits)
    return codes - zeros.to(torch.float64)[:, columns]


def _grouped(x: torch.Tensor, w: torch.Tensor, columns: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(G, C, T, P)`` and centered codes ``(G, C, P, R)`` per weight group ``G`` and convolution group ``C``
    from ``x`` ``(C, T, K)`` and ``w`` ``(C, R, K)``, zero-padded to the largest weight group.

    Column ``k`` goes to group ``columns[k]`` at its rank among that group's columns, so
    ``matmul`` gives every group's dot product and the padding adds exact zeros.
    """
    counts = torch.bincount(columns, minlength=groups)
    order = torch.argsort(columns, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(columns)
    position[order] = torch.arange(columns.numel(), device=columns.device) - starts[columns[order]]
    width = int(counts.max())
    x_groups = x.new_zeros(groups, width, *x.shape[:2])
    w_groups = w.new_zeros(groups, width, *w.shape[:2])
    x_groups[columns, position] = x.permute(2, 0, 1)
    w_groups[columns, position] = w.permute(2, 0, 1)
    return x_groups.permute(0, 2, 3, 1), w_groups.permute(0, 2, 1, 3)


def _linear_packed_a8_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    act_scale: torch.Tensor | None,
) -> torch.Tensor:
    """Shape function: ``(..., in_features) -> (..., N)`` in ``x``'s dtype and device."""
    packing.check_layout(qweight, scales, zeros, g_idx, bits, group_size, in_features)
    _check_inputs(x, qweight, bias, in_features, act_scale)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _check_inputs(
    x: torch.Tensor,
    qweight: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    act_scale: torch.Tensor | None,
) -> None:
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise packing.PackedFormatError(
            f"linear_packed_a8: input of shape {tuple(x.shape)} does not end in in_features={in_features}"
        )
    if bias is not None and tuple(bias.shape) != (qweight.shape[0],):
        raise packing.PackedFormatError(
            f"linear_packed_a8: bias of shape {tuple(bias.shape)} does not match {qweight.shape[0]} outputs"
        )
    check_act_scale(act_scale, "linear_packed_a8")


def check_act_scale(act_scale: object, where: str) -> None:
    """Raise `PackedFormatError` unless ``act_scale`` is None or a float32 scalar tensor."""
    if act_scale is None:
        return
    if not isinstance(act_scale, torch.Tensor) or act_scale.dtype != torch.float32 or act_scale.dim() != 0:
        got = (
            f"{act_scale.dtype} of shape {tuple(act_scale.shape)}"
            if isinstance(act_scale, torch.Tensor)
            else (type(act_scale).__name__)
        )
        raise packing.PackedFormatError(f"{where}: act_scale must be a float32 scalar tensor, got {got}")


def _register() -> None:
    op = torch.library.custom_op(
        f"{ops.NAMESPACE}::linear_packed_a8", _linear_packed_a8, mutates_args=(), schema=LINEAR_PACKED_A8_SCHEMA
    )
    op.register_fake(_linear_packed_a8_fake)
    op.register_autograd(ops.packed_backward, setup_context=ops.setup_packed_context)
    log.debug("registered %s::linear_packed_a8", ops.NAMESPACE)


if not hasattr(getattr(torch.ops, ops.NAMESPACE), "linear_packed_a8"):
    _register()

#: The op overload that graphs call and backends match on.
linear_packed_a8 = torch.ops.lowbit.linear_packed_a8.default


@check
def _a8_linears_are_consistent(gm: fx.GraphModule) -> None:
    """Each ``linear_packed_a8`` node: annotated w{bits} g{group_size} a8, buffers in the packed layout."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not linear_packed_a8:
            continue
        tensors = list(node.args[1:6])
        bits, group_size, in_features = node.args[6:9]
        act_scale = node.args[9] if len(node.args) > 9 else node.kwargs.get("act_scale")
        meta = get_meta(node)
        if meta is None or meta.quant is None:
            raise VerificationError(f"int8-activation linear '{node.name}' has no quantization annotation")
        if (meta.quant.bits, meta.quant.group_size, meta.quant.act_bits) != (bits, group_size, 8):
            raise VerificationError(
                f"int8-activation linear '{node.name}' computes w{bits} g{group_size} a8 "
                f"but is annotated {meta.quant.describe()}"
            )
        values = [None if t is None else _buffer(gm, node, t) for t in (*tensors, act_scale)]
        try:
            packing.check_layout(*values[:4], bits, group_size, in_features)
            check_act_scale(values[5], f"int8-activation linear '{node.name}'")
        except packing.PackedFormatError as exc:
            raise VerificationError(f"int8-activation linear '{node.name}': {exc}") from exc


def _buffer(gm: fx.GraphModule, node: fx.Node, arg: object) -> object:
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        what = arg.op if isinstance(arg, fx.Node) else type(arg).__name__
        raise VerificationError(
            f"int8-activation linear '{node.name}': input {arg} must be a get_attr of a buffer, not {what}"
        )
    return get_attr(gm, arg)


__all__ = [
    "ACT_ABSMAX_FLOOR",
    "ACT_QMAX",
    "ACT_QMIN",
    "LINEAR_PACKED_A8_SCHEMA",
    "PACKED_ARGS_SCHEMA",
    "check_act_scale",
    "decode_activation",
    "fake_quantize_activation",
    "integer_linear",
    "linear_packed_a8",
    "quantize_activation",
]
