"""Small queries on lowbit graphs that passes and backends share.

The tensor behind a ``get_attr`` node, a node's operator name whatever the tracer spelled it
(``operator.mul``, ``torch.mul``, ``Tensor.mul``, ``aten.mul.Tensor``), and the layers of a
graph as ``(path, module, call nodes)``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from lowbit.errors import LowbitError


def attr_path(node_or_target: fx.Node | str) -> str:
    """The dotted attribute path a ``get_attr`` node (or its target) names."""
    if isinstance(node_or_target, fx.Node):
        if node_or_target.op != "get_attr":
            raise LowbitError(f"node '{node_or_target.name}' is a {node_or_target.op}, not a get_attr")
        return str(node_or_target.target)
    return str(node_or_target)


def get_attr(gm: fx.GraphModule, node_or_target: fx.Node | str, default: Any = ...) -> Any:
    """The object a ``get_attr`` node (or a dotted attribute path) names on ``gm``.

    Without ``default`` a missing attribute raises `LowbitError` naming the path.
    """
    path = attr_path(node_or_target)
    owner, _, name = path.rpartition(".")
    try:
        module = gm.get_submodule(owner) if owner else gm
        return getattr(module, name)
    except AttributeError as error:
        if default is not ...:
            return default
        raise LowbitError(f"the graph has no attribute '{path}'") from error


def get_attr_tensor(gm: fx.GraphModule, node_or_target: fx.Node | str) -> torch.Tensor:
    """The tensor (parameter or buffer) a ``get_attr`` node names; `LowbitError` if it is not a tensor."""
    value = get_attr(gm, node_or_target)
    if not isinstance(value, torch.Tensor):
        raise LowbitError(f"'{attr_path(node_or_target)}' is a {type(value).__name__}, not a tensor")
    return value


def op_name(node: fx.Node) -> str:
    """The operator a call node applies, by its base name (``"mul"`` for every spelling of a multiply).

    ``call_method`` nodes give the method name, ``operator.getitem`` gives ``"getitem"``, ATen
    overloads their packet's name; placeholders, outputs, ``get_attr`` and ``call_module`` nodes
    give ``""``.
    """
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    return str(getattr(packet if packet is not None else target, "__name__", target))


def layers(
    gm: fx.GraphModule, kinds: type | tuple[type, ...] = torch.nn.Module
) -> Iterator[tuple[str, torch.nn.Module, list[fx.Node]]]:
    """Each ``call_module`` layer of one of ``kinds``, in graph order: ``(path, module, its call nodes)``.

    A module called several times (shared weights) is yielded once, with every call node.
    """
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), kinds):
            calls.setdefault(str(node.target), []).append(node)
    for path, nodes in calls.items():
        yield path, gm.get_submodule(path), nodes


__all__ = ["attr_path", "get_attr", "get_attr_tensor", "layers", "op_name"]
