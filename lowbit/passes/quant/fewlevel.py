"""What the ternary and binary weight quantizers share: scale granularity and the pass loop.

Both quantize each ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` weight (a convolution's as its matrix)
to a few levels times one real scale per tensor, per output channel or per group of input columns,
without calibration data.
`scale_statistic` computes that scale; `FewLevelPass` walks the layers (ignore lists,
per-layer overrides, unsupported layers skipped with a reason) and packs each weight
with `lowbit.passes.quant.rewrite.replace_layer`. A subclass provides `quantize`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from lowbit.errors import LowbitError, PassConfigError
from lowbit.ir.annotations import QuantScheme
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.quant.grid import QuantizedWeight, relative_error
from lowbit.passes.quant.rewrite import layer_nodes, replace_layer, unsupported_reason, weight_matrix
from lowbit.passes.selection import matches

log = logging.getLogger(__name__)

GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel", "per_group")

#: A statistic of one block of ``|w|`` rows ``(N, width)`` → ``(N,)``.
Statistic = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FewLevelConfig(PassConfig):
    """Options shared by ``ternary`` and ``binary``."""

    granularity: str = option(
        "per_channel",
        choices=GRANULARITIES,
        help="one scale per tensor, per output channel, or per group of input columns",
    )
    group_size: int | None = option(None, min=1, help="input columns per scale; only (and required) with per_group")
    ignore: tuple[str, ...] = option((), help="layers left in floating point: module paths or glob/re: patterns")

    @classmethod
    def from_options(cls, pass_name: str, options: Mapping[str, Any]) -> FewLevelConfig:
        if "ignore" in options:
            entries = options["ignore"] if isinstance(options["ignore"], (list, tuple)) else (options["ignore"],)
            if all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in entries):
                # YAML reads an nn.Sequential child's name ([2]) as an int.
                options = {**options, "ignore": tuple(str(e) for e in entries)}
        return super().from_options(pass_name, options)

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if self.granularity == "per_group" and self.group_size is None:
            raise PassConfigError(f"{pass_name}: granularity='per_group' needs group_size")
        if self.granularity != "per_group" and self.group_size is not None:
            raise PassConfigError(
                f"{pass_name}: group_size={self.group_size} only applies to granularity='per_group', "
                f"not {self.granularity!r}"
            )


def checked_weight(w: torch.Tensor, name: str | None) -> torch.Tensor:
    """``w`` as a detached float32 matrix; a `LowbitError` naming the layer if it is unusable."""
    where = f"layer '{name}': " if name else ""
    if w.dim() != 2 or w.numel() == 0:
        raise LowbitError(f"{where}expected a non-empty 2-D weight (out, in), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise LowbitError(f"{where}expected a floating-point weight, got {w.dtype}")
    weight = w.detach().to(torch.float32)
    if not torch.isfinite(weight).all():
        raise LowbitError(f"{where}weight contains NaN or Inf; it cannot be quantized")
    return weight


def group_width(granularity: str, group_size: int | None, in_features: int) -> int:
    """The packed format's ``group_size``: the input width unless per_group (capped at it)."""
    if granularity == "per_group":
        if group_size is None or group_size < 1:
            raise LowbitError(f"per_group granularity needs a group_size >= 1, got {group_size!r}")
        return min(group_size, in_features)
    if granularity not in GRANULARITIES:
        raise LowbitError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    return in_features


def scale_statistic(magnitude: torch.Tensor, granularity: str, group: int, statistic: Statistic) -> torch.Tensor:
    """``statistic`` of ``|w|`` ``(N, K)`` per tensor, row or group, as scales ``(N, ceil(K/group))``.

    Per tensor, the one value is repeated on every row (a single group of width K).
    A shorter last group is measured on its own columns only.
    """
    rows, columns = magnitude.shape
    if granularity == "per_tensor":
        return statistic(magnitude.reshape(1, -1)).expand(rows, 1).contiguous()
    blocks = [statistic(magnitude[:, start : start + group]) for start in range(0, columns, group)]
    return torch.stack(blocks, dim=1)


def per_column(scales: torch.Tensor, group: int, columns: int) -> torch.Tensor:
    """Expand per-group values ``(N, G)`` to one per input column ``(N, columns)``."""
    return scales.repeat_interleave(group, dim=1)[:, :columns]


class FewLevelPass(Pass):
    """Quantize every linear and convolution not ignored or skipped with `quantize`; subclasses set the rest."""

    stage = "convert"
    produces = frozenset({"quant"})
    # Masked layers are no longer nn.Linear calls: bake masks in first (apply_masks).
    forbids = frozenset({"adapter", "reparam", "fake_quant", "sparsity"})
    after_pack = True
    pattern = "nn.Linear, nn.Conv1d, nn.Conv2d"

    def quantize(self, weight: torch.Tensor, config: Any, name: str) -> QuantizedWeight:
        """The packed-ready codes of one weight under ``config``."""
        raise NotImplementedError

    def scheme(self, qw: QuantizedWeight, config: Any) -> QuantScheme:
        return QuantScheme(bits=qw.bits, group_size=qw.group_size, symmetric=True, method=self.name)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers: dict[str, fx.Node] = {}
        for node, path, _ in layer_nodes(gm):
            layers.setdefault(path, node)
        self.bind_layers(gm, layers)
        records = [self._layer(gm, node, path) for path, node in ctx.progress(list(layers.items()), desc=self.name)]
        quantized = sum(r.action == "quantized" for r in records)
        return PassResult(
            changed=quantized > 0, layers=records, stats={"quantized": quantized, "skipped": len(records) - quantized}
        )

    def _layer(self, gm: fx.GraphModule, node: fx.Node, path: str) -> LayerRecord:
        """Quantize and replace one layer, or return a "skipped" record saying why not."""
        reason = next((f"ignored (matches '{p}')" for p in self.config.ignore if matches(path, p)), None)
        reason = reason or unsupported_reason(gm, path)
        config = None if reason else self.config_for(path)
        if config is None:
            reason = reason or "skipped by a per-layer override"
            log.info("%s: skipping %s: %s", self.name, path, reason)
            return LayerRecord(path, "skipped", reason)
        weight = weight_matrix(gm.get_submodule(path))
        qw = self.quantize(weight, config, path)
        error = relative_error(weight, qw.dequantize())
        scheme = self.scheme(qw, config)
        replace_layer(gm, node, qw, scheme)
        log.debug("%s: %s -> %s, relative error %.3g", self.name, path, scheme.describe(), error)
        return LayerRecord(
            path,
            "quantized",
            stats={
                "bits": qw.bits,
                "group_size": qw.group_size,
                "granularity": config.granularity,
                "rel_error": error,
            },
        )


__all__ = [
    "GRANULARITIES",
    "FewLevelConfig",
    "FewLevelPass",
    "checked_weight",
    "group_width",
    "per_column",
    "scale_statistic",
]
