"""``sorsa``: singular-value split adapters with an orthonormal regularizer (Cao et al., docs/methods.md (SORSA)).

The SVD of ``W`` (fp32) splits it into a trainable principal part and a frozen residual:
``A = V_rᵀ`` (r×i), ``S = s[:r]``, ``B = U_r`` (o×r), and the base weight becomes
``W_r = W − scale·B diag(S) A`` (``scale = α/r`` if ``alpha`` is given, else 1, the
authors' default, so ``W_r`` is exactly the SVD tail). Forward:
``y = x W_rᵀ + b + scale · dropout(x) (B diag(S) A)ᵀ``.

The regularizer keeps ``A`` and ``B`` orthonormal:
``L_orth = (1/m) Σ (‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F)`` (non-squared, ``m`` = number of A and B
matrices). The authors apply it as an extra gradient scaled by ``γ/η_peak`` *after*
clipping the task gradient; `orthonormal_regularizer` returns that scaled term.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lowbit.ir.annotations import Adapter
from lowbit.passes.adapters.common import AdapterConfig, AdapterError, AdapterModule, AdapterPass, BaseLayer
from lowbit.passes.config import option
from lowbit.passes.registry import register

log = logging.getLogger(__name__)

#: The authors' regularizer rate γ (scripts/README of Gunale0926/SORSA).
GAMMA = 4e-4


class SORSAModule(AdapterModule):
    """``scale · (dropout(x) Aᵀ ⊙ S) Bᵀ``; ``delta_weight`` is ``scale · B diag(S) A``."""

    kind = "sorsa"

    def __init__(
        self, in_features: int, out_features: int, rank: int, scale: float = 1.0, dropout: float = 0.0
    ) -> None:
        super().__init__(in_features, out_features, rank)
        self.scale = scale
        self.p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.zeros(rank, in_features))
        self.S = nn.Parameter(torch.zeros(rank))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.linear(F.linear(self.dropout(x).to(self.A.dtype), self.A) * self.S, self.B) * self.scale).to(x.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        a, s, b = (p.detach().float() for p in (self.A, self.S, self.B))
        return self.scale * ((b * s) @ a)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "scale": self.scale, "dropout": self.p}


@dataclass(frozen=True)
class SORSAConfig(AdapterConfig):
    """Options of the ``sorsa`` pass (the authors' package defaults: r=4, alpha=None, dropout 0)."""

    rank: int = option(4, min=1, help="number of principal singular components that train")
    alpha: float | None = option(None, min=0, min_exclusive=True, help="scale = alpha / r; None means scale 1")
    dropout: float = option(0.0, min=0, max=1, help="dropout on the adapter branch input")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@register
class SORSA(AdapterPass):
    """Split every targeted linear layer into a trainable SVD principal part and a frozen residual."""

    name = "sorsa"
    Config = SORSAConfig

    def build(self, gm: fx.GraphModule, layer: BaseLayer, config: SORSAConfig) -> tuple[AdapterModule, Adapter]:
        linear = gm.get_submodule(layer.path)
        module = SORSAModule(layer.in_features, layer.out_features, config.rank, config.scale, config.dropout)
        with torch.no_grad():
            linear.weight.copy_(sorsa_init(module, linear.weight))
        log.debug("sorsa: %s r%d scale=%.4g", layer.path, config.rank, module.scale)
        return module, Adapter(kind="sorsa", rank=config.rank)


def sorsa_init(module: SORSAModule, weight: torch.Tensor) -> torch.Tensor:
    """Set A, S, B from the SVD of ``weight`` (taken in fp32, as ``svd(Wᵀ)`` in the authors' code).

    Returns the residual base weight ``W − scale·B diag(S) A``.
    """
    r = module.rank
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32).T, full_matrices=False)
    # svd(Wᵀ) = U' S V'ᵀ: A = U'[:, :r]ᵀ (= V_rᵀ of W), B = V'ᵀ[:r]ᵀ (= U_r of W).
    module.A.copy_(u[:, :r].T)
    module.S.copy_(s[:r])
    module.B.copy_(vh[:r].T)
    module.residual_base = True
    return (weight.to(torch.float32) - module.delta_weight(weight)).to(weight.dtype)


def sorsa_modules(model: nn.Module) -> list[SORSAModule]:
    return [m for m in model.modules() if isinstance(m, SORSAModule)]


def orthonormal_loss(model: nn.Module) -> torch.Tensor:
    """``L_orth = (1/m) Σ (‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F)`` over the SORSA adapters of ``model``.

    The Frobenius norm is not squared (as in the authors' ``calc_ortho``); torch's norm
    backward returns 0 at an exactly orthonormal factor, so the gradient stays finite.
    """
    modules = sorsa_modules(model)
    if not modules:
        raise AdapterError("orthonormal_loss: the model carries no sorsa adapter")
    total = []
    for m in modules:
        eye = torch.eye(m.rank, device=m.A.device, dtype=m.A.dtype)
        total.append(torch.linalg.matrix_norm(m.A @ m.A.T - eye))
        total.append(torch.linalg.matrix_norm(m.B.T @ m.B - eye))
    return torch.stack(total).sum() / len(total)


def orthonormal_regularizer(model: nn.Module, peak_lr: float, gamma: float = GAMMA) -> torch.Tensor:
    """The term the authors back-propagate: ``(γ / η_peak) · L_orth``.

    Use it as they do: backward the task loss, clip gradients (to 1.0), then backward
    this term so its gradient adds to the clipped ones unclipped, then step the optimizer
    with the scheduled learning rate. ``peak_lr`` is the schedule's peak, not the current LR.
    """
    if peak_lr <= 0:
        raise AdapterError(f"orthonormal_regularizer: peak_lr must be > 0, got {peak_lr}")
    return (gamma / peak_lr) * orthonormal_loss(model)


__all__ = ["GAMMA", "SORSA", "SORSAConfig", "SORSAModule", "orthonormal_loss", "orthonormal_regularizer", "sorsa_init"]
