"""``prune_rd``: rate-distortion layer-adaptive pruning (Xu et al., ICCV 2023).

Each layer's output-distortion curve over candidate sparsities is measured on the calibration
set from the current masks, a knapsack dynamic program picks one sparsity per layer within the
survivor budget, and each layer is magnitude-pruned to it. Layers with a per-layer ``sparsity``
override are pruned to it and left out of the budget. One call is one iteration: run it again
at a higher target (retraining between) to iterate. The math: docs/methods.md (RD pruning).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from lowbit.errors import CalibrationError, PassConfigError
from lowbit.ir.variants import fit_batches, run_batch
from lowbit.passes.base import PassContext, PassResult
from lowbit.passes.config import option
from lowbit.passes.prune.masks import (
    MASK_SUFFIX,
    Layer,
    MaskPass,
    PruneConfig,
    current_mask,
    fixed_layers,
    install_mask,
    keep_count,
    keep_largest,
    mask_sparsity,
)
from lowbit.passes.registry import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RDConfig(PruneConfig):
    """Options of ``prune_rd``; ``sparsity`` is the global target over all pruned layers."""

    grid: int = option(100, min=1, help="M: curve points per layer are φ = 0, 1/M, …, 1")
    worst_case: bool = option(True, help="distortion = max over samples of the per-sample output MSE (else the mean)")
    budget_resolution: int = option(1 << 16, min=1, help="most budget units in the dynamic program")

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if self.grid > 10_000:
            raise PassConfigError(f"{pass_name}: grid={self.grid} is out of range; it must be <= 10000")


@dataclass
class Curve:
    """A layer's distortion at each candidate sparsity."""

    layer: Layer
    sparsities: list[float]
    distortions: list[float]


@register
class PruneRD(MaskPass):
    """Per-layer sparsities from rate-distortion curves and a knapsack DP, then magnitude masks."""

    name = "prune_rd"
    Config = RDConfig
    requires_calibration = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx.require_calibration(
            self.name, "prune_rd needs calibration data to measure its rate-distortion curves: pass calibration="
        )
        return super().run(gm, ctx)

    def masks(self, gm: fx.GraphModule, layers: list[Layer], ctx: PassContext) -> dict[str, tuple[torch.Tensor, float]]:
        for layer in layers:  # the graph applies every layer's mask, so curves can swap masks in place
            install_mask(gm, layer, current_mask(layer.module), "unstructured", self.name, self.config.sparsity)
        gm.recompile()
        fixed, pool = fixed_layers(layers, self)
        plan = {
            layer.path: (
                keep_largest(layer.weight.abs(), keep_count(layer.numel, layer.config.sparsity)),
                layer.config.sparsity,
            )
            for layer in fixed
        }
        if not pool:
            return plan
        curves = self.curves(gm, pool, ctx)
        choice = allocate(curves, self.config.sparsity, self.config.budget_resolution)
        for curve, phi in zip(curves, choice):
            layer = curve.layer
            plan[layer.path] = (keep_largest(layer.weight.abs(), keep_count(layer.numel, phi)), self.config.sparsity)
            log.debug(
                "prune_rd: %s -> φ=%.3f (distortion %.4g)",
                layer.path,
                phi,
                curve.distortions[curve.sparsities.index(phi)],
            )
        return plan

    def curves(self, gm: fx.GraphModule, layers: list[Layer], ctx: PassContext) -> list[Curve]:
        """Each layer's distortion curve on the calibration set, from the current masked model."""
        was_training = gm.training
        gm.eval()
        with torch.no_grad():
            batches = fit_batches(gm, ctx.require_calibration(self.name))
            reference = [_flat_output(run_batch(gm, args, kwargs)) for args, kwargs in batches]
            curves = []
            for layer in ctx.progress(layers, desc="prune_rd curves"):
                mask = getattr(layer.module, MASK_SUFFIX)
                saved = mask.bool()
                order = torch.argsort(layer.weight.abs().flatten(), stable=True)
                start = mask_sparsity(saved)
                grid = sorted(
                    {
                        start,
                        *(j / self.config.grid for j in range(self.config.grid + 1) if j / self.config.grid > start),
                    }
                )
                distortions = []
                for phi in grid:
                    pruned = torch.ones(layer.numel, dtype=torch.bool, device=mask.device)
                    pruned[order[: round(phi * layer.numel)]] = False
                    mask.copy_(pruned.view_as(mask) & saved)
                    distortions.append(self._distortion(gm, batches, reference))
                mask.copy_(saved)
                curves.append(Curve(layer, grid, distortions))
        gm.train(was_training)
        return curves

    def _distortion(self, gm: fx.GraphModule, batches: list, reference: list[torch.Tensor]) -> float:
        per_sample = torch.cat(
            [
                ((_flat_output(run_batch(gm, args, kwargs)) - ref) ** 2).mean(dim=1)
                for (args, kwargs), ref in zip(batches, reference)
            ]
        )
        return float(per_sample.max() if self.config.worst_case else per_sample.mean())


def allocate(curves: list[Curve], sparsity: float, resolution: int) -> list[float]:
    """The knapsack DP: one sparsity per curve minimizing total distortion within the survivor budget."""
    total = sum(c.layer.numel for c in curves)
    budget = keep_count(total, sparsity)
    unit = max(1, math.ceil(budget / resolution))
    slots = budget // unit
    best = torch.zeros(slots + 1, dtype=torch.float64)  # best[s]: least distortion with ≤ s units kept
    choices = []
    for curve in curves:
        cost = [math.ceil((curve.layer.numel - round(phi * curve.layer.numel)) / unit) for phi in curve.sparsities]
        new = torch.full_like(best, float("inf"))
        pick = torch.zeros(slots + 1, dtype=torch.int32)
        for j, (units, distortion) in enumerate(zip(cost, curve.distortions)):
            if units > slots:
                continue
            candidate = torch.full_like(best, float("inf"))
            candidate[units:] = best[: slots + 1 - units] + distortion
            better = candidate < new
            new = torch.where(better, candidate, new)
            pick = torch.where(better, torch.tensor(j, dtype=torch.int32), pick)
        best = new
        choices.append((pick, cost))
    chosen = []
    slot = slots
    for curve, (pick, cost) in zip(reversed(curves), reversed(choices)):
        j = int(pick[slot])
        chosen.append(curve.sparsities[j])
        slot -= cost[j]
    return chosen[::-1]


def _flat_output(output: Any) -> torch.Tensor:
    """All floating tensors of a model output, flattened per sample into one ``(batch, features)`` matrix."""
    tensors = [t for t in _tensors(output) if t.is_floating_point()]
    if not tensors:
        raise CalibrationError("prune_rd: the model returns no floating-point tensor to measure distortion on")
    batch = tensors[0].shape[0] if tensors[0].dim() else 1
    return torch.cat([t.reshape(batch, -1).double() for t in tensors if t.dim() and t.shape[0] == batch], dim=1)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


__all__ = ["PruneRD", "RDConfig", "allocate"]
