"""``binary``: 1-bit weights ``±α`` with a real scale (BinaryConnect / XNOR-Net style).

Per output channel (default), per group of input columns or per tensor:
``α = mean |W|`` over the block, which minimises ``‖W − α·sign₊(W)‖_F`` for a fixed
sign pattern, and ``W_b = α·sign₊(W)`` with ``sign₊(w) = +1 for w ≥ 0`` (so 0 and −0.0
map to ``+α``; never ``torch.sign(0) = 0``, see docs/methods.md (BinaryConnect)).

Packed format: code ``q = 1`` for ``+α``, ``0`` for ``−α``, 1 bit per weight, no stored
zeros (1-bit default zero 0.5). Because ``w = scale·(q − 0.5)``, the stored scale is
``2α``, which dequantizes to exactly ``±α`` (multiplying by 2 and 0.5 is exact).
An all-zero block gets ``α = 0`` and stays exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.passes.quant.fewlevel import FewLevelConfig, FewLevelPass, checked_weight, group_width, scale_statistic
from lowbit.passes.quant.grid import QuantizedWeight
from lowbit.passes.registry import register


@dataclass(frozen=True)
class BinaryConfig(FewLevelConfig):
    """Options of the ``binary`` pass: the scale granularity (per channel by default)."""


def binary_quantize(
    weight: torch.Tensor,
    granularity: str = "per_channel",
    group_size: int | None = None,
    *,
    name: str | None = None,
) -> QuantizedWeight:
    """Binarize ``weight`` ``(N, K)`` (module doc); ``name`` is the layer used in errors."""
    w = checked_weight(weight, name)
    group = group_width(granularity, group_size, w.shape[1])
    alpha = scale_statistic(w.abs(), granularity, group, lambda block: block.mean(dim=1))
    codes = (w >= 0).to(torch.uint8)
    return QuantizedWeight(codes, 2 * alpha, None, None, 1, group)


@register
class Binary(FewLevelPass):
    """Binary (1-bit) weights for every linear and convolution not ignored or skipped."""

    name = "binary"
    Config = BinaryConfig

    def quantize(self, weight: torch.Tensor, config: BinaryConfig, name: str) -> QuantizedWeight:
        return binary_quantize(weight, config.granularity, config.group_size, name=name)


__all__ = ["Binary", "BinaryConfig", "binary_quantize"]
