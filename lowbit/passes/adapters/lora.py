"""``lora``: low-rank adapters (Hu et al. 2021) with PEFT's inits, including PiSSA (docs/methods.md (LoRA)).

``y = x Wᵀ + b + scale · dropout(x) Aᵀ Bᵀ`` with ``A ∈ R^{r×i}``, ``B ∈ R^{o×r}`` and
``scale = α/r`` (``α/√r`` with rsLoRA). Inits, as PEFT names them:

- ``kaiming`` (PEFT's default): ``A ~ kaiming_uniform(a=√5)``, ``B = 0``;
- ``gaussian``: ``A ~ N(0, 1/r)``, ``B = 0``;
- ``pissa``: the top-r SVD factors of ``W`` (fp32) split as ``A = √S' V_rᵀ``,
  ``B = U_r √S'`` with ``S' = S_r / scale``; the base weight becomes the residual
  ``W − scale·B A``, so the output is unchanged at init. Needs dropout 0.

Kaiming and gaussian LoRA also attach to a packed (quantized) base — the QLoRA pattern:
the packed weight stays frozen and the adapter trains in full precision.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import PassConfigError
from lowbit.ir.annotations import Adapter
from lowbit.passes.adapters.common import AdapterConfig, AdapterModule, AdapterPass, BaseLayer
from lowbit.passes.config import option
from lowbit.passes.registry import register

log = logging.getLogger(__name__)


class LoRAModule(AdapterModule):
    """``scale · B(A(dropout(x)))``; ``delta_weight`` is ``scale · B A``."""

    kind = "lora"

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features, rank)
        self.scale = scale
        self.p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.zeros(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.linear(F.linear(self.dropout(x).to(self.A.dtype), self.A), self.B) * self.scale).to(x.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.B.detach().float() @ self.A.detach().float())

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "scale": self.scale, "dropout": self.p}


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """Options of the ``lora`` pass (PEFT's defaults: r=8, alpha=8, dropout 0, kaiming init)."""

    rank: int = option(8, min=1, help="adapter rank r")
    alpha: float = option(8.0, min=0, min_exclusive=True, help="scaling numerator: scale = alpha / r")
    dropout: float = option(0.0, min=0, max=1, help="dropout on the adapter branch input")
    init: str = option("kaiming", choices=("kaiming", "gaussian", "pissa"), help="how A and B start")
    rslora: bool = option(False, help="rank-stabilized scaling alpha / sqrt(r)")

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if self.init == "pissa" and self.dropout != 0:
            raise PassConfigError(
                f"{pass_name}: init='pissa' needs dropout=0 (got {self.dropout}); with dropout the principal "
                "part is dropped from the output and the init no longer preserves the model"
            )

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


@register
class LoRA(AdapterPass):
    """Attach a LoRA adapter to every targeted linear layer; only adapters stay trainable."""

    name = "lora"
    Config = LoRAConfig
    after_pack = True

    def supports_packed(self, config: LoRAConfig) -> bool:
        return config.init != "pissa"

    def describe(self, config: LoRAConfig) -> str:
        return f"lora with init='{config.init}'"

    def build(self, gm: fx.GraphModule, layer: BaseLayer, config: LoRAConfig) -> tuple[AdapterModule, Adapter]:
        module = LoRAModule(layer.in_features, layer.out_features, config.rank, config.scale, config.dropout)
        with torch.no_grad():
            if config.init == "kaiming":
                nn.init.kaiming_uniform_(module.A, a=math.sqrt(5))
            elif config.init == "gaussian":
                nn.init.normal_(module.A, std=1 / config.rank)
            else:
                linear = gm.get_submodule(layer.path)
                linear.weight.copy_(pissa_init(module, linear.weight))
        log.debug("lora: %s r%d init=%s scale=%.4g", layer.path, config.rank, config.init, config.scale)
        return module, Adapter(kind="lora", rank=config.rank, variant=config.init)


def pissa_init(module: LoRAModule, weight: torch.Tensor) -> torch.Tensor:
    """Set A, B to PiSSA's principal factors of ``weight``; return the residual base weight."""
    r, scale = module.rank, module.scale
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    sr = s[:r] / scale
    a = torch.diag(torch.sqrt(sr)) @ vh[:r]
    b = u[:, :r] @ torch.diag(torch.sqrt(sr))
    module.A.copy_(a)
    module.B.copy_(b)
    module.residual_base = True
    return (weight.to(torch.float32) - scale * b @ a).to(weight.dtype)


__all__ = ["LoRA", "LoRAConfig", "LoRAModule", "pissa_init"]
