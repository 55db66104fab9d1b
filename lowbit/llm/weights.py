"""The weights of a decoder, read from the graph the passes produced.

Each linear of the `DecoderSpec` is either a packed low-bit call the passes left in the graph (its normalized
arguments, the constants resolved) or an fp32 weight still held by the graph (stored ``(in, out)`` by Conv1D
families, transposed here); norms and the embeddings are read by module path. A `Linear` runs one layer in torch
exactly as the graph does, which is what the torch reference decoder calls; `fuse` stacks layers that read the same
input into one (rows are independent, so this is exact). Whatever else a pass may have added to the graph is not
read here: the lowering checks the decoder against the graph on the example inputs (`lowbit.llm.compile`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from lowbit.errors import GenerationError
from lowbit.ir import ops, ops_a8, ops_embedding
from lowbit.ir.annotations import packed_layer
from lowbit.ir.graph import get_attr
from lowbit.llm.family import DecoderSpec

#: The packed linear operators and the argument names that are graph constants.
PACKED_OPS = (ops.linear_packed, ops_a8.linear_packed_a8)
PACKED_TENSORS = ("qweight", "scales", "zeros", "g_idx", "bias", "act_scale")


@dataclass(frozen=True)
class Linear:
    """One linear layer: fp32 ``weight``/``bias``, or a packed call (``op`` and its normalized arguments without
    ``x``)."""

    path: str
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    op: Any = None
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.op is not None

    @property
    def out_features(self) -> int:
        return int((self.arguments["qweight"] if self.packed else self.weight).shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return self.op(x, **self.arguments)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def float_activations(self) -> Linear:
        """This layer with its activations left in float (an int8-activation call becomes ``linear_packed`` on the
        same weight; others are unchanged)."""
        if self.op is not ops_a8.linear_packed_a8:
            return self
        arguments = {name: value for name, value in self.arguments.items() if name != "act_scale"}
        return replace(self, op=ops.linear_packed, arguments=arguments)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """A packed layer's constants by name (``qweight``, ``scales``, ``zeros``, ``g_idx``, ``bias``
        [, ``act_scale``])."""
        return {name: self.arguments.get(name) for name in PACKED_TENSORS}


@dataclass(frozen=True)
class Embedding:
    """The token embedding: an fp32 ``table``, or a packed lookup (``embedding_packed`` and its arguments without
    ``ids``)."""

    table: torch.Tensor | None = None
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.table is None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return ops_embedding.embedding_packed(ids, **self.arguments)
        return self.table[ids]

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.table] if not self.packed else [self.arguments.get(n) for n in ("qweight", "scales", "zeros")]


def fuse(linears: list[Linear]) -> Linear | None:
    """One layer computing the outputs of ``linears`` (same input) side by side: their constants stacked along the
    output rows. None unless all are fp32, or all packed by the same op with the same format (bits, group size,
    zeros present, column order, activation quantization)."""
    first = linears[0]
    path = "+".join(linear.path for linear in linears)
    bias = _stacked_bias(linears)
    if not first.packed:
        if any(linear.packed for linear in linears):
            return None
        return Linear(path, torch.cat([linear.weight for linear in linears]), bias)
    settings = {name: value for name, value in first.arguments.items() if name not in PACKED_TENSORS}
    for linear in linears:
        if linear.op is not first.op or settings != {
            name: value for name, value in linear.arguments.items() if name not in PACKED_TENSORS
        }:
            return None
        for name in ("g_idx", "act_scale"):
            if not _same(first.arguments.get(name), linear.arguments.get(name)):
                return None
        if (first.arguments.get("zeros") is None) != (linear.arguments.get("zeros") is None):
            return None
    arguments = {**first.arguments, "bias": bias}
    for name in ("qweight", "scales", "zeros"):
        if first.arguments.get(name) is not None:
            arguments[name] = torch.cat([linear.arguments[name] for linear in linears])
    return Linear(path, op=first.op, arguments=arguments)


def _stacked_bias(linears: list[Linear]) -> torch.Tensor | None:
    """The biases side by side (zeros for a layer without one); None when no layer has one."""
    biases = [linear.arguments.get("bias") if linear.packed else linear.bias for linear in linears]
    if all(bias is None for bias in biases):
        return None
    return torch.cat(
        [torch.zeros(linear.out_features) if bias is None else bias for linear, bias in zip(linears, biases)]
    )


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


@dataclass(frozen=True)
class DecoderWeights:
    """Every tensor the lowering reads: the embedding (and learned position table), per-block norm weights (and
    LayerNorm biases), the linears."""

    embedding: Embedding
    norms: dict[str, torch.Tensor]
    linears: dict[str, Linear]
    norm_biases: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: Embedding | None = None

    def float_activations(self) -> DecoderWeights:
        """The same weights with every layer's activations left in float (`Linear.float_activations`)."""
        return replace(self, linears={path: linear.float_activations() for path, linear in self.linears.items()})

    def bytes(self) -> int:
        """Bytes of the distinct tensors held (tied tables counted once)."""
        tensors = [*self.embedding.tensors(), *self.norms.values(), *self.norm_biases.values()]
        tensors += self.positions.tensors() if self.positions is not None else []
        for linear in self.linears.values():
            tensors += [linear.weight, linear.bias, *linear.tensors().values()]
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)}
        return sum(seen.values())


def read_weights(gm: fx.GraphModule, spec: DecoderSpec) -> DecoderWeights:
    """The decoder's tensors in ``gm``; `GenerationError` naming the first one that is missing."""
    family = spec.description
    packed = _packed_calls(gm)
    norm_paths = [spec.norm(i, role) for i in range(spec.layers) for role in ("attn", "mlp")] + [spec.final_norm]
    norms = {path: _tensor(gm, f"{path}.weight") for path in norm_paths}
    biases = {path: _tensor(gm, f"{path}.bias") for path in norm_paths} if family.norm == "layer" else {}
    positions = _embedding(gm, family.position_embed) if family.position_embed else None
    linears = {}
    for path in spec.linears():
        if path in packed:
            linears[path] = packed[path]
        elif path == spec.lm_head and spec.tied and get_attr(gm, f"{path}.weight", None) is None:
            linears[path] = Linear(path, weight=_tensor(gm, f"{spec.embed}.weight"))
        else:
            weight = _tensor(gm, f"{path}.weight")
            if family.transposed and path != spec.lm_head:
                weight = weight.t()
            linears[path] = Linear(path, weight, _tensor(gm, f"{path}.bias", optional=True))
    return DecoderWeights(_embedding(gm, spec.embed), norms, linears, biases, positions)


def _embedding(gm: fx.GraphModule, path: str) -> Embedding:
    """The table at ``path``: its packed lookup if the passes packed it, else its fp32 weight."""
    return _packed_embedding(gm, path) or Embedding(_tensor(gm, f"{path}.weight"))


class FloatActivations(fx.Interpreter):
    """Runs a graph with its int8-activation linears computed on float activations (`Linear.float_activations`)."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is ops_a8.linear_packed_a8:
            call = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True).kwargs
            call.pop("act_scale", None)
            return ops.linear_packed(**call)
        return super().call_function(target, args, kwargs)


def _packed_calls(gm: fx.GraphModule) -> dict[str, Linear]:
    """The packed linear calls of ``gm`` by the module path of their packed weight."""
    calls = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in PACKED_OPS:
            continue
        kwargs = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        path = packed_layer(node, kwargs["qweight"])
        arguments = _constants(gm, node, kwargs, "x")
        calls[path] = Linear(path, op=node.target, arguments=arguments)
    return calls


def _packed_embedding(gm: fx.GraphModule, path: str) -> Embedding | None:
    """The ``embedding_packed`` lookup of the table at ``path``, if the passes packed it."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ops_embedding.embedding_packed:
            kwargs = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
            if str(kwargs["qweight"].target).rpartition(".")[0] == path:
                return Embedding(arguments=_constants(gm, node, kwargs, "ids"))
    return None


def _constants(gm: fx.GraphModule, node: fx.Node, kwargs: dict[str, Any], skip: str) -> dict[str, Any]:
    """A call's normalized arguments but ``skip``, each ``get_attr`` resolved to its tensor."""
    arguments = {
        name: get_attr(gm, value) if isinstance(value, fx.Node) else value
        for name, value in kwargs.items()
        if name != skip
    }
    if any(isinstance(value, fx.Node) for value in arguments.values()):
        raise GenerationError(f"node '{node.name}': a packed call whose constants are not graph attributes")
    return arguments


def _tensor(gm: fx.GraphModule, path: str, optional: bool = False) -> torch.Tensor | None:
    value = get_attr(gm, path, None)
    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor):
        raise GenerationError(f"the graph holds no tensor '{path}' where the decoder lowering expects one")
    return value.detach()


__all__ = ["DecoderWeights", "Embedding", "FloatActivations", "Linear", "fuse", "read_weights"]
