"""``prune_gradual``: gradual magnitude pruning on Zhu & Gupta's cubic schedule (docs/methods.md (Gradual pruning)).

The pass (prepare stage) installs all-ones-or-``initial_sparsity`` masks; training then
calls the callback from `PruneGradual.callback` after each optimizer step. At step ``t``
the target is

    s_t = s_f + (s_i − s_f)·(1 − p)³,   p = clip((t − t₀)/(t_end − t₀), 0, 1)

and, every ``frequency`` steps within ``[t₀, t_end]``, each layer independently keeps
``k = max(round(n(1 − s_t)), 1)`` weights: those with ``|w| ≥`` the k-th largest
``|w|`` (ties kept), and the pruned weights are zeroed (``w ← w·mask``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from lowbit.errors import PassConfigError
from lowbit.ir.annotations import get_meta
from lowbit.passes.base import PassContext
from lowbit.passes.config import option
from lowbit.passes.prune.masks import (
    Layer,
    MaskPass,
    PruneConfig,
    check_sparsity,
    install_mask,
    keep_count,
    layer_calls,
)
from lowbit.passes.registry import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradualConfig(PruneConfig):
    """Options of ``prune_gradual``; ``sparsity`` is the final sparsity ``s_f``."""

    initial_sparsity: float = option(0.0, help="sparsity s_i at start_step")
    start_step: int = option(0, min=0, help="first pruning step t₀")
    end_step: int = option(1000, min=0, help="step t_end at which the final sparsity is reached")
    frequency: int = option(100, min=1, help="update the masks every this many steps (Δt)")

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        check_sparsity(pass_name, "initial_sparsity", self.initial_sparsity)
        if self.end_step <= self.start_step:
            raise PassConfigError(f"{pass_name}: end_step={self.end_step} must come after start_step={self.start_step}")
        if self.initial_sparsity > self.sparsity:
            raise PassConfigError(
                f"{pass_name}: initial_sparsity={self.initial_sparsity} exceeds the final "
                f"sparsity={self.sparsity}; the schedule only prunes more over time"
            )


def cubic_sparsity(step: int, config: GradualConfig) -> float:
    """Zhu & Gupta's target sparsity at ``step`` (power 3, progress clipped to [0, 1])."""
    progress = min(max((step - config.start_step) / (config.end_step - config.start_step), 0.0), 1.0)
    return config.sparsity + (config.initial_sparsity - config.sparsity) * (1.0 - progress) ** 3


def threshold_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep ``|w| ≥`` the k-th largest ``|w|``, ``k = max(round(n(1 − s)), 1)``; ties are kept."""
    magnitude = weight.detach().abs().float().flatten()
    k = max(keep_count(magnitude.numel(), sparsity), 1)
    threshold = torch.topk(magnitude, k, sorted=True).values[-1]
    return (magnitude >= threshold).view_as(weight)


@register
class PruneGradual(MaskPass):
    """Install masks for gradual magnitude pruning; `callback` updates them during training."""

    name = "prune_gradual"
    Config = GradualConfig
    stage = "prepare"

    def masks(self, gm: fx.GraphModule, layers: list[Layer], ctx: PassContext) -> dict[str, tuple[torch.Tensor, float]]:
        return {l.path: (threshold_mask(l.weight, l.config.initial_sparsity), l.config.sparsity) for l in layers}

    def callback(self, gm: fx.GraphModule) -> GradualPruning:
        """The training callback for ``gm`` (the graph this pass prepared): call it with each step."""
        return GradualPruning(gm, self)


class GradualPruning:
    """Call ``cb(step)`` after each optimizer step; it re-prunes on the schedule's update steps.

    Returns True on steps where the masks changed. Each layer follows its own config
    (per-layer overrides of the pass), found through the layers' ``prune_gradual`` annotations.
    """

    def __init__(self, gm: fx.GraphModule, pruner: PruneGradual) -> None:
        self.gm = gm
        self.layers: list[Layer] = []
        for path, calls in layer_calls(gm).items():
            meta = get_meta(calls[0])
            if meta is not None and meta.sparsity is not None and meta.sparsity.method == pruner.name:
                self.layers.append(Layer(path, gm.get_submodule(path), calls, pruner.config_for(path)))
        if not self.layers:
            raise PassConfigError(
                f"{pruner.name}: the graph has no layers masked by {pruner.name}; "
                "build the callback for the graph the pass returned"
            )

    def __call__(self, step: int) -> bool:
        updated = False
        for layer in self.layers:
            config = layer.config
            if not config.start_step <= step <= config.end_step or (step - config.start_step) % config.frequency:
                continue
            target = cubic_sparsity(step, config)
            sparsity = install_mask(
                self.gm, layer, threshold_mask(layer.weight, target), "unstructured", PruneGradual.name, config.sparsity
            )
            log.debug(
                "prune_gradual: step %d %s target %.4f achieved %.4f", step, layer.path, target, sparsity.sparsity
            )
            updated = True
        return updated


__all__ = ["GradualConfig", "GradualPruning", "PruneGradual", "cubic_sparsity", "threshold_mask"]
