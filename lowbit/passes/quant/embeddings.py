"""``quantize_embeddings``: round-to-nearest packed tables for every ``nn.Embedding``, and for the output linear
tied to one.

Each table is rounded per row and group on the uniform grid (`lowbit.passes.quant.grid`; defaults 8 bits,
groups of 32, symmetric, like llama.cpp's Q8_0) and packed; its lookups become ``lowbit.embedding_packed``
calls (`lowbit.ir.ops_embedding`). An ``nn.Linear`` whose weight is the same tensor as the table (a tied
``lm_head``) becomes a ``lowbit.linear_packed`` call on the same ``get_attr`` constants, so the codes are stored
once; ``tied_output: false`` leaves such a linear in float (its weight then stays as well). docs/methods.md
(Packed embeddings) has the math.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from lowbit.errors import LowbitError, PassConfigError
from lowbit.ir import ops, ops_embedding
from lowbit.ir.annotations import QuantScheme, annotate
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.quant.grid import SCALE_DTYPES, QuantizedWeight, quantize_weight, relative_error
from lowbit.passes.quant.rewrite import PackedLinear, linear_nodes, skip_reason
from lowbit.passes.registry import register
from lowbit.passes.selection import matches

log = logging.getLogger(__name__)

#: Buffers of a `PackedEmbedding`, in the order ``embedding_packed`` takes them after the ids.
TABLE_BUFFERS: tuple[str, ...] = ("qweight", "scales", "zeros")


class UnsupportedEmbeddingError(LowbitError):
    """An embedding layer whose lookup a packed table cannot compute (``max_norm`` renormalizes rows in place)."""


@dataclass(frozen=True)
class EmbeddingConfig(PassConfig):
    """Options of the ``quantize_embeddings`` pass."""

    bits: int = option(8, choices=ops_embedding.EMBEDDING_BITS, help="code width of the table")
    group_size: int = option(32, help="columns per scale; it must divide the embedding dim; -1 = one scale per row")
    symmetric: bool = option(True, help="symmetric grid (no stored zero points) instead of asymmetric")
    tied_output: bool = option(True, help="an output linear tied to a table runs on the packed table too")
    scale_dtype: str = option(
        "float32", choices=tuple(SCALE_DTYPES), help="the values group scales are rounded to (float16: half the bytes)"
    )
    ignore: tuple[str, ...] = option((), help="embedding layers left in floating point: module paths or patterns")

    @classmethod
    def from_options(cls, pass_name: str, options: Mapping[str, Any]) -> EmbeddingConfig:
        if "ignore" in options:
            # Module paths as strings: YAML reads an ``nn.Sequential`` child's name (``[0]``) as an int.
            entries = options["ignore"] if isinstance(options["ignore"], (list, tuple)) else (options["ignore"],)
            if all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in entries):
                options = {**options, "ignore": tuple(str(e) for e in entries)}
        return super().from_options(pass_name, options)

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if self.group_size != -1 and self.group_size < 1:
            raise PassConfigError(
                f"{pass_name}: group_size={self.group_size!r} is out of range; use -1 (one scale per row) or >= 1"
            )


class PackedEmbedding(nn.Module):
    """An embedding table in the packed format; ``forward`` calls ``lowbit.embedding_packed``.

    It holds only buffers (``qweight``, ``scales`` and, when asymmetric, ``zeros``); the GraphModule
    reads them through ``get_attr`` nodes, and a tied `PackedLinear` holds the same tensors.
    """

    def __init__(
        self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
    ) -> None:
        super().__init__()
        self.embedding_dim = scales.shape[1] * group_size
        ops_embedding.check_table(qweight, scales, zeros, bits, group_size, self.embedding_dim)
        for name, tensor in zip(TABLE_BUFFERS, (qweight, scales, zeros)):
            self.register_buffer(name, tensor)
        self.bits = bits
        self.group_size = group_size
        self.num_embeddings = qweight.shape[0]

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> PackedEmbedding:
        return cls(qw.pack(), qw.scales, qw.zeros, qw.bits, qw.group_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ops_embedding.embedding_packed(
            ids, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.embedding_dim
        )

    def tied_linear(self) -> PackedLinear:
        """The output projection ``x · Tᵀ`` on this table's very tensors (no copy)."""
        return PackedLinear(
            self.qweight, self.scales, self.zeros, None, None, self.bits, self.group_size, self.embedding_dim
        )

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, bits={self.bits}, "
            f"group_size={self.group_size}, zeros={self.zeros is not None}"
        )


@register
class QuantizeEmbeddings(Pass):
    """Packed round-to-nearest tables for every ``nn.Embedding`` not ignored, and for the linears tied to them."""

    name = "quantize_embeddings"
    Config = EmbeddingConfig
    stage = "convert"
    produces = frozenset({"quant"})
    forbids = frozenset({"adapter", "reparam", "fake_quant", "sparsity"})
    after_pack = True
    pattern = "nn.Embedding"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        tables = _embedding_calls(gm)
        self.warn_unused_overrides(list(tables), "embedding layer")
        records = []
        for path, nodes in ctx.progress(list(tables.items()), desc=self.name):
            records += self._quantize_table(gm, path, nodes)
        gm.graph.lint()
        gm.recompile()
        quantized = [r for r in records if r.action == "quantized"]
        return PassResult(
            changed=bool(quantized),
            layers=records,
            stats={
                "quantized": sum("tied_to" not in r.stats for r in quantized),
                "tied": sum("tied_to" in r.stats for r in quantized),
                "skipped": len(records) - len(quantized),
            },
        )

    def _quantize_table(self, gm: fx.GraphModule, path: str, nodes: list[fx.Node]) -> list[LayerRecord]:
        """Pack one table and rewrite its lookups and tied linears; records for the table and each tied linear."""
        embedding = gm.get_submodule(path)
        config = self.config_for(path)
        reason = _skip_reason(gm, path, nodes, self.config.ignore) or (
            None if config is not None else "skipped by a per-layer override"
        )
        if reason is not None:
            log.info("%s: skipping %s: %s", self.name, path, reason)
            return [LayerRecord(path, "skipped", reason)]
        if embedding.max_norm is not None:
            raise UnsupportedEmbeddingError(
                f"embedding '{path}' has max_norm={embedding.max_norm}: its lookups rescale rows of the table, which a "
                f"packed table cannot do; add it to {self.name}'s ignore list"
            )
        dim = embedding.embedding_dim
        if config.group_size != -1 and dim % config.group_size:
            raise PassConfigError(
                f"{self.name}: group_size={config.group_size} does not divide the embedding dim {dim} of '{path}'; "
                f"choose a divisor of {dim}, -1 (one scale per row), or ignore the layer"
            )
        weight = embedding.weight.detach()
        qw = quantize_weight(
            weight,
            config.bits,
            config.group_size,
            config.symmetric,
            name=path,
            scale_dtype=SCALE_DTYPES[config.scale_dtype],
        )
        scheme = QuantScheme(bits=qw.bits, group_size=qw.group_size, symmetric=config.symmetric, method=self.name)
        tied = _tied_linears(gm, weight, config.tied_output)
        packed = PackedEmbedding.from_quantized(qw).to(weight.device)
        gm.set_submodule(path, packed)
        for node in nodes:
            _rewrite_lookup(gm, node, path, scheme)
        stats = {"bits": qw.bits, "group_size": qw.group_size, "rel_error": relative_error(weight, qw.dequantize())}
        records = [LayerRecord(path, "quantized", stats=stats)]
        for linear_path, calls in tied.items():
            gm.set_submodule(linear_path, packed.tied_linear())
            for node in calls:
                _rewrite_tied_call(gm, node, path, linear_path, scheme)
            records.append(LayerRecord(linear_path, "quantized", stats={**stats, "tied_to": path}))
        log.debug("%s: %s -> %s, tied: %s", self.name, path, scheme.describe(), ", ".join(tied) or "none")
        return records


def _embedding_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Every ``call_module`` of an ``nn.Embedding``, by module path."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Embedding):
            calls.setdefault(str(node.target), []).append(node)
    return calls


def _skip_reason(gm: fx.GraphModule, path: str, nodes: list[fx.Node], ignore: tuple[str, ...]) -> str | None:
    """Why the table at ``path`` stays in float, or None (an ``ignore`` pattern, a form the op does not compute)."""
    for pattern in ignore:
        if matches(path, pattern):
            return f"ignored (matches '{pattern}')"
    embedding = gm.get_submodule(path)
    if type(embedding).forward is not nn.Embedding.forward:
        return f"{type(embedding).__name__} overrides nn.Embedding.forward, so its computation is not a plain lookup"
    weight = embedding.weight
    if weight.device.type == "meta" or not weight.is_floating_point():
        return f"its table is {weight.dtype} on {weight.device} (no floating-point data to quantize)"
    odd = [n.name for n in nodes if _single_input(n) is None]
    if odd:
        return f"it is called with arguments other than one input (nodes {', '.join(odd)})"
    readers = [n.name for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith(path + ".")]
    if readers:
        return f"its table is also read outside the lookup (nodes {', '.join(readers)})"
    linears = {p for _, p, _ in linear_nodes(gm)}
    others = [
        p
        for p, module in gm.named_modules(remove_duplicate=False)
        if p != path and any(_same_tensor(t, weight) for t in module.parameters(recurse=False)) and p not in linears
    ]
    if others:
        return f"its table is also held by {', '.join(others)}, which is not a linear layer of the graph"
    return None


def _tied_linears(gm: fx.GraphModule, weight: torch.Tensor, enabled: bool) -> dict[str, list[fx.Node]]:
    """The ``nn.Linear`` call sites, by path, whose weight is ``weight`` and that can run on the packed table."""
    tied: dict[str, list[fx.Node]] = {}
    for node, path, linear in linear_nodes(gm):
        if not _same_tensor(linear.weight, weight):
            continue
        reason = "tied_output is false" if not enabled else skip_reason(gm, path, ())
        if reason is None and linear.bias is not None:
            reason = "it has a bias"
        if reason is None:
            tied.setdefault(path, []).append(node)
        else:
            log.info("linear %s is tied to an embedding table but keeps its float weight: %s", path, reason)
    return tied


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor, or a view of the same memory with the same layout (a tie made through ``.data``)."""
    if a is b:
        return True
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _single_input(node: fx.Node) -> fx.Node | None:
    if len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if not node.args and set(node.kwargs) == {"input"}:
        return node.kwargs["input"]
    return None


def _table_args(gm: fx.GraphModule, path: str) -> list[fx.Node | None]:
    packed = gm.get_submodule(path)
    return [None if getattr(packed, name) is None else gm.graph.get_attr(f"{path}.{name}") for name in TABLE_BUFFERS]


def _rewrite_lookup(gm: fx.GraphModule, node: fx.Node, path: str, scheme: QuantScheme) -> None:
    """One ``call_module`` of the table → ``get_attr`` nodes feeding ``lowbit.embedding_packed``."""
    packed = gm.get_submodule(path)
    with gm.graph.inserting_before(node):
        new = gm.graph.create_node(
            "call_function",
            ops_embedding.embedding_packed,
            (_single_input(node), *_table_args(gm, path), packed.bits, packed.group_size, packed.embedding_dim),
            name=f"{node.name}_packed",
        )
    _replace(gm, node, new, path, scheme)


def _rewrite_tied_call(gm: fx.GraphModule, node: fx.Node, table: str, path: str, scheme: QuantScheme) -> None:
    """One call of a tied linear → ``lowbit.linear_packed`` on the table's own ``get_attr`` constants."""
    packed = gm.get_submodule(table)
    layout = (packed.bits, packed.group_size, packed.embedding_dim)
    with gm.graph.inserting_before(node):
        qweight, scales, zeros = _table_args(gm, table)
        new = gm.graph.create_node(
            "call_function",
            ops.linear_packed,
            (_single_input(node), qweight, scales, zeros, None, None, *layout),
            name=f"{node.name}_packed",
        )
    _replace(gm, node, new, path, scheme)


def _replace(gm: fx.GraphModule, node: fx.Node, new: fx.Node, layer: str, scheme: QuantScheme) -> None:
    new.meta = copy.copy(node.meta)
    annotate(new, layer=layer, quant=scheme)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


__all__ = ["EmbeddingConfig", "PackedEmbedding", "QuantizeEmbeddings", "UnsupportedEmbeddingError"]
