"""The uniform quantization grid that RTN, GPTQ, AWQ and QAT fit per row and group.

Asymmetric or symmetric ranges that always contain 0 (so a zero weight decodes to exactly 0),
and `clipped_group_params`, the optional MSE range search of GPTQ's ``mse`` option. The math
is in docs/methods.md (RTN and the packed format: the uniform grid).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.ir import packing

log = logging.getLogger(__name__)

#: Code widths the grid quantizes to (1-bit weights use the binary pass's own grid).
GRID_BITS: tuple[int, ...] = (2, 3, 4, 8)
#: Group widths `effective_group_size` falls back to with ``divisible``: multiples of this many columns (whole
#: words of every packed kernel's code layout, and llama.cpp's block width).
GROUP_QUANTUM = 32
#: Floating-point types the scales may be rounded to (`round_scales`).
SCALE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class QuantizedWeight:
    """Unpacked result of quantizing a weight ``(N, K)``: codes plus per-group scale and zero.

    ``zeros`` is None for symmetric grids (the format's default zero point) and
    ``g_idx`` is None unless a quantizer reorders columns (act-order). ``group_size`` is
    the effective width (``K`` for per-channel).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def pack(self) -> torch.Tensor:
        """The packed ``qweight`` tensor of the format (see `lowbit.ir.packing`)."""
        return packing.pack(self.codes, self.bits)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these codes stand for (what the packed form decodes to)."""
        return packing.dequantize_codes(self.codes, self.scales, self.zeros, self.g_idx, self.bits, self.group_size)


def effective_group_size(group_size: int, in_features: int, divisible: bool = False) -> int:
    """The group width actually used: ``in_features`` for ``-1`` or any width ≥ ``in_features``.

    With ``divisible``, a ``group_size`` that does not divide ``in_features`` becomes the largest multiple of
    `GROUP_QUANTUM` below it that does (SmolLM2's 576 inputs in groups of 128 get groups of 96), so that no short
    last group is left for the kernels to pad; where no such multiple exists the groups stay as asked.
    """
    if group_size == -1 or group_size >= in_features:
        return in_features
    if group_size < 1:
        raise LowbitError(f"group_size must be -1 (per-channel) or >= 1, got {group_size}")
    if divisible and in_features % group_size:
        fitting = [g for g in range(GROUP_QUANTUM, group_size, GROUP_QUANTUM) if in_features % g == 0]
        return fitting[-1] if fitting else group_size
    return group_size


def round_scales(scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scales`` rounded to the nearest values of ``dtype`` (clamped into its positive normal range), in
    ``scales``' dtype: float16 scales halve what the kernels store, and the kernels decode the same numbers."""
    if dtype == scales.dtype or dtype == torch.float32:
        return scales
    info = torch.finfo(dtype)
    return scales.clamp(info.tiny, info.max).to(dtype).to(scales.dtype)


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    *,
    name: str | None = None,
    divisible_groups: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """Round ``w`` ``(N, K)`` to the nearest point of its per-group GPTQ grid.

    ``group_size=-1`` means per-channel; ``divisible_groups`` and ``scale_dtype``: `effective_group_size`,
    `round_scales`. ``name`` (the layer's module path) is used in error messages. Computation happens in float32
    on ``w``'s device.
    """
    weight = _checked_weight(w, bits, name)
    group = effective_group_size(group_size, weight.shape[1], divisible_groups)
    scales, zeros = _grid_params(*_group_range(weight, group), bits, symmetric, scale_dtype)
    zero = packing.default_zero(bits) if zeros is None else _per_column(zeros, group, weight.shape[1])
    codes = grid_codes(weight, _per_column(scales, group, weight.shape[1]), zero, bits)
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros, None, bits, group)


def group_params(
    w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row scale and zero point ``(N,)`` of the grid of one column group ``w`` ``(N, width)``.

    The zero point is None for a symmetric grid (the format's default). Unlike
    `quantize_weight` it keeps ``w``'s dtype and does not validate, so quantizers that
    recompute a group's grid many times (GPTQ) can call it in their inner loop.
    """
    scales, zeros = _grid_params(*_group_range(w, w.shape[1]), bits, symmetric, scale_dtype)
    return scales[:, 0], None if zeros is None else zeros[:, 0]


def clipped_group_params(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    norm: float,
    steps: int = 100,
    max_shrink: float = 0.8,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`group_params` with each row's range shrunk to minimise ``Σ |q(w) − w|^norm`` (module doc).

    All shrink factors are tried at once (``(factors, N, width)`` elements), each with its scale as
    ``scale_dtype`` rounds it; ``p = 1`` comes first and wins ties, so the result is never worse than
    `group_params` on this error.
    """
    xmin, xmax = _group_range(w, w.shape[1])
    factors = 1 - torch.arange(max(int(max_shrink * steps), 1), dtype=w.dtype, device=w.device) / steps
    scales, zeros = _grid_params(
        factors[:, None, None] * xmin, factors[:, None, None] * xmax, bits, symmetric, scale_dtype
    )
    zero = packing.default_zero(bits) if zeros is None else zeros
    error = grid_codes(w, scales, zero, bits).sub_(zero).mul_(scales).sub_(w)
    best = error.abs_().pow_(norm).sum(dim=-1).argmin(dim=0)
    rows = torch.arange(w.shape[0], device=w.device)
    return scales[best, rows, 0], None if zeros is None else zeros[best, rows, 0]


def grid_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, bits: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The grid codes ``clamp(round(w / scale) + zero, 0, 2^bits − 1)`` of ``w``, as floats
    (written into ``out`` if given)."""
    codes = torch.div(w, scale, out=out).round_()
    return codes.add_(zero).clamp_(0, (1 << bits) - 1)


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """``‖reference − approximation‖_F / ‖reference‖_F`` (0 if both are zero, inf if only one is)."""
    reference = reference.detach().to(torch.float32)
    norm = float(torch.linalg.vector_norm(reference))
    error = float(torch.linalg.vector_norm(reference - approximation.detach().to(reference)))
    if norm == 0:
        return 0.0 if error == 0 else float("inf")
    return error / norm


def _checked_weight(w: torch.Tensor, bits: int, name: str | None) -> torch.Tensor:
    where = f"layer '{name}': " if name else ""
    if bits not in GRID_BITS:
        raise LowbitError(f"{where}the quantization grid supports {', '.join(map(str, GRID_BITS))} bits, got {bits!r}")
    if w.dim() != 2 or w.numel() == 0:
        raise LowbitError(f"{where}expected a non-empty 2-D weight (out, in), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise LowbitError(f"{where}expected a floating-point weight, got {w.dtype}")
    weight = w.detach().to(torch.float32)
    if not torch.isfinite(weight).all():
        raise LowbitError(f"{where}weight contains NaN or Inf; it cannot be quantized")
    return weight


def _grid_params(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (rounded to ``scale_dtype``'s values) and zero points (None if symmetric) from clamped group ranges
    (module doc)."""
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scales = round_scales((xmax - xmin) / ((1 << bits) - 1), scale_dtype)
    return scales, None if symmetric else torch.round(-xmin / scales)


def _group_range(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``min(min w, 0)`` and ``max(max w, 0)``, shape ``(N, n_groups)``.

    A shorter last group is padded with zeros, which cannot change a range that is
    clamped to include 0 anyway.
    """
    rows, width = weight.shape
    padded = torch.nn.functional.pad(weight, (0, -width % group)).reshape(rows, -1, group)
    return padded.amin(dim=-1).clamp(max=0), padded.amax(dim=-1).clamp(min=0)


def _per_column(per_group: torch.Tensor, group: int, width: int) -> torch.Tensor:
    """Expand ``(N, n_groups)`` to ``(N, width)``, one entry per input column."""
    return per_group.repeat_interleave(group, dim=1)[:, :width]


__all__ = [
    "GRID_BITS",
    "GROUP_QUANTUM",
    "SCALE_DTYPES",
    "QuantizedWeight",
    "clipped_group_params",
    "effective_group_size",
    "grid_codes",
    "group_params",
    "quantize_weight",
    "relative_error",
    "round_scales",
]
