"""Confidence-guided annealing, OFQ's final QAT phase: freeze weights that are confidently quantized.

At each optimizer step, the elements of every StatsQ-quantized weight that lie farther than
``boundary_range`` steps from a rounding boundary get no update (their gradient is zeroed and
their value restored after the step). See docs/methods.md (StatsQ and CGA)::

    cga = CGA(model, boundary_range=0.005).attach(optimizer)
    ...  # loss.backward(); optimizer.step() as usual
    cga.remove()
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lowbit.errors import PassConfigError
from lowbit.passes.reparam.common import ReparamError
from lowbit.passes.reparam.qkr import QKRLinear
from lowbit.passes.reparam.statsq import latent_weight, statsq_of, statsq_pre_round
from lowbit.passes.selection import matches_any

log = logging.getLogger(__name__)


def frozen_mask(weight: torch.Tensor, bits: int, boundary_range: float) -> torch.Tensor:
    """True where ``weight`` is farther than ``boundary_range`` steps from every rounding boundary."""
    z = statsq_pre_round(weight, bits)
    levels = torch.round(z)
    low, high = levels.min(), levels.max()
    if high <= low:
        return torch.ones_like(z, dtype=torch.bool)
    nearest = torch.minimum(torch.maximum(torch.floor(z), low), high - 1) + 0.5
    return (z - nearest).abs() > boundary_range


class CGA:
    """Training hook that freezes confidently quantized StatsQ weights (see the module docstring).

    ``targets`` (module paths or glob/re: patterns) restricts the layers; empty means every
    StatsQ layer with a directly trained weight. ``frozen_fraction`` holds, per layer, the
    share of elements frozen at the last step.
    """

    def __init__(self, module: nn.Module, boundary_range: float = 0.005, targets: tuple[str, ...] = ()) -> None:
        if not 0 < boundary_range < 0.5:
            raise PassConfigError(
                f"cga: boundary_range={boundary_range!r} is out of range; it must be in (0, 0.5) steps"
            )
        self.boundary_range = boundary_range
        self.layers: list[tuple[str, nn.Parameter, int]] = []
        self.skipped: dict[str, str] = {}
        for name, layer in module.named_modules():
            quantizer = statsq_of(layer)
            if quantizer is None or (targets and not matches_any(name, targets)):
                continue
            weight = latent_weight(layer)
            if weight is None:
                self.skipped[name] = (
                    "QKR's W_qk product: OFQ's freeze of it does not change gradients, and q/k are not frozen"
                    if isinstance(layer, QKRLinear)
                    else "StatsQ quantizes a reparameterized weight; fold it first"
                )
                continue
            self.layers.append((name, weight, quantizer.bits))
        if not self.layers:
            raise ReparamError(
                "cga: no StatsQ-quantized weight to anneal (run the statsq pass first, or check targets)"
            )
        self.frozen_fraction: dict[str, float] = {}
        self._saved: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []

    @torch.no_grad()
    def before_step(self) -> None:
        """Zero the gradient of frozen elements and remember their values (call before ``optimizer.step()``)."""
        self._saved = []
        for name, weight, bits in self.layers:
            mask = frozen_mask(weight, bits, self.boundary_range)
            if weight.grad is not None:
                weight.grad.masked_fill_(mask, 0.0)
            self._saved.append((weight, mask, weight.detach().clone()))
            self.frozen_fraction[name] = mask.float().mean().item()

    @torch.no_grad()
    def after_step(self) -> None:
        """Restore the frozen elements (call after ``optimizer.step()``)."""
        for weight, mask, saved in self._saved:
            weight.copy_(torch.where(mask, saved, weight))
        self._saved = []

    def attach(self, optimizer: torch.optim.Optimizer) -> CGA:
        """Run `before_step`/`after_step` around every ``optimizer.step()``; returns self."""
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, weight, _ in self.layers if id(weight) not in optimized]
        if missing:
            raise ReparamError(f"cga: the optimizer does not update {', '.join(missing)}")
        self._handles = [
            optimizer.register_step_pre_hook(lambda *_: self.before_step()),
            optimizer.register_step_post_hook(lambda *_: self.after_step()),
        ]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


__all__ = ["CGA", "frozen_mask"]
