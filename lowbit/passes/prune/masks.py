"""Shared machinery of the pruning passes: masks as buffers applied by the graph.

A masked layer keeps its ``nn.Linear``/``nn.Conv2d`` submodule and gains a 0/1 buffer
``<layer>.weight_mask`` in the weight's dtype (as ``torch.nn.utils.prune`` stores it: a
float multiply is many times faster than one that promotes a bool); each call becomes

    w = get_attr <layer>.weight;  m = get_attr <layer>.weight_mask
    y = F.linear(x, torch.mul(w, m), bias)        (F.conv2d for convolutions)

so the mask is part of the computation: pruned weights get a zero gradient and, being
zeroed when the mask is installed, stay exactly zero through ordinary optimizer steps.
The call node carries ``Sparsity(sparsity, pattern, mask, method, target)``;
`apply_masks` bakes the mask into the weight and restores the plain ``call_module``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError, PassConfigError, VerificationError
from lowbit.ir.annotations import Sparsity, annotate, get_meta
from lowbit.ir.graph import get_attr
from lowbit.ir.verify import check
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.selection import matches

log = logging.getLogger(__name__)

MASK_SUFFIX = "weight_mask"
PRUNABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
_MASKED_OPS = (F.linear, F.conv2d)


class PruningError(LowbitError):
    """A layer cannot be pruned as asked (e.g. an N:M group that does not divide its input width)."""


def check_sparsity(pass_name: str, key: str, value: float) -> None:
    """Raise `PassConfigError` unless ``0 <= value < 1`` (a fully pruned network is not a target)."""
    if not 0.0 <= value < 1.0:
        raise PassConfigError(f"{pass_name}: {key}={value!r} is out of range; a sparsity must lie in [0, 1)")


def layer_names(value: Any) -> Any:
    """Module paths as strings: YAML reads an ``nn.Sequential`` child's name (``[2]``) as an int."""
    entries = value if isinstance(value, (list, tuple)) else (value,)
    if all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in entries):
        return tuple(str(e) for e in entries)
    return value


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    """Options shared by the mask-producing passes: the target sparsity and the layers left dense."""

    sparsity: float = option(0.5, help="fraction of weights set to zero, in [0, 1)")
    ignore: tuple[str, ...] = option((), help="layers left dense: module paths or glob/re: patterns")

    @classmethod
    def from_options(cls, pass_name: str, options: Mapping[str, Any]) -> PruneConfig:
        if "ignore" in options:
            options = {**options, "ignore": layer_names(options["ignore"])}
        return super().from_options(pass_name, options)

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        check_sparsity(pass_name, "sparsity", self.sparsity)


@dataclass
class Layer:
    """One prunable layer: its module path, module, call nodes and effective config."""

    path: str
    module: nn.Module
    calls: list[fx.Node]
    config: PassConfig

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``W ⊙ M`` (detached, float32)."""
        return effective_weight(self.module).float()

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def layer_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Every prunable layer's call nodes by module path: plain calls and masked calls, in graph order."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        path = _call_path(gm, node)
        if path is not None:
            calls.setdefault(path, []).append(node)
    return calls


def _call_path(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), PRUNABLE):
        return node.target
    if node.op == "call_function" and node.target in _MASKED_OPS:
        meta = get_meta(node)
        if meta is not None and meta.sparsity is not None and not meta.sparsity.merged:
            return meta.layer
    return None


def unsupported_reason(gm: fx.GraphModule, path: str, calls: list[fx.Node]) -> str | None:
    """Why the layer at ``path`` cannot carry a mask, or None if it can."""
    module = gm.get_submodule(path)
    if type(module).forward not in (nn.Linear.forward, nn.Conv2d.forward):
        return (
            f"{type(module).__name__} overrides forward, so its computation is not a plain "
            f"{type(module).__mro__[1].__name__}"
        )
    if not module.weight.is_floating_point() or module.weight.device.type == "meta":
        return "weight has no floating-point data to prune"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not supported (only zero padding)"
    own = _mask_form_reads(calls)
    readers = [
        n.name for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith(path + ".") and n not in own
    ]
    if readers:
        return f"its parameters are also read outside the layer call (nodes {', '.join(readers)})"
    odd = [n.name for n in calls if n.op == "call_module" and _single_input(n) is None]
    if odd:
        return f"it is called with arguments other than one input (nodes {', '.join(odd)})"
    return None


def _mask_form_reads(calls: list[fx.Node]) -> set[fx.Node]:
    """The ``get_attr`` nodes of weight, mask and bias that masked calls read (directly or via the multiply)."""
    reads: set[fx.Node] = set()
    for node in calls:
        if node.op != "call_function":
            continue
        for arg in node.all_input_nodes[1:]:
            reads.add(arg)
            reads.update(arg.all_input_nodes)
    return reads


def select_layers(gm: fx.GraphModule, p: Pass) -> tuple[list[Layer], list[LayerRecord]]:
    """The layers ``p`` prunes (with their per-layer config) and "skipped" records for the rest."""
    layers: list[Layer] = []
    skipped: list[LayerRecord] = []
    all_calls = layer_calls(gm)
    for path, calls in all_calls.items():
        reason = next(
            (f"ignored (matches '{pat}')" for pat in getattr(p.config, "ignore", ()) if matches(path, pat)), None
        )
        reason = reason or unsupported_reason(gm, path, calls)
        config = None if reason else p.config_for(path)
        if config is None:
            reason = reason or "skipped by a per-layer override"
            skipped.append(LayerRecord(path, "skipped", reason))
            log.info("%s: skipping %s: %s", p.name, path, reason)
            continue
        layers.append(Layer(path, gm.get_submodule(path), calls, config))
    p.warn_unused_overrides(all_calls, "prunable layer")
    return layers, skipped


def current_mask(module: nn.Module) -> torch.Tensor:
    """The layer's mask as bool (all ones if it has none)."""
    mask = getattr(module, MASK_SUFFIX, None)
    return torch.ones_like(module.weight, dtype=torch.bool) if mask is None else mask.bool()


def effective_weight(module: nn.Module) -> torch.Tensor:
    """``W ⊙ M``, detached: what the masked layer computes with."""
    weight = module.weight.detach()
    mask = getattr(module, MASK_SUFFIX, None)
    return weight if mask is None else weight * mask


def keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A bool mask of ``scores``' shape keeping exactly the ``keep`` largest entries."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[torch.topk(scores.flatten(), keep, sorted=False).indices] = True
    return mask.view_as(scores)


def keep_count(numel: int, sparsity: float) -> int:
    """Weights kept at ``sparsity``: ``numel − round(sparsity · numel)``."""
    return numel - round(sparsity * numel)


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of zeros in a mask."""
    return 1.0 - int(mask.sum()) / mask.numel() if mask.numel() else 0.0


def install_mask(
    gm: fx.GraphModule, layer: Layer, mask: torch.Tensor, pattern: str, method: str, target: float | None
) -> Sparsity:
    """Set ``layer``'s mask (monotone: weights pruned before stay pruned), zero the pruned weights,
    make the graph apply it and annotate every call. Returns the annotation."""
    module = layer.module
    if tuple(mask.shape) != tuple(module.weight.shape):
        raise PruningError(
            f"layer '{layer.path}': mask of shape {tuple(mask.shape)} does not match its weight "
            f"{tuple(module.weight.shape)}"
        )
    mask = mask.to(device=module.weight.device, dtype=torch.bool) & current_mask(module)
    with torch.no_grad():
        module.weight.mul_(mask)
    if getattr(module, MASK_SUFFIX, None) is None:
        module.register_buffer(MASK_SUFFIX, mask.to(module.weight.dtype))
        layer.calls = [_rewrite_masked(gm, node, layer.path) for node in layer.calls]
    else:
        getattr(module, MASK_SUFFIX).copy_(mask)
    sparsity = Sparsity(mask_sparsity(mask), pattern, f"{layer.path}.{MASK_SUFFIX}", method, target=target)
    for node in layer.calls:
        annotate(node, layer.path, sparsity=sparsity)
    return sparsity


def _rewrite_masked(gm: fx.GraphModule, node: fx.Node, path: str) -> fx.Node:
    """Swap one ``call_module`` of a Linear/Conv2d for ``F.linear``/``F.conv2d`` on ``weight * mask``."""
    module = gm.get_submodule(path)
    x = _single_input(node)
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{path}.weight")
        mask = graph.get_attr(f"{path}.{MASK_SUFFIX}")
        masked = graph.call_function(torch.mul, (weight, mask))
        bias = graph.get_attr(f"{path}.bias") if module.bias is not None else None
        if isinstance(module, nn.Linear):
            new = graph.call_function(F.linear, (x, masked, bias))
        else:
            new = graph.call_function(
                F.conv2d, (x, masked, bias, module.stride, module.padding, module.dilation, module.groups)
            )
    new.meta = copy.copy(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def restore_call(gm: fx.GraphModule, node: fx.Node, path: str) -> fx.Node:
    """Inverse of `_rewrite_masked`: a plain ``call_module`` again; drops the now-unused attribute reads."""
    graph = gm.graph
    with graph.inserting_before(node):
        new = graph.call_module(path, (node.args[0],))
    new.meta = copy.copy(node.meta)
    node.replace_all_uses_with(new)
    inputs = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
    graph.erase_node(node)
    for value in inputs:
        parents = list(value.all_input_nodes)
        if not value.users:
            graph.erase_node(value)
            for parent in parents:
                if not parent.users:
                    graph.erase_node(parent)
    return new


def _single_input(node: fx.Node) -> fx.Node | None:
    if len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if not node.args and set(node.kwargs) == {"input"}:
        return node.kwargs["input"]
    return None


def layer_record(layer: Layer, sparsity: Sparsity, **stats: Any) -> LayerRecord:
    """A "pruned" record with target and achieved sparsity and the layer's size."""
    return LayerRecord(
        layer.path,
        "pruned",
        stats={
            "target": sparsity.target,
            "achieved": sparsity.sparsity,
            "params": layer.numel,
            "pattern": sparsity.pattern,
            **stats,
        },
    )


def summarize(records: Iterable[LayerRecord]) -> dict[str, Any]:
    """Overall target and achieved sparsity (weighted by layer size) of the pruned records."""
    pruned = [r for r in records if r.action != "skipped"]
    total = sum(r.stats["params"] for r in pruned)
    if not total:
        return {"pruned_layers": 0}
    achieved = sum(r.stats["achieved"] * r.stats["params"] for r in pruned) / total
    stats: dict[str, Any] = {"pruned_layers": len(pruned), "params": total, "achieved": achieved}
    if all(r.stats.get("target") is not None for r in pruned):
        stats["target"] = sum(r.stats["target"] * r.stats["params"] for r in pruned) / total
    return stats


class MaskPass(Pass):
    """Base of the passes that compute one mask per layer; subclasses implement `masks`."""

    Config = PruneConfig
    stage = "any"
    produces = frozenset({"sparsity"})
    forbids = frozenset({"adapter", "reparam", "fake_quant"})
    pattern = "nn.Linear, nn.Conv2d"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers, records = select_layers(gm, self)
        if not layers:
            return PassResult(changed=False, layers=records)
        plan = self.masks(gm, layers, ctx)
        for layer in layers:
            mask, target = plan[layer.path]
            sparsity = install_mask(gm, layer, mask, self.layer_pattern(layer), self.name, target)
            records.append(layer_record(layer, sparsity))
            log.debug("%s: %s -> %s", self.name, layer.path, sparsity.describe())
        gm.graph.lint()
        return PassResult(changed=True, layers=records, stats=summarize(records))

    def masks(self, gm: fx.GraphModule, layers: list[Layer], ctx: PassContext) -> dict[str, tuple[torch.Tensor, float]]:
        """Each layer's new mask and its target sparsity."""
        raise NotImplementedError

    def layer_pattern(self, layer: Layer) -> str:
        """The pattern recorded in the layer's annotation."""
        return "unstructured"


def fixed_layers(layers: list[Layer], p: Pass) -> tuple[list[Layer], list[Layer]]:
    """Split layers into those a per-layer override gives their own ``sparsity`` and the global pool."""

    def overridden(layer: Layer) -> bool:
        override = p.overrides.lookup(layer.path)
        return isinstance(override, Mapping) and "sparsity" in override

    return [layer for layer in layers if overridden(layer)], [layer for layer in layers if not overridden(layer)]


@check
def _masks_match_annotations(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        meta = get_meta(node)
        if meta is None or meta.sparsity is None or meta.sparsity.merged or node.op != "call_function":
            continue
        owner = meta.sparsity.mask.rpartition(".")[0]
        try:
            module = gm.get_submodule(owner)
        except AttributeError:
            raise VerificationError(
                f"masked layer '{node.name}' names mask '{meta.sparsity.mask}' but '{owner}' is not a submodule"
            ) from None
        mask = get_attr(gm, meta.sparsity.mask, None)
        if not isinstance(mask, torch.Tensor) or mask.dtype != module.weight.dtype or mask.shape != module.weight.shape:
            raise VerificationError(
                f"masked layer '{node.name}': '{meta.sparsity.mask}' must be a buffer of the "
                f"weight's dtype and shape {tuple(module.weight.shape)}"
            )
        if not ((mask == 0) | (mask == 1)).all():
            raise VerificationError(
                f"masked layer '{node.name}': '{meta.sparsity.mask}' holds values other than 0 and 1"
            )


__all__ = [
    "Layer",
    "MaskPass",
    "fixed_layers",
    "PruneConfig",
    "PruningError",
    "check_sparsity",
    "current_mask",
    "effective_weight",
    "install_mask",
    "keep_count",
    "keep_largest",
    "layer_calls",
    "layer_record",
    "mask_sparsity",
    "restore_call",
    "select_layers",
    "summarize",
]
