"""``prune_random``: random masks with ERK layer-wise densities (RigL; docs/methods.md (ERK random pruning)).

ERK gives layer ``l`` the raw density ``raw_l = Σ dims_l / Π dims_l`` (kernel dims
included; "er" uses only the input and output widths, "uniform" gives every layer the
global sparsity), scaled by the ``ε`` that meets the global budget:

    ε · Σ_{l∉dense} raw_l·n_l = (1 − S)·Σ_{l∉dense} n_l − S·Σ_{l∈dense} n_l

A layer whose density ``ε·raw_l`` would exceed 1 becomes dense and ``ε`` is re-solved.
Each mask then has exactly ``⌊s_l·n_l⌋`` zeros at uniformly random positions. Layers
with a per-layer ``sparsity`` override keep it and stay out of the solve.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from lowbit.passes.base import PassContext
from lowbit.passes.config import option
from lowbit.passes.prune.masks import Layer, MaskPass, PruneConfig, fixed_layers
from lowbit.passes.registry import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RandomConfig(PruneConfig):
    """Options of ``prune_random``."""

    distribution: Literal["erk", "er", "uniform"] = option(
        "erk", choices=("erk", "er", "uniform"), help="how the global sparsity is split across layers"
    )
    seed: int = option(0, help="seed of the random mask positions")


def erk_sparsities(shapes: dict[str, tuple[int, ...]], sparsity: float, kernel: bool = True) -> dict[str, float]:
    """Per-layer sparsities whose size-weighted mean is ``sparsity``, by (kernel) Erdős–Rényi scaling.

    ``shapes`` holds torch weight shapes ``(out, in, *kernel)``. Layers that would need a
    density above 1 are made dense and the scale is re-solved without them.
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {
        name: (sum(shape) if kernel else shape[0] + shape[1]) / (numel[name] if kernel else shape[0] * shape[1])
        for name, shape in shapes.items()
    }
    dense: set[str] = set()
    while True:
        sparse = [n for n in shapes if n not in dense]
        if not sparse:
            break
        budget = (1 - sparsity) * sum(numel[n] for n in sparse) - sparsity * sum(numel[n] for n in dense)
        epsilon = budget / sum(raw[n] * numel[n] for n in sparse)
        worst = max(sparse, key=lambda n: raw[n])
        if epsilon * raw[worst] <= 1.0:
            break
        log.debug("ERK: %s would have density %.3f > 1; it stays dense", worst, epsilon * raw[worst])
        dense.add(worst)
    return {n: 0.0 if n in dense else max(0.0, 1.0 - epsilon * raw[n]) for n in shapes}


def random_mask(shape: torch.Size, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """A bool mask with exactly ``⌊sparsity·n⌋`` zeros at uniformly random positions."""
    numel = math.prod(shape)
    mask = torch.ones(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[: math.floor(sparsity * numel)]] = False
    return mask.view(shape)


@register
class PruneRandom(MaskPass):
    """Random unstructured masks with ERK (or ER, or uniform) layer-wise sparsities."""

    name = "prune_random"
    Config = RandomConfig

    def masks(self, gm: fx.GraphModule, layers: list[Layer], ctx: PassContext) -> dict[str, tuple[torch.Tensor, float]]:
        fixed, pool = fixed_layers(layers, self)
        targets = {l.path: l.config.sparsity for l in fixed}
        if self.config.distribution == "uniform":
            targets.update({l.path: self.config.sparsity for l in pool})
        elif pool:
            shapes = {l.path: tuple(l.module.weight.shape) for l in pool}
            targets.update(erk_sparsities(shapes, self.config.sparsity, kernel=self.config.distribution == "erk"))
        generator = torch.Generator().manual_seed(self.config.seed)
        return {
            l.path: (random_mask(l.module.weight.shape, targets[l.path], generator), targets[l.path]) for l in layers
        }


__all__ = ["PruneRandom", "RandomConfig", "erk_sparsities", "random_mask"]
