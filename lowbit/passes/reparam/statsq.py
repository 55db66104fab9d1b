"""StatsQ (OFQ's statistical weight quantizer) for QAT: the ``statsq`` and ``convert_statsq`` passes.

``statsq`` fake-quantizes every ``nn.Linear`` weight (on top of a weight reparameterization if
there is one) and the ``W_qk`` product of `lowbit.passes.reparam.qkr.QKRLinear` to ``2^b``
symmetric levels without a zero, from a per-row scale recomputed every forward, with a
straight-through gradient (the formulas: docs/methods.md (StatsQ)). ``convert_statsq`` packs
each trained layer exactly: its levels are ``scale·(q − zero)`` with a half-integer zero point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from lowbit.ir.annotations import FakeQuant, QuantScheme, annotate, get_meta
from lowbit.ir.graph import layers
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.quant.grid import QuantizedWeight
from lowbit.passes.quant.rewrite import replace_linear, unsupported_reason
from lowbit.passes.registry import register
from lowbit.passes.reparam.common import annotate_calls, parametrization_inputs
from lowbit.passes.reparam.qkr import QKRLinear
from lowbit.passes.selection import matches_any

log = logging.getLogger(__name__)

#: Upper clip of the normalized weight, so ``u·n − ½`` never rounds up to ``n``.
CLIP_TOP = 1 - 1e-6
#: Floor of the row scale, so an all-zero row quantizes to (almost) zero instead of NaN.
MIN_SCALE = 1e-12


def row_scale(weight: torch.Tensor) -> torch.Tensor:
    """``s = 2·mean|W|`` per row, detached, shape ``[rows, 1]``."""
    return (2 * weight.detach().abs().mean(dim=-1, keepdim=True)).clamp_min(MIN_SCALE)


def statsq_pre_round(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``z = clip(W/s, −1, 1 − 1e−6)·n − ½``, the value StatsQ rounds (CGA measures its distance to a boundary)."""
    n = 2 ** (bits - 1)
    return torch.clamp(weight.detach() / row_scale(weight), -1.0, CLIP_TOP) * n - 0.5


def statsq_codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer level ``k ∈ [−n, n−1]`` of every weight and the row step ``s/n`` (``[rows, 1]``)."""
    n = 2 ** (bits - 1)
    return torch.round(statsq_pre_round(weight, bits)), row_scale(weight) / n


def statsq_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q(W) = (s/n)·(k + ½)`` (no gradient)."""
    k, step = statsq_codes(weight, bits)
    return step * (k + 0.5)


class StatsQ(nn.Module):
    """Fake-quantizer ``sg(Q(W)) − sg(W) + W`` at ``bits`` bits (a weight parametrization)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return statsq_quantize(weight, self.bits) - weight.detach() + weight

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def statsq_of(module: nn.Module) -> StatsQ | None:
    """The StatsQ quantizer of a layer's weight (parametrization or QKR product), if any."""
    if isinstance(module, QKRLinear):
        return module.weight_quantizer
    if parametrize.is_parametrized(module, "weight"):
        return next((p for p in module.parametrizations.weight if isinstance(p, StatsQ)), None)
    return None


def latent_weight(module: nn.Module) -> nn.Parameter | None:
    """The trained tensor StatsQ quantizes directly, or None if it is computed (a reparameterization)."""
    if isinstance(module, QKRLinear) or not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations.weight
    return plist.original if len(plist) == 1 and isinstance(plist[0], StatsQ) else None


@dataclass(frozen=True)
class StatsQConfig(PassConfig):
    """Options of the ``statsq`` pass."""

    bits: int = option(2, choices=(1, 2, 3, 4, 8), help="weight code width")
    ignore: tuple[str, ...] = option(
        (), help="layers left in floating point (OFQ keeps the patch embedding and head at 8 bits)"
    )


@register
class StatsQuant(Pass):
    """Fake-quantize linear weights (and QKR's ``W_qk`` products) with StatsQ for QAT."""

    name = "statsq"
    Config = StatsQConfig
    stage = "prepare"
    produces = frozenset({"fake_quant"})
    forbids = frozenset({"quant", "fake_quant"})
    pattern = "nn.Linear, QKRLinear"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records: list[LayerRecord] = []
        for path, module, nodes in layers(gm, (nn.Linear, QKRLinear)):
            reason = "ignored" if matches_any(path, self.config.ignore) else _skip_reason(gm, path, module)
            config = None if reason else self.config_for(path)
            if config is None:
                records.append(LayerRecord(path, "skipped", reason or "skipped by a per-layer override"))
                continue
            quantizer = StatsQ(config.bits)
            if isinstance(module, QKRLinear):
                module.weight_quantizer = quantizer
            else:
                parametrize.register_parametrization(module, "weight", quantizer)
            in_features = module.weight.shape[1]
            annotate_calls(nodes, path, fake_quant=FakeQuant(config.bits, in_features, "statsq"))
            records.append(LayerRecord(path, "fake_quantized", stats={"bits": config.bits}))
        count = sum(r.action == "fake_quantized" for r in records)
        log.info("statsq: %d layer(s) fake-quantized, %d skipped", count, len(records) - count)
        return PassResult(
            changed=count > 0, layers=records, stats={"fake_quantized": count, "skipped": len(records) - count}
        )


def _skip_reason(gm: fx.GraphModule, path: str, module: nn.Module) -> str | None:
    if statsq_of(module) is not None:
        return "already fake-quantized by StatsQ"
    if isinstance(module, QKRLinear):
        return None
    if not module.weight.is_floating_point():
        return f"weight dtype {module.weight.dtype} is not floating point"
    own = parametrization_inputs(module) if parametrize.is_parametrized(module, "weight") else [module.weight]
    sharers = [
        name
        for name, p in gm.named_parameters(remove_duplicate=False)
        if any(p is t for t in own) and not name.startswith(path + ".")
    ]
    if sharers:
        return f"its weight is tied to {', '.join(sharers)}; quantizing one side would untie them"
    return None


@dataclass(frozen=True)
class ConvertStatsQConfig(PassConfig):
    """Options of the ``convert_statsq`` pass (none)."""


@register
class ConvertStatsQ(Pass):
    """Replace each trained StatsQ linear by the packed format with the same levels (``lowbit.linear_packed``)."""

    name = "convert_statsq"
    Config = ConvertStatsQConfig
    stage = "convert"
    consumes = frozenset({"fake_quant"})
    produces = frozenset({"quant"})
    forbids = frozenset({"reparam", "adapter"})
    after_pack = True
    pattern = "nn.Linear with a StatsQ weight"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records: list[LayerRecord] = []
        for path, module, nodes in layers(gm, (nn.Linear,)):
            quantizer = statsq_of(module)
            if quantizer is None:
                continue
            weight = latent_weight(module)
            reason = "its StatsQ input is a reparameterized weight; run fold_reparam first" if weight is None else None
            reason = reason or (None if self.config_for(path) is not None else "skipped by a per-layer override")
            reason = reason or unsupported_reason(gm, path)
            if reason is not None:
                records.append(LayerRecord(path, "skipped", reason))
                continue
            records.append(_pack(gm, nodes, path, weight, quantizer.bits))
        count = sum(r.action == "quantized" for r in records)
        return PassResult(
            changed=count > 0, layers=records, stats={"quantized": count, "skipped": len(records) - count}
        )


def _pack(gm: fx.GraphModule, nodes: list[fx.Node], path: str, weight: torch.Tensor, bits: int) -> LayerRecord:
    n = 2 ** (bits - 1)
    k, step = statsq_codes(weight, bits)
    rows, cols = weight.shape
    qw = QuantizedWeight(
        codes=(k + n).to(torch.uint8),
        scales=step.float(),
        zeros=torch.full((rows, 1), n - 0.5),
        g_idx=None,
        bits=bits,
        group_size=cols,
    )
    scheme = QuantScheme(bits=bits, group_size=cols, symmetric=True, method="statsq")
    first = nodes[0]
    new = replace_linear(gm, first, qw, scheme)
    for node in gm.graph.nodes:
        meta = get_meta(node)
        if meta is not None and meta.layer == path and meta.fake_quant is not None:
            annotate(node, path, fake_quant=None)
    log.debug("convert_statsq: packed %s (%s)", path, scheme.describe())
    return LayerRecord(path, "quantized", stats={"bits": bits, "node": new.name})


__all__ = [
    "ConvertStatsQ",
    "StatsQ",
    "StatsQConfig",
    "StatsQuant",
    "latent_weight",
    "row_scale",
    "statsq_codes",
    "statsq_of",
    "statsq_pre_round",
    "statsq_quantize",
]
