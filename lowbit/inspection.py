"""Inspect what compression did to a graph: the weights its layers actually compute with."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.ir import ops, ops_a8, ops_conv, packing
from lowbit.ir.annotations import get_meta
from lowbit.ir.graph import get_attr

log = logging.getLogger(__name__)

_PACKED_OPS = (ops.linear_packed, ops_a8.linear_packed_a8, ops_conv.conv_packed, ops_conv.conv_packed_a8)
_DENSE_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def dequantized_weights(graph: Any) -> dict[str, torch.Tensor]:
    """Per layer name, in graph order, the weight that ``graph`` computes with.

    ``graph`` is a GraphModule (from `lowbit.compile(...).graph`, a pipeline or
    `lowbit.load`) or a compiled model. Packed linears and convolutions (weight-only or with
    int8 activations) give their dequantized float32 weight; plain ``nn.Linear`` and conv
    layers give a copy of their weight. A layer annotated with a pruning mask
    (``Sparsity``; a masked layer's call or a packed one) whose mask buffer is still in
    the graph gives ``weight × mask``. The
    tensors are detached copies: editing them changes nothing.
    """
    gm = graph if isinstance(graph, fx.GraphModule) else getattr(graph, "graph", None)
    if not isinstance(gm, fx.GraphModule):
        raise LowbitError(
            f"dequantized_weights needs a torch.fx GraphModule or a compiled model, got {type(graph).__name__}"
        )
    weights: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        found = _layer_weight(gm, node)
        if found is None or found[0] in weights:
            continue
        layer, weight = found
        weights[layer] = _masked(gm, node, layer, weight)
    return weights


def _layer_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[str, torch.Tensor] | None:
    meta = get_meta(node)
    if node.op == "call_function" and node.target in _PACKED_OPS:
        qweight, scales, zeros, g_idx = (_buffer(gm, arg) for arg in node.args[1:5])
        bits, group_size, in_features = node.args[6:9]
        layer = meta.layer if meta is not None else node.name
        if node.target in (ops_conv.conv_packed, ops_conv.conv_packed_a8):
            weight = ops_conv.conv_weight(qweight, scales, zeros, g_idx, bits, group_size, in_features, node.args[9])
            return layer, weight
        return layer, packing.dequantize(qweight, scales, zeros, g_idx, bits, group_size, in_features)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _DENSE_LAYERS):
            return str(node.target), module.weight.detach().clone()
    if node.op == "call_function" and meta is not None and meta.sparsity is not None:
        # A masked layer calls F.linear/F.conv2d on its module's weight times the mask.
        module = gm.get_submodule(meta.layer)
        return meta.layer, module.weight.detach().clone()
    return None


def _masked(gm: fx.GraphModule, node: fx.Node, layer: str, weight: torch.Tensor) -> torch.Tensor:
    meta = get_meta(node)
    if meta is None or meta.sparsity is None:
        return weight
    for name in (meta.sparsity.mask, f"{layer}.{meta.sparsity.mask}"):
        try:
            mask = gm.get_buffer(name)
        except AttributeError:
            continue
        return weight * mask.to(weight.dtype)
    log.debug("layer %s: mask buffer %r is not in the graph (already applied)", layer, meta.sparsity.mask)
    return weight


def _buffer(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    if arg is None:
        return None
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        raise LowbitError(f"packed linear input {arg} is not a buffer of the graph")
    return get_attr(gm, arg)


__all__ = ["dequantized_weights"]
