"""``apply_masks``: bake pruning masks into the weights for deployment.

Each masked call ``F.linear(x, w * m, b)`` becomes the plain ``call_module`` again with
``w ← w ⊙ m`` stored in the layer. The annotation stays on the node with
``merged=True``, so reports and later passes (a quantizer that keeps zeros) still know
which layers are sparse and how; the pipeline no longer treats it as an active mask,
so quantization may follow.

``keep_masks=True`` keeps the mask buffers after baking. Anything that later writes
dense updates into the weights (merging adapters trained on the pruned base) can then
be made sparse again by running ``apply_masks`` once more: it re-zeroes the masked
positions of every baked layer whose mask buffer is still there.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from lowbit.ir.annotations import Sparsity, annotate, get_meta
from lowbit.ir.graph import get_attr
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.prune.masks import MASK_SUFFIX, mask_sparsity, restore_call, summarize
from lowbit.passes.registry import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyMasksConfig(PassConfig):
    """Options of ``apply_masks``; per-layer ``skip`` overrides keep a layer's mask active."""

    keep_masks: bool = option(False, help="keep the mask buffers so a later apply_masks can re-zero pruned weights")


@register
class ApplyMasks(Pass):
    """Fold every active pruning mask into its layer's weight and restore the plain layer call."""

    name = "apply_masks"
    Config = ApplyMasksConfig
    stage = "any"
    consumes = frozenset({"sparsity"})
    pattern = "masked nn.Linear, nn.Conv2d"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        calls: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            meta = get_meta(node)
            if meta is None or meta.sparsity is None or not meta.sparsity.mask:
                continue
            if not meta.sparsity.merged or (node.op == "call_module" and _mask(gm, meta.sparsity) is not None):
                calls.setdefault(meta.layer, []).append(node)
        records = []
        for path, nodes in calls.items():
            if self.config_for(path) is None:
                records.append(LayerRecord(path, "skipped", "skipped by a per-layer override"))
                continue
            records.append(self._apply(gm, path, nodes))
        gm.graph.lint()
        return PassResult(changed=bool(calls), layers=records, stats=summarize(records))

    def _apply(self, gm: fx.GraphModule, path: str, nodes: list[fx.Node]) -> LayerRecord:
        module = gm.get_submodule(path)
        mask = getattr(module, MASK_SUFFIX)
        annotation = get_meta(nodes[0]).sparsity
        with torch.no_grad():
            rezeroed = int(((module.weight != 0) & (mask == 0)).sum())
            module.weight.mul_(mask)
        achieved = mask_sparsity(mask)
        if not self.config.keep_masks:
            del module._buffers[MASK_SUFFIX]
        sparsity = dataclasses.replace(annotation, sparsity=achieved, merged=True)
        for node in nodes:
            node = node if annotation.merged else restore_call(gm, node, path)
            annotate(node, path, sparsity=sparsity)
        log.debug("apply_masks: %s -> %s (%d weights re-zeroed)", path, sparsity.describe(), rezeroed)
        return LayerRecord(
            path,
            "reapplied" if annotation.merged else "applied",
            stats={
                "target": sparsity.target,
                "achieved": achieved,
                "params": module.weight.numel(),
                "pattern": sparsity.pattern,
                "method": sparsity.method,
                "rezeroed": rezeroed,
            },
        )


def _mask(gm: fx.GraphModule, sparsity: Sparsity) -> torch.Tensor | None:
    return get_attr(gm, sparsity.mask, None)


__all__ = ["ApplyMasks", "ApplyMasksConfig"]
