"""The packed low-bit weight format shared by every quantization pass and backend.

``qweight`` (uint8 codes packed LSB-first per output row), ``scales`` and optional ``zeros``
per group, and an optional act-order ``g_idx``; ``w = scale · (q − zero)``. The layout and its
rules are in docs/methods.md (RTN and the packed format).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)


class PackedFormatError(LowbitError, ValueError):
    """Tensors that do not follow the packed weight format (wrong dtype, shape or range)."""


def check_bits(bits: int) -> None:
    """Raise `PackedFormatError` unless ``bits`` is a supported code width."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise PackedFormatError(f"unsupported bit width {bits!r}; supported: {', '.join(map(str, SUPPORTED_BITS))}")


def default_zero(bits: int) -> float:
    """The zero point implied by ``zeros=None``: ``2^(bits−1)``, or 0.5 for 1 bit."""
    check_bits(bits)
    return 0.5 if bits == 1 else float(2 ** (bits - 1))


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes per packed row: ``ceil(in_features · bits / 8)``."""
    return (in_features * bits + 7) // 8


def num_groups(in_features: int, group_size: int) -> int:
    """Number of scale groups per row, ``ceil(in_features / group_size)``."""
    check_group_size(in_features, group_size)
    return -(-in_features // group_size)


def check_group_size(in_features: int, group_size: int) -> None:
    """Raise unless ``1 ≤ group_size ≤ in_features`` (``group_size == in_features`` is per-channel)."""
    if in_features < 1:
        raise PackedFormatError(f"in_features must be >= 1, got {in_features}")
    if not 1 <= group_size <= in_features:
        raise PackedFormatError(
            f"group_size must be between 1 and in_features={in_features} (per-channel), got {group_size}"
        )


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``(N, K)`` into the LSB-first bit stream ``(N, ceil(K·bits/8))``."""
    check_bits(bits)
    _check_uint8_matrix(codes, "codes")
    largest = int(codes.max()) if codes.numel() else 0
    if largest >= 1 << bits:
        raise PackedFormatError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, got {largest}")
    if 8 % bits == 0:
        return _pack_aligned(codes, bits)
    return _pack_bitstream(codes, bits)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 codes ``(N, in_features)`` from a packed ``(N, bytes)`` tensor."""
    check_bits(bits)
    _check_uint8_matrix(packed, "packed weight")
    expected = packed_row_bytes(in_features, bits)
    if packed.shape[1] != expected:
        raise PackedFormatError(
            f"packed weight has {packed.shape[1]} bytes per row; {in_features} {bits}-bit codes need {expected}"
        )
    if 8 % bits == 0:
        return _unpack_aligned(packed, bits, in_features)
    return _unpack_bitstream(packed, bits, in_features)


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The group of every input column as int64 ``(in_features,)``: ``g_idx`` or ``k // group_size``."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    return torch.arange(in_features, device=device) // group_size


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The float32 weight ``(N, in_features)`` that a packed weight stands for (see the module doc)."""
    check_layout(qweight, scales, zeros, g_idx, bits, group_size, in_features)
    return dequantize_codes(unpack(qweight, bits, in_features), scales, zeros, g_idx, bits, group_size)


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``scale · (q − zero)`` for unpacked ``codes`` ``(N, K)``, as float32.

    Whole contiguous groups broadcast their scale over a ``(N, groups, group_size)``
    view; act-order ``g_idx`` and a shorter last group gather per column instead. Both
    give the same values.
    """
    rows, columns = codes.shape
    zero = default_zero(bits) if zeros is None else zeros
    if g_idx is None and columns % group_size == 0:
        grouped = codes.to(torch.float32).view(rows, columns // group_size, group_size)
        zero = zero if zeros is None else zero.unsqueeze(-1)
        return ((grouped - zero) * scales.unsqueeze(-1)).view(rows, columns)
    index = group_index(columns, group_size, g_idx, codes.device)
    zero = zero if zeros is None else zero[:, index]
    return (codes.to(torch.float32) - zero) * scales[:, index]


def check_layout(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> None:
    """Check dtypes and shapes of a packed weight (cheap: never reads tensor values)."""
    check_bits(bits)
    groups = num_groups(in_features, group_size)
    _check_uint8_matrix(qweight, "qweight")
    expected = (qweight.shape[0], groups)
    for name, tensor in (("scales", scales), ("zeros", zeros)):
        if tensor is None:
            continue
        if tensor.dtype != torch.float32 or tuple(tensor.shape) != expected:
            raise PackedFormatError(
                f"{name} must be float32 of shape {expected} (rows, ceil({in_features}/{group_size})), "
                f"got {tensor.dtype} {tuple(tensor.shape)}"
            )
    if g_idx is not None and (g_idx.dtype != torch.int32 or tuple(g_idx.shape) != (in_features,)):
        raise PackedFormatError(
            f"g_idx must be int32 of shape ({in_features},), got {g_idx.dtype} {tuple(g_idx.shape)}"
        )


def check_g_idx_range(g_idx: torch.Tensor, in_features: int, group_size: int) -> None:
    """Raise unless every entry of ``g_idx`` names an existing group (reads the values)."""
    groups = num_groups(in_features, group_size)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise PackedFormatError(
            f"g_idx values must lie in [0, {groups - 1}], got [{int(g_idx.min())}, {int(g_idx.max())}]"
        )


def _check_uint8_matrix(tensor: torch.Tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise PackedFormatError(f"{what} must be a 2-D uint8 tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.uint8 or tensor.dim() != 2:
        raise PackedFormatError(
            f"{what} must be a 2-D uint8 tensor, got {tensor.dtype} tensor of shape {tuple(tensor.shape)}"
        )


def _pack_aligned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Fast path for widths dividing 8: each byte holds ``8 // bits`` whole codes."""
    per_byte = 8 // bits
    rows, width = codes.shape
    padded = _pad_columns(codes.to(torch.int32), -width % per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    lanes = padded.reshape(rows, -1, per_byte) << shifts
    return lanes.sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def _unpack_aligned(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    lanes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return lanes.reshape(packed.shape[0], -1)[:, :in_features].to(torch.uint8)


def _pack_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Generic path (3 bits): spread codes into single bits, then regroup the bits by 8."""
    rows, width = codes.shape
    bit_positions = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = ((codes.to(torch.int32).unsqueeze(-1) >> bit_positions) & 1).reshape(rows, width * bits)
    stream = _pad_columns(stream, -(width * bits) % 8)
    weights = torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream.reshape(rows, -1, 8) << weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def _unpack_bitstream(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    rows = packed.shape[0]
    byte_bits = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> byte_bits) & 1).reshape(rows, -1)
    stream = stream[:, : in_features * bits].reshape(rows, in_features, bits)
    bit_positions = torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream << bit_positions).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def _pad_columns(tensor: torch.Tensor, extra: int) -> torch.Tensor:
    if extra == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, extra))


__all__ = [
    "SUPPORTED_BITS",
    "PackedFormatError",
    "check_bits",
    "check_g_idx_range",
    "check_group_size",
    "check_layout",
    "default_zero",
    "dequantize",
    "group_index",
    "num_groups",
    "pack",
    "packed_row_bytes",
    "unpack",
]
