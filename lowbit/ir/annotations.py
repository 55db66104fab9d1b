"""Typed annotations that passes record on graph nodes under ``node.meta["lowbit"]``.

Each pass family owns one field of `LowbitMeta`; the pipeline derives its ordering
state from which fields are set, so annotations are data, never loose dict keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch.fx as fx

META_KEY = "lowbit"


@dataclass(frozen=True)
class QuantScheme:
    """How a layer's weight is quantized and packed.

    ``group_size`` equals the input width for per-channel scales. ``act_bits`` is
    None for weight-only schemes (activations stay floating point).
    """

    bits: int
    group_size: int
    symmetric: bool
    method: str
    act_bits: int | None = None

    def describe(self) -> str:
        width = "1.58" if self.method == "ternary" else self.bits  # ternary codes take 2 of the bits
        text = f"w{width} g{self.group_size} {'sym' if self.symmetric else 'asym'} [{self.method}]"
        if self.act_bits is not None:
            text += f" a{self.act_bits}"
        return text


@dataclass(frozen=True)
class FakeQuant:
    """A training-time fake-quantizer on a layer's weight (QAT)."""

    bits: int
    group_size: int
    method: str

    def describe(self) -> str:
        return f"fake w{self.bits} g{self.group_size} [{self.method}]"


@dataclass(frozen=True)
class Sparsity:
    """A pruning mask on a layer's weight; ``mask`` names the buffer that holds it.

    ``target`` is the sparsity the pass aimed for (None when the pattern fixes it).
    ``merged`` means the mask is baked into the weight (`apply_masks`, structured
    pruning): the record stays for reports and quantizers, but no longer constrains ordering.
    """

    sparsity: float
    pattern: str
    mask: str
    method: str
    target: float | None = None
    merged: bool = False

    def describe(self) -> str:
        text = f"{self.sparsity:.1%} {self.pattern} [{self.method}]"
        if self.target is not None and abs(self.target - self.sparsity) >= 5e-4:
            text += f" target {self.target:.1%}"
        return text + (" applied" if self.merged else "")


@dataclass(frozen=True)
class Adapter:
    """A parameter-efficient adapter attached to a layer."""

    kind: str
    rank: int
    merged: bool = False
    #: The method's form or init, e.g. ``"pissa"`` for LoRA or ``"bat"`` for Bone.
    variant: str = ""

    def describe(self) -> str:
        variant = f"[{self.variant}]" if self.variant else ""
        return f"{self.kind}{variant} r{self.rank}{' merged' if self.merged else ''}"


@dataclass(frozen=True)
class Reparam:
    """A training-time weight reparameterization that `fold_reparam` removes."""

    kind: str
    detail: str = ""

    def describe(self) -> str:
        return self.kind + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class LowbitMeta:
    """Everything lowbit knows about one node. ``layer`` is the module path it computes."""

    layer: str
    quant: QuantScheme | None = None
    fake_quant: FakeQuant | None = None
    sparsity: Sparsity | None = None
    adapter: Adapter | None = None
    reparam: Reparam | None = None

    def kinds(self) -> set[str]:
        """Names of the annotation fields that are set (the pipeline's ordering state)."""
        return {
            f.name
            for f in dataclasses.fields(self)
            if f.name != "layer" and getattr(self, f.name) is not None and _active(getattr(self, f.name))
        }

    def describe(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "layer" and value is not None:
                parts.append(f"{f.name}={value.describe()}")
        return ", ".join(parts)


def _active(annotation: object) -> bool:
    # A merged adapter no longer constrains ordering: its weight is plain again.
    return not getattr(annotation, "merged", False)


ANNOTATION_KINDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LowbitMeta) if f.name != "layer")


def get_meta(node: fx.Node) -> LowbitMeta | None:
    return node.meta.get(META_KEY)


def packed_layer(node: fx.Node, qweight: fx.Node) -> str:
    """The module path of the layer a packed call computes: its annotation's layer (a tied output projection reads
    its embedding table's constants, so only the annotation names it), else the owner of its packed weight."""
    meta = get_meta(node)
    return meta.layer if meta is not None and meta.layer else str(qweight.target).rpartition(".")[0]


def annotate(node: fx.Node, layer: str, **fields: object) -> LowbitMeta:
    """Set (or update) the lowbit annotation of ``node`` and return it."""
    current = get_meta(node)
    meta = dataclasses.replace(current, layer=layer, **fields) if current else LowbitMeta(layer=layer, **fields)
    node.meta[META_KEY] = meta
    return meta


def annotated_nodes(graph: fx.Graph) -> Iterator[tuple[fx.Node, LowbitMeta]]:
    for node in graph.nodes:
        meta = get_meta(node)
        if meta is not None:
            yield node, meta


def graph_kinds(graph: fx.Graph) -> dict[str, list[str]]:
    """Map each active annotation kind to the layers that carry it."""
    state: dict[str, list[str]] = {}
    for _, meta in annotated_nodes(graph):
        for kind in meta.kinds():
            state.setdefault(kind, []).append(meta.layer)
    return state


__all__ = [
    "ANNOTATION_KINDS",
    "Adapter",
    "FakeQuant",
    "LowbitMeta",
    "QuantScheme",
    "Reparam",
    "Sparsity",
    "annotate",
    "annotated_nodes",
    "get_meta",
    "graph_kinds",
    "packed_layer",
]
