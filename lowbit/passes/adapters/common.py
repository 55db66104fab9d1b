"""Shared machinery of the adapter passes: target selection, the adapter branch, the base weight.

An adapted layer keeps its base computation untouched at its module path ``P`` (a
``call_module`` of an ``nn.Linear``, or a ``lowbit.linear_packed`` call for a packed base),
and gains a branch computed by an `AdapterModule` registered as the child ``P.<kind>``::

    base  = P(x)                      # or linear_packed(x, P.qweight, ...)
    delta = P.<kind>(x[, P.weight])   # the trainable adapter
    out   = base + delta

The base node carries the ``Adapter`` annotation. Merging folds ``delta`` into the base
weight and removes the branch (the module stays, with the pre-merge base tensors, so
unmerging restores them bit for bit); unmerging re-inserts it.
"""

from __future__ import annotations

import difflib
import logging
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn as nn

from lowbit.errors import LowbitError, VerificationError
from lowbit.ir import ops, packing
from lowbit.ir.annotations import Adapter, annotate, get_meta
from lowbit.ir.verify import check
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.quant.rewrite import PACKED_BUFFERS, PackedLinear
from lowbit.passes.selection import is_pattern, matches

log = logging.getLogger(__name__)


class AdapterError(LowbitError):
    """An adapter cannot be attached, merged, unmerged, saved or loaded as asked."""


#: Adapter module classes by name, so saved adapters can be rebuilt from their spec.
MODULES: dict[str, type[AdapterModule]] = {}


class AdapterModule(nn.Module):
    """The trainable branch of an adapted layer.

    Subclasses hold the adapter parameters (float32), compute ``forward(x)`` in ``x``'s
    dtype (or ``forward(x, weight)`` when ``needs_weight``: the branch reads the base weight) and
    the equivalent weight update ``delta_weight(weight)`` used by merge. ``spec()`` returns
    the constructor arguments, so `lowbit.passes.adapters.io` can rebuild the module.
    """

    kind: ClassVar[str]
    needs_weight: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        MODULES[cls.__name__] = cls

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        #: Base tensors from before the merge (None while unmerged); unmerge restores them.
        self.pre_merge: dict[str, torch.Tensor | None] | None = None
        #: True when the init rewrote the base weight (PiSSA, SORSA): saving keeps the residual.
        self.residual_base = False

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items())


@dataclass(frozen=True)
class AdapterConfig(PassConfig):
    """Options every adapter pass shares (rank and dropout defaults are per method)."""

    targets: tuple[str, ...] = option(("*",), help="layers to adapt: module paths, a last name ('query'), glob or re:")
    ignore: tuple[str, ...] = option((), help="layers left alone even if a target selects them")
    trainable: tuple[str, ...] = option((), help="modules whose own parameters stay trainable (e.g. a classifier head)")


@dataclass
class BaseLayer:
    """One adaptable layer: its module path, call nodes, shape and whether it is packed."""

    path: str
    nodes: list[fx.Node]
    in_features: int
    out_features: int
    packed: bool


class AdapterPass(Pass):
    """Base of ``lora``, ``sorsa`` and ``bone``: select targets, build a module per layer, attach it."""

    stage = "prepare"
    produces = frozenset({"adapter"})
    # A masked layer is not a plain layer call: bake the masks in (apply_masks) first.
    forbids = frozenset({"sparsity"})
    pattern = "nn.Linear"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = select_layers(gm, self.config.targets, self.config.ignore, self.name)
        configs = {layer.path: self.config_for(layer.path) for layer in layers}
        for layer in layers:  # every layer is checked before any work is done
            if configs[layer.path] is not None:
                self.check_layer(layer, configs[layer.path])
        records = []
        for layer in ctx.progress(layers, desc=self.name):
            config = configs[layer.path]
            if config is None:
                records.append(LayerRecord(layer.path, "skipped", "skipped by a per-layer override"))
                continue
            module, adapter = self.build(gm, layer, config)
            attach(gm, layer, module, adapter)
            records.append(LayerRecord(layer.path, "adapted", stats={"rank": config.rank, "params": count(module)}))
        freeze_base(gm, self.config.trainable)
        adapted = sum(r.action == "adapted" for r in records)
        trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
        return PassResult(changed=adapted > 0, layers=records, stats={"adapted": adapted, "trainable": trainable})

    def check_layer(self, layer: BaseLayer, config: Any) -> None:
        """Raise `AdapterError` if ``layer`` cannot take this adapter (rank, packed base, shape)."""
        check_rank(layer, config.rank, self.name)
        if layer.packed and not self.supports_packed(config):
            raise AdapterError(
                f"{self.name}: layer '{layer.path}' is packed (quantized) and {self.describe(config)} rewrites or "
                "reads its full-precision weight; apply it before quantizing, or use lora/bone on a packed base"
            )

    def supports_packed(self, config: Any) -> bool:
        return False

    def describe(self, config: Any) -> str:
        return self.name

    def build(self, gm: fx.GraphModule, layer: BaseLayer, config: Any) -> tuple[AdapterModule, Adapter]:
        raise NotImplementedError


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ selecting layers


def target_matches(path: str, target: str) -> bool:
    """PEFT's rule for a plain name (the path, or its last components), else glob / ``re:``."""
    if is_pattern(target):
        return matches(path, target)
    return path == target or path.endswith("." + target)


def base_layers(gm: fx.GraphModule) -> dict[str, BaseLayer]:
    """Every linear layer of the graph by module path: ``nn.Linear`` calls and packed linears."""
    layers: dict[str, BaseLayer] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Linear:
            linear = gm.get_submodule(node.target)
            layer = layers.setdefault(
                node.target, BaseLayer(node.target, [], linear.in_features, linear.out_features, False)
            )
            layer.nodes.append(node)
        elif node.op == "call_function" and node.target is ops.linear_packed:
            meta = get_meta(node)
            if meta is None:
                continue
            packed = gm.get_submodule(meta.layer)
            layer = layers.setdefault(
                meta.layer, BaseLayer(meta.layer, [], packed.in_features, packed.out_features, True)
            )
            layer.nodes.append(node)
    return layers


def select_layers(gm: fx.GraphModule, targets: tuple[str, ...], ignore: tuple[str, ...], who: str) -> list[BaseLayer]:
    """The linear layers ``targets`` select, minus ``ignore``; a target that selects nothing is an error."""
    layers = base_layers(gm)
    for target in targets:
        if not any(target_matches(path, target) for path in layers):
            raise AdapterError(f"{who}: target '{target}' matches no linear layer{close_names(target, layers)}")
    chosen = []
    for path, layer in layers.items():
        if any(target_matches(path, t) for t in targets) and not any(target_matches(path, i) for i in ignore):
            adapter = get_meta(layer.nodes[0])
            if adapter is not None and adapter.adapter is not None:
                raise AdapterError(f"{who}: layer '{path}' already carries an adapter ({adapter.adapter.describe()})")
            chosen.append(layer)
    return chosen


def close_names(name: str, candidates: Any) -> str:
    """``"; close layer names: a, b"``: paths most like ``name``, else paths whose last name is like its last name."""
    names = sorted(candidates)
    if not names:
        return "; the graph has no linear layers"
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not close:
        tails = sorted({n.rsplit(".", 1)[-1] for n in names})
        like = difflib.get_close_matches(name.rsplit(".", 1)[-1].strip("*?"), tails, n=3, cutoff=0.5)
        close = [n for n in names if n.rsplit(".", 1)[-1] in like][:5]
    return f"; close layer names: {', '.join(close or names[:5])}"


def check_rank(layer: BaseLayer, rank: int, who: str) -> None:
    limit = min(layer.in_features, layer.out_features)
    if rank > limit:
        raise AdapterError(
            f"{who}: rank {rank} is larger than min(in, out) = {limit} of layer '{layer.path}' "
            f"({layer.in_features} -> {layer.out_features}); lower the rank, or leave the layer out with "
            f"ignore=['{layer.path}'] or a per-layer override"
        )


# ------------------------------------------------------------------ the branch


def attach(gm: fx.GraphModule, layer: BaseLayer, module: AdapterModule, adapter: Adapter) -> None:
    """Register ``module`` as ``<layer>.<kind>`` (on the base's device, parameters in float32 as PEFT
    keeps them), add its branch after each call, annotate the calls."""
    base = gm.get_submodule(layer.path)
    device = next(iter(base.buffers() if layer.packed else base.parameters())).device
    base.add_module(module.kind, module.to(device=device, dtype=torch.float32))
    for node in layer.nodes:
        annotate(node, layer.path, adapter=adapter)
    insert_branches(gm, layer.path, module)


def insert_branches(gm: fx.GraphModule, path: str, module: AdapterModule) -> None:
    """Add ``out = base + <path>.<kind>(x[, weight])`` after every call of the layer at ``path``."""
    for node in layer_calls(gm, path):
        x = node.args[0] if node.args else node.kwargs["input"]
        with gm.graph.inserting_before(node.next):
            extra = (gm.graph.get_attr(f"{path}.weight"),) if module.needs_weight else ()
            delta = gm.graph.call_module(f"{path}.{module.kind}", (x, *extra))
            out = gm.graph.call_function(operator.add, (node, delta))
        if "val" in node.meta:
            delta.meta["val"] = out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
    gm.recompile()


def remove_branches(gm: fx.GraphModule, path: str, module: AdapterModule) -> None:
    """Undo `insert_branches`: each ``base + delta`` becomes ``base`` again."""
    target = f"{path}.{module.kind}"
    for node in layer_calls(gm, path):
        for out in list(node.users):
            if out.op != "call_function" or out.target is not operator.add:
                continue
            delta = out.args[1]
            if not (isinstance(delta, fx.Node) and delta.op == "call_module" and delta.target == target):
                continue
            out.replace_all_uses_with(node)
            gm.graph.erase_node(out)
            extra = delta.args[1:]
            gm.graph.erase_node(delta)
            for arg in extra:
                if isinstance(arg, fx.Node) and not arg.users:
                    gm.graph.erase_node(arg)
    gm.recompile()


def layer_calls(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    """The base call nodes of the layer at ``path`` (``call_module`` or packed op)."""
    result = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == path:
            result.append(node)
        elif node.op == "call_function" and node.target is ops.linear_packed:
            meta = get_meta(node)
            if meta is not None and meta.layer == path:
                result.append(node)
    return result


def adapted_layers(gm: fx.GraphModule) -> Iterator[tuple[str, list[fx.Node], Adapter]]:
    """Every layer carrying an adapter annotation, once, with its call nodes."""
    seen: dict[str, tuple[list[fx.Node], Adapter]] = {}
    for node in gm.graph.nodes:
        meta = get_meta(node)
        if meta is not None and meta.adapter is not None and node.op in ("call_module", "call_function"):
            seen.setdefault(meta.layer, ([], meta.adapter))[0].append(node)
    for path, (nodes, adapter) in seen.items():
        yield path, nodes, adapter


def adapter_module(gm: fx.GraphModule, path: str, adapter: Adapter) -> AdapterModule:
    """The module of the adapter on ``path``; an error if a later rewrite dropped it."""
    try:
        module = gm.get_submodule(f"{path}.{adapter.kind}")
    except AttributeError:
        module = None
    if not isinstance(module, AdapterModule):
        raise AdapterError(
            f"layer '{path}' is annotated with {adapter.describe()} but has no adapter module "
            f"'{path}.{adapter.kind}' (was the layer rewritten, e.g. quantized, after merging?)"
        )
    return module


def freeze_base(gm: fx.GraphModule, trainable: tuple[str, ...] = ()) -> None:
    """Make adapter parameters (and those of ``trainable`` modules) the only trainable ones."""
    adapter_prefixes = [name + "." for name, m in gm.named_modules() if isinstance(m, AdapterModule)]
    kept = {name + "." for name, _ in gm.named_modules() if any(target_matches(name, t) for t in trainable)}
    for name, param in gm.named_parameters():
        keep = any(name.startswith(p) for p in adapter_prefixes) or any(name.startswith(k) for k in kept)
        param.requires_grad_(keep)


# ------------------------------------------------------------------ the base weight


def base_weight(gm: fx.GraphModule, path: str) -> torch.Tensor:
    """The layer's weight ``(out, in)``: the parameter, or the dequantized float32 packed weight."""
    base = gm.get_submodule(path)
    if isinstance(base, PackedLinear):
        return packing.dequantize(
            base.qweight, base.scales, base.zeros, base.g_idx, base.bits, base.group_size, base.in_features
        )
    return base.weight.detach()


def base_tensors(gm: fx.GraphModule, path: str) -> dict[str, torch.Tensor | None]:
    """Copies of the tensors that define the layer's weight (what merge changes)."""
    base = gm.get_submodule(path)
    if isinstance(base, PackedLinear):
        return {
            name: None if getattr(base, name) is None else getattr(base, name).clone()
            for name in PACKED_BUFFERS
            if name != "bias"
        }
    return {"weight": base.weight.detach().clone()}


def restore_base_tensors(gm: fx.GraphModule, path: str, tensors: dict[str, torch.Tensor | None]) -> None:
    base = gm.get_submodule(path)
    for name, tensor in tensors.items():
        current = getattr(base, name)
        if current is None or tensor is None:
            if current is not tensor:
                raise AdapterError(f"layer '{path}': saved base tensor '{name}' does not match the layer's layout")
            continue
        current.data.copy_(tensor)


@check
def _adapter_branches_exist(gm: fx.GraphModule) -> None:
    """An unmerged adapter annotation of a kind these passes make has its module and a branch calling it."""
    kinds = {module.kind for module in MODULES.values()}
    for path, _, adapter in adapted_layers(gm):
        if adapter.merged or adapter.kind not in kinds:
            continue
        target = f"{path}.{adapter.kind}"
        try:
            module = gm.get_submodule(target)
        except AttributeError:
            module = None
        if not isinstance(module, AdapterModule):
            raise VerificationError(f"layer '{path}' is annotated {adapter.describe()} but has no module '{target}'")
        if not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
            raise VerificationError(f"layer '{path}' is annotated {adapter.describe()} but '{target}' is never called")


__all__ = [
    "AdapterConfig",
    "AdapterError",
    "AdapterModule",
    "AdapterPass",
    "BaseLayer",
    "MODULES",
    "adapted_layers",
    "adapter_module",
    "attach",
    "base_layers",
    "base_tensors",
    "base_weight",
    "check_rank",
    "close_names",
    "freeze_base",
    "insert_branches",
    "layer_calls",
    "remove_branches",
    "restore_base_tensors",
    "select_layers",
    "target_matches",
]
