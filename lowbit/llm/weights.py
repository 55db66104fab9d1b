"""The weights of a decoder, read from the graph the passes produced.

Each linear of the `DecoderSpec` is either a packed low-bit call the passes left in the graph (its normalized
arguments, the constants resolved) or an fp32 weight still held by the graph; norms and the embedding are read by
module path. `DecoderWeights.linear` runs one layer in torch exactly as the graph does, which is what the torch
reference decoder calls. Whatever else a pass may have added to the graph is not read here: the lowering checks
the decoder against the graph on the example inputs (`lowbit.llm.compile`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from lowbit.errors import GenerationError
from lowbit.ir import ops, ops_a8, ops_embedding
from lowbit.ir.annotations import get_meta
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


@dataclass(frozen=True)
class DecoderWeights:
    """Every tensor the lowering reads: the embedding, per-block norm weights, the linears."""

    embedding: Embedding
    norms: dict[str, torch.Tensor]
    linears: dict[str, Linear]

    def float_activations(self) -> DecoderWeights:
        """The same weights with every layer's activations left in float (`Linear.float_activations`)."""
        return replace(self, linears={path: linear.float_activations() for path, linear in self.linears.items()})

    def bytes(self) -> int:
        """Bytes of the distinct tensors held (tied tables counted once)."""
        tensors = [*self.embedding.tensors(), *self.norms.values()]
        for linear in self.linears.values():
            tensors += [linear.weight, linear.bias, *linear.tensors().values()]
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)}
        return sum(seen.values())


def read_weights(gm: fx.GraphModule, spec: DecoderSpec) -> DecoderWeights:
    """The decoder's tensors in ``gm``; `GenerationError` naming the first one that is missing."""
    packed = _packed_calls(gm)
    embedding = _packed_embedding(gm, spec) or Embedding(_tensor(gm, f"{spec.embed}.weight"))
    norms = {f"{spec.norm(i, role)}": _tensor(gm, f"{spec.norm(i, role)}.weight") for i in range(spec.layers)
             for role in ("attn", "mlp")}  # fmt: skip
    norms[spec.final_norm] = _tensor(gm, f"{spec.final_norm}.weight")
    linears = {}
    for path in spec.linears():
        if path in packed:
            linears[path] = packed[path]
        elif path == spec.lm_head and spec.tied and get_attr(gm, f"{path}.weight", None) is None:
            linears[path] = Linear(path, weight=_tensor(gm, f"{spec.embed}.weight"))
        else:
            linears[path] = Linear(path, _tensor(gm, f"{path}.weight"), _tensor(gm, f"{path}.bias", optional=True))
    return DecoderWeights(embedding, norms, linears)


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
        meta = get_meta(node)  # a tied output projection reads the embedding's table: its own path names it
        path = meta.layer if meta is not None and meta.layer else str(kwargs["qweight"].target).rpartition(".")[0]
        arguments = _constants(gm, node, kwargs, "x")
        calls[path] = Linear(path, op=node.target, arguments=arguments)
    return calls


def _packed_embedding(gm: fx.GraphModule, spec: DecoderSpec) -> Embedding | None:
    """The ``embedding_packed`` lookup of the embedding table, if the passes packed it."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ops_embedding.embedding_packed:
            kwargs = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
            if str(kwargs["qweight"].target).rpartition(".")[0] == spec.embed:
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


__all__ = ["DecoderWeights", "Embedding", "FloatActivations", "Linear", "read_weights"]
