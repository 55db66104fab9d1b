"""``weight_compander``: the weight compander (Cakaj et al., IJCNN 2023) on conv and linear weights.

Each weight becomes ``a·arctan(v/b)`` of a latent ``v`` that starts at the exact inverse, so
the model is unchanged at the start; ``a, b`` are fixed or learned per layer. The helpers place
weight decay as the paper prescribes (`compander_param_groups`, `compander_decay_penalty`) and
rescale adaptive optimizer steps (`CompanderStepRescaling`); docs/methods.md (weight compander).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lowbit.ir.annotations import Reparam
from lowbit.ir.graph import layers
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.registry import register
from lowbit.passes.reparam.common import CONV_LINEAR, ReparamError, annotate_calls, skip_reason
from lowbit.passes.selection import matches_any

log = logging.getLogger(__name__)


class CompanderInitError(ReparamError):
    """A weight is outside ``(−a·π/2, a·π/2)``, the range of ``Ψ``, so ``Ψ⁻¹(w)`` does not exist."""


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class Compander(nn.Module):
    """The parametrization ``Ψ(v) = a·arctan(v/b)`` with its exact inverse ``b·tan(w/a)``."""

    def __init__(self, a: float, b: float, learnable: bool) -> None:
        super().__init__()
        self.learnable = learnable
        if learnable:
            self.raw_a = nn.Parameter(torch.tensor(_inverse_softplus(a)))
            self.raw_b = nn.Parameter(torch.tensor(_inverse_softplus(b)))
        else:
            self.register_buffer("fixed_a", torch.tensor(float(a)))
            self.register_buffer("fixed_b", torch.tensor(float(b)))

    @property
    def a(self) -> torch.Tensor:
        return F.softplus(self.raw_a) if self.learnable else self.fixed_a

    @property
    def b(self) -> torch.Tensor:
        return F.softplus(self.raw_b) if self.learnable else self.fixed_b

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.a * torch.atan(v / self.b)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return self.b * torch.tan(w / self.a)

    def derivative(self, v: torch.Tensor) -> torch.Tensor:
        """``Ψ'(v) = (a/b) / (1 + v²/b²)``, always positive."""
        a, b = self.a, self.b
        return (a / b) / (1 + (v / b) ** 2)

    def extra_repr(self) -> str:
        return f"a={self.a.item():.4g}, b={self.b.item():.4g}, learnable={self.learnable}"


@dataclass(frozen=True)
class CompanderConfig(PassConfig):
    """Options of the ``weight_compander`` pass."""

    a: float = option(
        0.5, min=0.0, min_exclusive=True, help="output scale a > 0 (|w| < a·π/2); the paper assumes a >= 0.5"
    )
    b: float = option(1.0, min=0.0, min_exclusive=True, help="input scale b > 0")
    learnable: bool = option(False, help="train (a, b) per layer (the paper's 'fine' variant) instead of fixing them")
    ignore: tuple[str, ...] = option((), help="layers left as they are: module paths or glob/re: patterns")


@register
class WeightCompander(Pass):
    """Reparameterize conv/linear weights as ``a·arctan(v/b)``, starting from the exact inverse."""

    name = "weight_compander"
    Config = CompanderConfig
    stage = "prepare"
    produces = frozenset({"reparam"})
    forbids = frozenset({"quant", "fake_quant"})
    pattern = "nn.Linear, nn.Conv*, nn.ConvTranspose*"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records: list[LayerRecord] = []
        for path, module, nodes in layers(gm, CONV_LINEAR):
            reason = "ignored" if matches_any(path, self.config.ignore) else skip_reason(gm, path, module)
            config = None if reason else self.config_for(path)
            if config is None:
                records.append(LayerRecord(path, "skipped", reason or "skipped by a per-layer override"))
                continue
            if config.a < 0.5:
                log.warning("weight_compander: %s: a=%g < 0.5, which the paper found to hurt", path, config.a)
            compander = Compander(config.a, config.b, config.learnable).to(module.weight.device)
            _check_range(path, module.weight, compander)
            parametrize.register_parametrization(module, "weight", compander)
            variant = "learnable" if config.learnable else "fixed"
            reparam = Reparam("weight_compander", f"a={config.a:g}, b={config.b:g}, {variant}")
            annotate_calls(nodes, path, reparam=reparam)
            stats = {"a": config.a, "b": config.b, "learnable": config.learnable}
            records.append(LayerRecord(path, "reparameterized", stats=stats))
        count = sum(r.action == "reparameterized" for r in records)
        log.info("weight_compander: %d layer(s) reparameterized, %d skipped", count, len(records) - count)
        return PassResult(
            changed=count > 0, layers=records, stats={"reparameterized": count, "skipped": len(records) - count}
        )


def _check_range(path: str, weight: torch.Tensor, compander: Compander) -> None:
    bound = compander.a.item() * math.pi / 2
    largest = weight.detach().abs().max().item()
    if not largest < bound:
        raise CompanderInitError(
            f"weight_compander: layer '{path}' has max |w| = {largest:.4g} >= a·π/2 = {bound:.4g}, "
            "so v = b·tan(w/a) is undefined; use a larger a or ignore the layer"
        )


def companders(module: nn.Module) -> Iterator[tuple[nn.Module, Compander]]:
    """Every (layer, compander) pair under ``module``."""
    for layer in module.modules():
        if parametrize.is_parametrized(layer, "weight"):
            first = layer.parametrizations.weight[0]
            if isinstance(first, Compander):
                yield layer, first


def _latent(layer: nn.Module) -> nn.Parameter:
    return layer.parametrizations.weight.original


def compander_param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups with weight decay where the paper puts it.

    Fixed variant: ``v`` gets no optimizer decay (add `compander_decay_penalty` to the loss
    instead, which decays ``Ψ(v)``). Learnable variant: ``v`` is decayed, ``a`` and ``b``
    are not. Every other parameter is decayed with ``weight_decay`` as usual.
    """
    no_decay: dict[int, nn.Parameter] = {}
    for layer, compander in companders(module):
        if compander.learnable:
            no_decay.update({id(p): p for p in compander.parameters()})
        else:
            no_decay[id(_latent(layer))] = _latent(layer)
    decay = [p for p in module.parameters() if id(p) not in no_decay]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": list(no_decay.values()), "weight_decay": 0.0},
    ]


def compander_decay_penalty(module: nn.Module, weight_decay: float) -> torch.Tensor:
    """The fixed variant's weight decay on ``w = Ψ(v)``: ``(λ/2)·Σ Ψ(v)²``, to add to the loss.

    Its gradient with respect to ``w`` is ``λ·w``, the same as torch's ``weight_decay=λ`` on a
    plain weight, reaching ``v`` through the chain rule. Learnable-variant layers contribute nothing.
    """
    terms = [layer.weight.pow(2).sum() for layer, compander in companders(module) if not compander.learnable]
    if not terms:
        return torch.zeros(())
    return 0.5 * weight_decay * torch.stack(terms).sum()


class CompanderStepRescaling:
    """Adam-style optimizers on companded weights: the paper's (Powerpropagation) step rescaling.

    Before ``optimizer.step()`` each latent ``v``'s gradient is divided by ``Ψ'(v)``, so the
    optimizer computes its adaptive step from ``∂L/∂Ψ(v)``; after the step the change of ``v``
    is multiplied by ``Ψ'(v)`` (taken before the step). Plain SGD does not need it. Attach once
    after building the optimizer; `remove` detaches it::

        rescale = CompanderStepRescaling(model, optimizer)
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._targets = [(_latent(layer), c) for layer, c in companders(module) if id(_latent(layer)) in optimized]
        if not self._targets:
            raise ReparamError(
                "CompanderStepRescaling: the optimizer updates no companded weight (run weight_compander first)"
            )
        self._saved: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._handles = [optimizer.register_step_pre_hook(self._before), optimizer.register_step_post_hook(self._after)]

    @torch.no_grad()
    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._saved = []
        for v, compander in self._targets:
            if v.grad is None:
                continue
            slope = compander.derivative(v)
            v.grad.div_(slope)
            self._saved.append((v, v.detach().clone(), slope))

    @torch.no_grad()
    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for v, before, slope in self._saved:
            v.copy_(before + (v - before) * slope)
        self._saved = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


__all__ = [
    "Compander",
    "CompanderConfig",
    "CompanderInitError",
    "CompanderStepRescaling",
    "WeightCompander",
    "compander_decay_penalty",
    "compander_param_groups",
    "companders",
]
