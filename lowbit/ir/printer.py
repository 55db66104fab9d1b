"""Readable listing of a graph: one row per node with its shape and lowbit annotations."""

from __future__ import annotations

import torch
import torch.fx as fx

from lowbit.ir.annotations import get_meta


def format_graph(gm: fx.GraphModule, annotated_only: bool = False) -> str:
    """A table of the graph's nodes: name, op, target, output shape, annotations."""
    rows = [("node", "op", "target", "shape", "annotations")]
    for node in gm.graph.nodes:
        meta = get_meta(node)
        if annotated_only and meta is None:
            continue
        rows.append((node.name, node.op, _target(node), _shape(node), meta.describe() if meta else ""))
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(rows[0]) - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [_fit(cell, width).ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 11)
    return "\n".join(lines)


def summarize(gm: fx.GraphModule) -> str:
    """One line: node count, call_module leaves and annotated layers."""
    nodes = list(gm.graph.nodes)
    modules = sum(1 for n in nodes if n.op == "call_module")
    annotated = sum(1 for n in nodes if get_meta(n) is not None)
    return f"{len(nodes)} nodes, {modules} module calls, {annotated} annotated"


def _target(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str) or hasattr(target, "_schema"):  # names, and torch ops like aten.linear.default
        return str(target)
    return getattr(target, "__name__", str(target))


def _shape(node: fx.Node) -> str:
    tensor_meta = node.meta.get("tensor_meta")
    if tensor_meta is None:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return _fmt(value.shape, value.dtype)
        return ""
    if hasattr(tensor_meta, "shape"):
        return _fmt(tensor_meta.shape, tensor_meta.dtype)
    return "(" + ", ".join(_fmt(t.shape, t.dtype) for t in _flatten(tensor_meta)) + ")"


def _flatten(value: object) -> list:
    if hasattr(value, "shape"):
        return [value]
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in _flatten(v)]
    if isinstance(value, dict):
        return [item for v in value.values() for item in _flatten(v)]
    return []


def _fmt(shape: torch.Size, dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')}[{','.join(map(str, shape))}]"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
