"""``prune_lamp``: global pruning by LAMP score (Lee et al., ICLR 2021; docs/methods.md (LAMP)).

Within a layer, sort the masked weights by ``w²`` ascending; the score of the weight at
sorted position ``u`` is ``w[u]² / Σ_{v ≥ u} w[v]²``. The ``K = round((1 − s)·Σn)``
highest scores across all layers survive; each layer keeps its own top ``keep_l`` by
magnitude (score order equals magnitude order within a layer). A layer's largest
weight scores 1, so no layer is emptied. Already-pruned zeros score 0.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lowbit.passes.base import PassContext
from lowbit.passes.prune.masks import Layer, MaskPass, fixed_layers, keep_count, keep_largest
from lowbit.passes.registry import register


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP scores of ``weight`` (same shape); zeros score 0, the largest entry scores 1."""
    squared = weight.detach().float().flatten() ** 2
    order = torch.argsort(squared, stable=True)
    sorted_sq = squared[order]
    tail = sorted_sq.flip(0).cumsum(0).flip(0)
    scores_sorted = torch.where(tail > 0, sorted_sq / tail.clamp_min(torch.finfo(tail.dtype).tiny), 0.0)
    scores = torch.empty_like(squared)
    scores[order] = scores_sorted
    return scores.view_as(weight)


@register
class PruneLAMP(MaskPass):
    """Global unstructured pruning that ranks weights by their layer-normalized LAMP score."""

    name = "prune_lamp"

    def masks(self, gm: fx.GraphModule, layers: list[Layer], ctx: PassContext) -> dict[str, tuple[torch.Tensor, float]]:
        fixed, pool = fixed_layers(layers, self)
        plan = {
            l.path: (keep_largest(l.weight.abs(), keep_count(l.numel, l.config.sparsity)), l.config.sparsity)
            for l in fixed
        }
        if not pool:
            return plan
        scores = torch.cat([lamp_scores(l.weight).flatten() for l in pool])
        survivors = keep_largest(scores, keep_count(scores.numel(), self.config.sparsity))
        for layer, kept in zip(pool, survivors.split([l.numel for l in pool])):
            plan[layer.path] = (keep_largest(layer.weight.abs(), int(kept.sum())), self.config.sparsity)
        return plan


__all__ = ["PruneLAMP", "lamp_scores"]
