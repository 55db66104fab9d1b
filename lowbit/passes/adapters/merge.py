"""``merge_adapters`` and ``unmerge_adapters``: fold adapter branches into base weights and back.

Merging computes each adapter's weight update (``scale·B A`` for LoRA, ``scale·B diag(S) A``
for SORSA, the tiled block for Bone, ``W_{a,c} B_a + B_a`` for Bat), adds it to the base
weight in float32 and removes the branch, so quantizers can run next. A packed
(quantized) base is dequantized, merged and **re-quantized** by round-to-nearest in its
own layout (bits, group size, symmetry, column grouping ``g_idx``), each row of each
group on the better of its current grid and a fresh one (`requantize`). The record of
each layer reports the relative weight error this rounding adds (``requant_rel_error``)
and the relative size of the update (``update_rel_norm``): an update much smaller than
the grid step cannot survive rounding.

The adapter module keeps the base tensors from before the merge, so unmerging restores
them bit for bit (for a packed base too) and re-inserts the branch.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from lowbit.ir import packing
from lowbit.ir.annotations import Adapter, annotate
from lowbit.passes.adapters.common import (
    AdapterError,
    AdapterModule,
    adapted_layers,
    adapter_module,
    base_tensors,
    base_weight,
    insert_branches,
    remove_branches,
    restore_base_tensors,
)
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig
from lowbit.passes.quant.grid import grid_codes, group_params, relative_error
from lowbit.passes.quant.rewrite import PackedLinear
from lowbit.passes.registry import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeConfig(PassConfig):
    """``merge_adapters`` / ``unmerge_adapters`` have no options; skip layers with per-layer overrides."""


@register
class MergeAdapters(Pass):
    """Fold every unmerged adapter into its base weight (re-quantizing a packed base)."""

    name = "merge_adapters"
    Config = MergeConfig
    stage = "any"
    consumes = frozenset({"adapter"})
    after_pack = True
    pattern = "layers carrying an adapter"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = list(adapted_layers(gm))
        pending = [(path, nodes, a) for path, nodes, a in layers if not a.merged]
        if layers and not pending:
            raise AdapterError(
                f"merge_adapters: the adapters are already merged (layers {_names(layers)}); merging twice would "
                "add their update twice"
            )
        records = []
        for path, nodes, adapter in pending:
            if self.config_for(path) is None:
                records.append(LayerRecord(path, "skipped", "skipped by a per-layer override"))
                continue
            module = adapter_module(gm, path, adapter)
            stats = merge_layer(gm, path, module)
            remove_branches(gm, path, module)
            _mark(nodes, path, adapter, merged=True)
            records.append(LayerRecord(path, "merged", stats=stats))
        merged = [r for r in records if r.action == "merged"]
        stats: dict[str, float | int] = {"merged": len(merged)}
        errors = [r.stats["requant_rel_error"] for r in merged if "requant_rel_error" in r.stats]
        if errors:
            stats["max_requant_rel_error"] = max(errors)
        return PassResult(changed=bool(merged), layers=records, stats=stats)


@register
class UnmergeAdapters(Pass):
    """Restore the pre-merge base weights exactly and re-insert the adapter branches."""

    name = "unmerge_adapters"
    Config = MergeConfig
    stage = "any"
    produces = frozenset({"adapter"})
    after_pack = True
    pattern = "layers carrying a merged adapter"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        merged = [(path, nodes, a) for path, nodes, a in adapted_layers(gm) if a.merged]
        if not merged:
            raise AdapterError("unmerge_adapters: no layer carries a merged adapter; the graph was never merged")
        records = []
        for path, nodes, adapter in merged:
            if self.config_for(path) is None:
                records.append(LayerRecord(path, "skipped", "skipped by a per-layer override"))
                continue
            module = adapter_module(gm, path, adapter)
            if module.pre_merge is None:
                raise AdapterError(f"unmerge_adapters: layer '{path}' has no pre-merge weights to restore")
            restore_base_tensors(gm, path, module.pre_merge)
            module.pre_merge = None
            insert_branches(gm, path, module)
            _mark(nodes, path, adapter, merged=False)
            records.append(LayerRecord(path, "unmerged"))
        return PassResult(
            changed=any(r.action == "unmerged" for r in records),
            layers=records,
            stats={"unmerged": sum(r.action == "unmerged" for r in records)},
        )


def merge_layer(gm: fx.GraphModule, path: str, module: AdapterModule) -> dict[str, float]:
    """Add the adapter's update to the base weight of ``path``; keep the old tensors on ``module``."""
    base = gm.get_submodule(path)
    weight = base_weight(gm, path)
    merged = weight.to(torch.float32) + module.delta_weight(weight)
    module.pre_merge = base_tensors(gm, path)
    if not isinstance(base, PackedLinear):
        with torch.no_grad():
            base.weight.copy_(merged.to(base.weight.dtype))
        return {}
    qweight, scales, zeros = requantize(base, merged)
    for name, tensor in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if tensor is not None:
            getattr(base, name).copy_(tensor)
    error = relative_error(merged, base_weight(gm, path))
    update = relative_error(weight, merged)
    log.info(
        "merge_adapters: re-quantized %s (w%d g%d): relative weight error %.3g, relative update %.3g",
        path,
        base.bits,
        base.group_size,
        error,
        update,
    )
    return {"requant_rel_error": error, "update_rel_norm": update}


def requantize(base: PackedLinear, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round ``weight`` to ``base``'s layout, per row and group on the better of two grids.

    The layout is kept: bits, group size, symmetry (``zeros`` present or not) and the
    column-to-group map (``g_idx`` or contiguous groups). For each row of each group the
    codes are rounded both on the base's current grid (its scale and zero point) and on a
    fresh RTN grid of the merged values, and the one with the smaller squared error is
    kept. A zero update therefore reproduces the base exactly, and a large one gets a grid
    that covers its new range.
    """
    symmetric = base.zeros is None
    columns = packing.group_index(base.in_features, base.group_size, base.g_idx, weight.device)
    old_scales = base.scales.detach().to(torch.float32)
    old_zeros = None if symmetric else base.zeros.detach().to(torch.float32)
    new_scales, new_zeros = old_scales.clone(), None if symmetric else old_zeros.clone()
    for group in range(old_scales.shape[1]):
        selected = columns == group
        if selected.any():
            group_scale, group_zero = group_params(weight[:, selected], base.bits, symmetric)
            new_scales[:, group] = group_scale
            if new_zeros is not None:
                new_zeros[:, group] = group_zero
    candidates = []
    for scales, zeros in ((old_scales, old_zeros), (new_scales, new_zeros)):
        zero = packing.default_zero(base.bits) if zeros is None else zeros[:, columns]
        codes = grid_codes(weight, scales[:, columns], zero, base.bits)
        error = ((codes - zero) * scales[:, columns] - weight).square()
        per_group = torch.zeros_like(scales).index_add_(1, columns, error)
        candidates.append((codes, scales, zeros, per_group))
    (old_codes, _, _, old_error), (new_codes, _, _, new_error) = candidates
    fresh = new_error < old_error
    codes = torch.where(fresh[:, columns], new_codes, old_codes).to(torch.uint8)
    scales = torch.where(fresh, new_scales, old_scales).to(base.scales.dtype)
    zeros = None if symmetric else torch.where(fresh, new_zeros, old_zeros).to(base.zeros.dtype)
    return packing.pack(codes, base.bits), scales, zeros


def _mark(nodes: list[fx.Node], path: str, adapter: Adapter, merged: bool) -> None:
    for node in nodes:
        annotate(node, path, adapter=dataclasses.replace(adapter, merged=merged))


def _names(layers: list) -> str:
    names = [path for path, _, _ in layers]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


__all__ = ["MergeAdapters", "UnmergeAdapters", "merge_layer", "requantize"]
