"""``prune_magnitude``: unstructured magnitude pruning, per layer or with one global threshold.

Per layer, each layer loses exactly ``round(s·n)`` of its smallest ``|w|``; globally, the
``round((1 − s)·Σn)`` largest ``|w|`` of all pooled layers survive, so layers with small
weights lose more (and may lose all: use `prune_lamp` for a global ranking that cannot
empty a layer). Scores are taken on the masked weights, so earlier pruning is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from lowbit.passes.base import PassContext
from lowbit.passes.config import option
from lowbit.passes.prune.masks import Layer, MaskPass, PruneConfig, fixed_layers, keep_count, keep_largest
from lowbit.passes.registry import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    """Options of ``prune_magnitude``."""

    scope: Literal["layer", "global"] = option(
        "layer", choices=("layer", "global"), help="one sparsity per layer, or one threshold across layers"
    )


@register
class PruneMagnitude(MaskPass):
    """Zero the smallest-magnitude weights of every Linear/Conv2d, per layer or globally."""

    name = "prune_magnitude"
    Config = MagnitudeConfig

    def masks(self, gm: fx.GraphModule, layers: list[Layer], ctx: PassContext) -> dict[str, tuple[torch.Tensor, float]]:
        if self.config.scope == "layer":
            return {
                l.path: (keep_largest(l.weight.abs(), keep_count(l.numel, l.config.sparsity)), l.config.sparsity)
                for l in layers
            }
        fixed, pool = fixed_layers(layers, self)
        plan = {
            l.path: (keep_largest(l.weight.abs(), keep_count(l.numel, l.config.sparsity)), l.config.sparsity)
            for l in fixed
        }
        if pool:
            scores = torch.cat([l.weight.abs().flatten() for l in pool])
            keep = keep_largest(scores, keep_count(scores.numel(), self.config.sparsity))
            for layer, kept in zip(pool, keep.split([l.numel for l in pool])):
                plan[layer.path] = (kept.view_as(layer.module.weight), self.config.sparsity)
                if not kept.any():
                    log.warning("prune_magnitude: global threshold prunes every weight of %s", layer.path)
        return plan


__all__ = ["MagnitudeConfig", "PruneMagnitude"]
