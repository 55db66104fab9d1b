"""Graph analysis for AWQ: which linears share an input, and which op can absorb its scale.

`scale_groups` groups the linears called once on one input node (a linear called several times,
and every convolution, is a group of its own); `find_producer` looks upstream of that input for an
op whose parameters can divide its output channels by AWQ's scale with the model unchanged: an
``nn.Linear``'s last rows, a LayerNorm/RMSNorm module, or a multiply by a 1-D weight (transformers'
RMSNorm), reached only through scale-commuting ops nothing else reads; for a convolution's input
(channels on dim 1), a batch norm or a convolution's output channels. Without one, AWQ keeps an
explicit ``x / s``; docs/methods.md (AWQ).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from lowbit.ir.graph import get_attr, layers, op_name

#: Ops with one tensor input that commute with a positive per-channel scale of the last dim.
_PASSTHROUGH = frozenset(
    {
        "view",
        "reshape",
        "_unsafe_view",
        "transpose",
        "permute",
        "contiguous",
        "clone",
        "alias",
        "unsqueeze",
        "squeeze",
        "flatten",
        "t",
        "detach",
        "dropout",
        "relu",
        "relu_",
        "leaky_relu",
        "_to_copy",
        "to",
        "float",
    }
)
#: Ops linear in one operand, and the argument positions where that operand may sit.
_LINEAR_IN = {
    "mul": (0, 1),
    "truediv": (0,),
    "div": (0,),
    "matmul": (1,),
    "bmm": (1,),
    "scaled_dot_product_attention": (2,),
}
#: Modules that pass their input through unchanged in eval mode, or commute with the scale.
_PASSTHROUGH_MODULES = (nn.Dropout, nn.Identity, nn.ReLU, nn.LeakyReLU)
#: Side-effect-only users (shape/dtype assertions in exported graphs) that read no values.
_SINKS = frozenset({"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"})
_NORMS = (nn.LayerNorm, nn.RMSNorm)
_MAX_DEPTH = 32


@dataclass
class ScaleGroup:
    """Linears (or one convolution) that share one AWQ scale: their call nodes, module paths and calls per forward."""

    nodes: list[fx.Node]
    paths: list[str]
    calls: int

    @property
    def name(self) -> str:
        return ", ".join(self.paths)

    @property
    def input(self) -> fx.Node:
        """The input node of the group's (first) call."""
        return self.nodes[0].args[0]  # type: ignore[return-value]


@dataclass
class Producer:
    """An op that can absorb a scale of its output channels.

    ``kind`` is ``"linear"`` (rows of ``target``'s weight and bias: a linear or convolution), ``"norm"`` (weight
    and bias of the norm module ``target``) or ``"weight"`` (the 1-D tensor at
    attribute path ``target``, multiplied into ``node``'s output).
    """

    kind: str
    node: fx.Node
    target: str

    def describe(self, gm: fx.GraphModule) -> str:
        if self.kind == "weight":
            return f"elementwise weight '{self.target}' (node {self.node.name})"
        return f"{type(gm.get_submodule(self.target)).__name__} '{self.target}'"

    def tensors(self, gm: fx.GraphModule) -> list[tuple[nn.Module, str]]:
        """The (owner module, attribute) pairs the fold divides."""
        if self.kind == "weight":
            owner, _, name = self.target.rpartition(".")
            return [(gm.get_submodule(owner), name)]
        module = gm.get_submodule(self.target)
        return [(module, name) for name in ("weight", "bias") if getattr(module, name, None) is not None]


def scale_groups(gm: fx.GraphModule, paths: list[str]) -> list[ScaleGroup]:
    """Groups of the ``nn.Linear`` layers at ``paths`` in graph order (module doc)."""
    wanted = set(paths)
    groups: dict[object, ScaleGroup] = {}
    for path, module, nodes in layers(gm):
        if path not in wanted:
            continue
        key = nodes[0].args[0] if len(nodes) == 1 and isinstance(module, nn.Linear) else path
        if key in groups:
            groups[key].nodes.append(nodes[0])
            groups[key].paths.append(path)
        else:
            groups[key] = ScaleGroup(list(nodes), [path], len(nodes))
    return list(groups.values())


def readers(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its value (assertion-only nodes of exported graphs excluded)."""
    return [u for u in node.users if op_name(u) not in _SINKS]


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short name for the op producing ``node``, for reports."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    if node.op == "placeholder":
        return f"graph input '{node.name}'"
    return f"{op_name(node)} (node {node.name})"


def find_producer(gm: fx.GraphModule, group: ScaleGroup) -> tuple[Producer | None, str]:
    """The op that can absorb the group's scale, or None and the reason why there is none."""
    if group.calls > 1:
        return None, f"{group.paths[0]} is called {group.calls} times, on different inputs"
    x = group.input
    if set(readers(x)) != set(group.nodes):
        return None, "the input is also read by other ops than the group's linears"
    layer = gm.get_submodule(group.paths[0])
    conv = isinstance(layer, nn.modules.conv._ConvNd)
    width = layer.in_channels if conv else layer.in_features
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for producer in _candidates(gm, x, width, 0, conv):
        if _isolated(gm, producer.node, x, order):
            return producer, ""
    return None, f"no norm, linear or weight multiply upstream of {describe_node(gm, x)} can absorb it"


def _candidates(gm: fx.GraphModule, node: fx.Node, width: int, depth: int, conv: bool) -> Iterator[Producer]:
    """Foldable ops reachable backwards from ``node`` through scale-commuting ops (channels on dim 1 if ``conv``)."""
    producer = _conv_producer(gm, node, width) if conv else _as_producer(gm, node, width)
    if producer is not None:
        yield producer
        return
    if depth >= _MAX_DEPTH:
        return
    for arg in _scaled_operands(gm, node):
        yield from _candidates(gm, arg, width, depth + 1, conv)


def _conv_producer(gm: fx.GraphModule, node: fx.Node, width: int) -> Producer | None:
    """A batch norm (affine) or a plain convolution with ``width`` output channels, called once."""
    if node.op != "call_module" or not _called_once_and_unread(gm, node.target):
        return None
    module = gm.get_submodule(node.target)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_features == width and module.affine:
        return Producer("norm", node, node.target)
    if type(module) in (nn.Conv1d, nn.Conv2d) and module.out_channels == width:
        return Producer("linear", node, node.target)
    return None


def _as_producer(gm: fx.GraphModule, node: fx.Node, width: int) -> Producer | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not _called_once_and_unread(gm, node.target):
            return None
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and module.out_features >= width:
            return Producer("linear", node, node.target)
        if (
            isinstance(module, _NORMS)
            and tuple(module.normalized_shape) == (width,)
            and getattr(module, "weight", None) is not None
        ):
            return Producer("norm", node, node.target)
        return None
    if op_name(node) == "mul" and len(node.args) == 2 and not node.kwargs:
        attrs = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        others = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        if len(attrs) == 1 and len(others) == 1:
            attr = attrs[0]
            tensor = get_attr(gm, attr, None)
            shared = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == attr.target]
            if (
                isinstance(tensor, torch.Tensor)
                and tuple(tensor.shape) == (width,)
                and tensor.is_floating_point()
                and shared == [attr]
                and len(attr.users) == 1
            ):
                return Producer("weight", node, str(attr.target))
    return None


def _scaled_operands(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The inputs of ``node`` through which a per-channel scale reaches its output unchanged."""
    name = op_name(node)
    if node.op == "call_module":
        passthrough = isinstance(gm.get_submodule(node.target), _PASSTHROUGH_MODULES)
        return [node.args[0]] if passthrough and node.args and isinstance(node.args[0], fx.Node) else []
    if node.op not in ("call_function", "call_method"):
        return []
    if name in _PASSTHROUGH:
        return [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []
    if name in _LINEAR_IN and "rounding_mode" not in node.kwargs:
        positions = _LINEAR_IN[name]
        return [
            node.args[i]
            for i in positions
            if i < len(node.args) and isinstance(node.args[i], fx.Node) and node.args[i].op != "get_attr"
        ]
    return []


def _isolated(gm: fx.GraphModule, start: fx.Node, x: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether ``start``'s output reaches the rest of the graph only through ``x``, along
    scale-commuting ops that each receive it through exactly one allowed operand."""
    path = _between(start, x, order)
    for node in path - {x}:
        if any(u not in path for u in readers(node)):
            return False
    for node in path - {start}:
        tensor_args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        on_path = [a for a in tensor_args if a in path]
        if len(on_path) != 1 or tensor_args.count(on_path[0]) != 1 or on_path[0] not in _scaled_operands(gm, node):
            return False
    return True


def _between(start: fx.Node, end: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes on some path from ``start`` to ``end`` (both included)."""
    ancestors, stack = {end}, [end]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in ancestors and order[arg] >= order[start]:
                ancestors.add(arg)
                stack.append(arg)
    descendants, stack = {start}, [start]
    while stack:
        for user in stack.pop().users:
            if user not in descendants and order[user] <= order[end]:
                descendants.add(user)
                stack.append(user)
    return ancestors & descendants


def _called_once_and_unread(gm: fx.GraphModule, path: str) -> bool:
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == path)
    read = any(n.op == "get_attr" and str(n.target).startswith(path + ".") for n in gm.graph.nodes)
    return calls == 1 and not read


__all__ = ["Producer", "ScaleGroup", "describe_node", "find_producer", "readers", "scale_groups"]
