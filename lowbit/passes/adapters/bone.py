"""``bone``: block adapters of Jiale Kang (docs/methods.md (Bone)), in both forms the name has meant.

- ``variant="balance"`` (default): today's **Bone**, "Block-Affine Adaptation", PEFT's
  ``MissConfig`` default mode. A trainable ``D ∈ R^{r×o}`` (zero-init) is added to every
  r-wide input block: ``W'[p, c·r + q] = W[p, c·r + q] + D[q, p]``, computed without
  materializing ``W'`` as ``(Σ_c x_{[c·r:(c+1)·r]}) · D`` (``x`` zero-padded to a multiple
  of r, dropout on ``x`` first). It also attaches to a packed (quantized) base.
- ``variant="bat"``: the original Bone of arXiv v1–v3, now **Bat**, "Block-Affine
  Transformation", PEFT's ``MissConfig(init_weights="bat")``. ``B ∈ R^{(o/r)×r×r}``
  (zero-init), one r×r matrix per output-block row: ``W'_{a,c} = W_{a,c}(I + B_a) + B_a``.
  It reads the base weight every step and needs ``r | in`` and ``r | out``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import PassConfigError
from lowbit.ir.annotations import Adapter
from lowbit.passes.adapters.common import AdapterConfig, AdapterError, AdapterModule, AdapterPass, BaseLayer
from lowbit.passes.config import option
from lowbit.passes.registry import register

log = logging.getLogger(__name__)


class BoneModule(AdapterModule):
    """Shared additive block ``D`` ``(r, out)``: ``(Σ_c dropout(x)_c) · D``."""

    kind = "bone"

    def __init__(self, in_features: int, out_features: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features, rank)
        self.p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.D = nn.Parameter(torch.zeros(rank, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, dtype = self.rank, x.dtype
        x = F.pad(self.dropout(x).to(self.D.dtype), (0, -x.shape[-1] % r))
        return (x.reshape(*x.shape[:-1], -1, r).sum(dim=-2) @ self.D).to(dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        blocks = -(-self.in_features // self.rank)
        return self.D.detach().float().T.repeat(1, blocks)[:, : self.in_features]

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "dropout": self.p}


class BatModule(AdapterModule):
    """Block-affine ``B`` ``(out/r, r, r)``: ``x ΔWᵀ`` with ``ΔW_{a,c} = W_{a,c} B_a + B_a``."""

    kind = "bone"
    needs_weight = True

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__(in_features, out_features, rank)
        self.B = nn.Parameter(torch.zeros(out_features // rank, rank, rank))

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        delta = self.block_delta(weight.detach().to(self.B.dtype), self.B)
        return F.linear(x.to(self.B.dtype), delta).to(x.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.block_delta(weight.float(), self.B.detach().float())

    def block_delta(self, weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r = self.rank
        out_f, in_f = weight.shape
        blocks = weight.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)  # [c, a, r, r]
        return (blocks @ b + b).permute(1, 2, 0, 3).reshape(out_f, in_f)


@dataclass(frozen=True)
class BoneConfig(AdapterConfig):
    """Options of the ``bone`` pass (PEFT's and the author's default: r=64, dropout 0)."""

    rank: int = option(64, min=1, help="block size r")
    variant: str = option(
        "balance",
        choices=("balance", "bat"),
        help="'balance': shared additive block (Bone/MiSS); 'bat': W·B + B block-affine form",
    )
    dropout: float = option(0.0, min=0, max=1, help="dropout on the input of the balance form's branch")

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if self.variant == "bat" and self.dropout:
            raise PassConfigError(f"{pass_name}: variant 'bat' has no dropout (it rebuilds the weight); set dropout=0")


@register
class Bone(AdapterPass):
    """Attach a Bone adapter (``balance`` or ``bat`` form) to every targeted linear layer."""

    name = "bone"
    Config = BoneConfig
    after_pack = True

    def supports_packed(self, config: BoneConfig) -> bool:
        return config.variant == "balance"

    def describe(self, config: BoneConfig) -> str:
        return f"bone with variant='{config.variant}'"

    def check_layer(self, layer: BaseLayer, config: BoneConfig) -> None:
        super().check_layer(layer, config)
        r = config.rank
        if config.variant == "bat" and (layer.in_features % r or layer.out_features % r):
            raise AdapterError(
                f"bone: variant 'bat' needs rank {r} to divide both sides of layer '{layer.path}' "
                f"({layer.in_features} -> {layer.out_features})"
            )

    def build(self, gm: fx.GraphModule, layer: BaseLayer, config: BoneConfig) -> tuple[AdapterModule, Adapter]:
        r = config.rank
        if config.variant == "bat":
            module: AdapterModule = BatModule(layer.in_features, layer.out_features, r)
        else:
            module = BoneModule(layer.in_features, layer.out_features, r, config.dropout)
        log.debug("bone: %s r%d variant=%s", layer.path, r, config.variant)
        return module, Adapter(kind="bone", rank=r, variant=config.variant)


__all__ = ["BatModule", "Bone", "BoneConfig", "BoneModule"]
