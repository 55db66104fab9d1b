"""``convert_qat``: pack a trained fake-quant graph (``fake_quant`` or ``statsq``) into ``lowbit.linear_packed``
(``lowbit.conv_packed`` for convolutions).

Each layer with a `lowbit.passes.quant.qat.WeightFakeQuant` weight is replaced by the
packed codes, scales and zeros its quantizer computes from the trained latent weight
(`WeightFakeQuant.quantized`); the forward of the fake-quant layer is exactly the packed
format's dequantized weight, so the converted graph gives the same outputs. StatsQ
layers are delegated to ``convert_statsq``, so one convert pass serves every QAT kind.
A graph without fake-quant layers converts nothing (zero layers, not an error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from lowbit.ir.annotations import QuantScheme, annotate, get_meta
from lowbit.ir.graph import layers
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig
from lowbit.passes.quant.qat import WeightFakeQuant, fake_quantizer_of
from lowbit.passes.quant.rewrite import CONV_TYPES, replace_layer, unsupported_reason
from lowbit.passes.registry import get, register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertQATConfig(PassConfig):
    """Options of the ``convert_qat`` pass (none; per-layer overrides may only ``skip``)."""


@register
class ConvertQAT(Pass):
    """Replace every trained fake-quant linear or convolution (STE, LSQ, ternary, binary, StatsQ) by its packed
    form."""

    name = "convert_qat"
    Config = ConvertQATConfig
    stage = "convert"
    consumes = frozenset({"fake_quant"})
    produces = frozenset({"quant"})
    forbids = frozenset({"reparam", "adapter"})
    after_pack = True
    pattern = "nn.Linear, nn.Conv1d or nn.Conv2d with a fake-quant weight"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records: list[LayerRecord] = []
        for path, module, nodes in layers(gm, (nn.Linear, *CONV_TYPES)):
            quantizer = fake_quantizer_of(module)
            if quantizer is None:
                continue
            plist = module.parametrizations.weight
            reason = None if len(plist) == 1 else "its fake-quantized weight is reparameterized; run fold_reparam first"
            reason = reason or (None if self.config_for(path) is not None else "skipped by a per-layer override")
            reason = reason or unsupported_reason(gm, path)
            if reason is not None:
                log.info("convert_qat: skipping %s: %s", path, reason)
                records.append(LayerRecord(path, "skipped", reason))
                continue
            records.append(_pack(gm, nodes, path, quantizer, plist.original))
        statsq = get("convert_statsq")  # by name: the reparam family builds on this package's grid
        statsq.overrides = self.overrides
        records.extend(statsq.run(gm, ctx).layers)
        count = sum(r.action == "quantized" for r in records)
        log.info("convert_qat: %d layer(s) packed, %d skipped", count, len(records) - count)
        return PassResult(
            changed=count > 0, layers=records, stats={"quantized": count, "skipped": len(records) - count}
        )


def _pack(
    gm: fx.GraphModule, nodes: list[fx.Node], path: str, quantizer: WeightFakeQuant, latent: torch.Tensor
) -> LayerRecord:
    qw = quantizer.quantized(latent)
    symmetric = qw.zeros is None
    scheme = QuantScheme(
        bits=qw.bits, group_size=qw.group_size, symmetric=symmetric, method=f"qat-{quantizer.method()}"
    )
    new = replace_layer(gm, nodes[0], qw, scheme)
    for node in gm.graph.nodes:
        meta = get_meta(node)
        if meta is not None and meta.layer == path and meta.fake_quant is not None:
            annotate(node, path, fake_quant=None)
    log.debug("convert_qat: packed %s (%s)", path, scheme.describe())
    return LayerRecord(path, "quantized", stats={"bits": qw.bits, "group_size": qw.group_size, "node": new.name})


__all__ = ["ConvertQAT", "ConvertQATConfig"]
