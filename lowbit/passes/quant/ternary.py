"""``ternary``: BitNet b1.58 weights {−1, 0, +1} times a real scale (docs/methods.md (BitNet b1.58)).

For each scale block (the whole tensor by default, as BitNet; or a row, or a group of
input columns) with ``γ = max(measure(|W|), 1e−5)``:

- ``absmean`` (BitNet b1.58): ``measure = mean``;
- ``absmedian`` ("BitNet b1.58 Reloaded", Nielsen & Schneider-Kamp): ``measure =
  median`` (``torch.median``: the lower of the two middle values for an even count);

``t = clamp(round(W / γ), −1, 1)``. The packed format stores the codes ``t + 2 ∈ {1, 2,
3}`` at 2 bits per weight with the symmetric default zero point 2 (no stored zeros) and
``γ`` as the scale, so it dequantizes to exactly ``γ·t`` (bitnet.cpp's GPU code uses
the same offset, +2). A per-tensor ``γ`` is stored once per row, all rows equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.passes.config import option
from lowbit.passes.quant.fewlevel import (
    FewLevelConfig,
    FewLevelPass,
    checked_weight,
    group_width,
    per_column,
    scale_statistic,
)
from lowbit.passes.quant.grid import QuantizedWeight
from lowbit.passes.registry import register

#: Floor of γ (BitNet's clamp; also keeps the median of a mostly-zero weight usable).
GAMMA_EPS = 1e-5
#: Code of the ternary value 0; codes are ``t + TERNARY_ZERO``.
TERNARY_ZERO = 2
MEASURES = ("absmean", "absmedian")


@dataclass(frozen=True)
class TernaryConfig(FewLevelConfig):
    """Options of the ``ternary`` pass (BitNet b1.58 defaults: absmean, per tensor)."""

    scale: str = option("absmean", choices=MEASURES, help="γ from mean|W| (BitNet b1.58) or median|W| (Reloaded)")
    granularity: str = option(
        "per_tensor",
        choices=("per_tensor", "per_channel", "per_group"),
        help="one γ per tensor (BitNet), per output channel, or per group of input columns",
    )


def ternary_quantize(
    weight: torch.Tensor,
    scale: str = "absmean",
    granularity: str = "per_tensor",
    group_size: int | None = None,
    *,
    name: str | None = None,
) -> QuantizedWeight:
    """Ternarize ``weight`` ``(N, K)`` (module doc); ``name`` is the layer used in errors."""
    w = checked_weight(weight, name)
    if scale not in MEASURES:
        raise LowbitError(f"scale must be one of {', '.join(MEASURES)}, got {scale!r}")
    group = group_width(granularity, group_size, w.shape[1])
    measure = _mean if scale == "absmean" else _median
    gamma = scale_statistic(w.abs(), granularity, group, measure).clamp(min=GAMMA_EPS)
    ternary = torch.clamp(torch.round(w / per_column(gamma, group, w.shape[1])), -1, 1)
    codes = (ternary + TERNARY_ZERO).to(torch.uint8)
    return QuantizedWeight(codes, gamma, None, None, 2, group)


def _mean(block: torch.Tensor) -> torch.Tensor:
    return block.mean(dim=1)


def _median(block: torch.Tensor) -> torch.Tensor:
    return block.median(dim=1).values


@register
class Ternary(FewLevelPass):
    """Ternary (1.58-bit) weights for every linear and convolution not ignored or skipped."""

    name = "ternary"
    Config = TernaryConfig

    def quantize(self, weight: torch.Tensor, config: TernaryConfig, name: str) -> QuantizedWeight:
        return ternary_quantize(weight, config.scale, config.granularity, config.group_size, name=name)


__all__ = ["GAMMA_EPS", "TERNARY_ZERO", "Ternary", "TernaryConfig", "ternary_quantize"]
