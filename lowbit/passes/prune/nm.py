"""``prune_nm``: N:M semi-structured masks along the input dimension (docs/methods.md (N:M sparsity)).

Every run of ``m`` consecutive weights along the reduction dimension of a row keeps its
``n`` largest ``|w|`` (2:4 is the pattern sparse tensor cores accelerate). A Linear
``[o, i]`` groups along ``i``; a Conv2d ``[K, C, R, S]`` is viewed as ``(K, R, S) × C``,
so groups run along the input channels. ``m`` must divide that width: the pass raises
rather than pad (a padded group would not match the kernel's layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from lowbit.errors import PassConfigError
from lowbit.passes.base import PassContext
from lowbit.passes.config import PassConfig, option
from lowbit.passes.prune.masks import Layer, MaskPass, PruningError, layer_names
from lowbit.passes.registry import register


@dataclass(frozen=True)
class NMConfig(PassConfig):
    """Options of ``prune_nm``: keep ``n`` of every ``m`` consecutive input weights."""

    n: int = option(2, min=1, help="weights kept per group")
    m: int = option(4, min=1, help="group length along the input dimension")
    ignore: tuple[str, ...] = option((), help="layers left dense: module paths or glob/re: patterns")

    @classmethod
    def from_options(cls, pass_name: str, options: dict) -> NMConfig:
        if "ignore" in options:
            options = {**options, "ignore": layer_names(options["ignore"])}
        return super().from_options(pass_name, options)

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if self.n > self.m:
            raise PassConfigError(f"{pass_name}: n={self.n} > m={self.m}; an N:M pattern keeps n of every m weights")


def nm_mask(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Bool mask keeping the ``n`` largest ``|w|`` in each run of ``m`` along the input dimension."""
    channels_last = weight.dim() == 4
    w = weight.detach().abs().float()
    if channels_last:
        w = w.permute(0, 2, 3, 1)  # (K, R, S, C): groups along C
    width = w.shape[-1]
    if width % m:
        raise PruningError(
            f"layer '{name}': m={m} does not divide its input width {width}; "
            f"choose an m that divides it or skip the layer with an override ('{name}': skip)"
        )
    groups = w.reshape(-1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    mask = mask.view(w.shape)
    return mask.permute(0, 3, 1, 2).contiguous() if channels_last else mask


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every run of ``m`` along the input dimension keeps at most ``n`` weights."""
    groups = (mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask).reshape(-1, m)
    return bool((groups.sum(dim=1) <= n).all())


@register
class PruneNM(MaskPass):
    """N:M semi-structured pruning (default 2:4) of every Linear/Conv2d."""

    name = "prune_nm"
    Config = NMConfig

    def layer_pattern(self, layer: Layer) -> str:
        return f"{layer.config.n}:{layer.config.m}"

    def masks(self, gm: fx.GraphModule, layers: list[Layer], ctx: PassContext) -> dict[str, tuple[torch.Tensor, float]]:
        return {
            l.path: (nm_mask(l.weight, l.config.n, l.config.m, l.path), 1.0 - l.config.n / l.config.m) for l in layers
        }


__all__ = ["NMConfig", "PruneNM", "is_nm", "nm_mask"]
