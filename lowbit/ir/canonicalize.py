"""Bring a torch.export graph into the form that torch.fx symbolic tracing produces.

torch.export inlines every layer into ATen calls (``aten.linear(x, W, b)``,
``aten.conv2d(x, W, None, [2, 2], [3, 3])``...); fx keeps standard layers as
``call_module`` nodes. Passes are written against one form, the fx one, so each ATen
call that is exactly one layer's forward is turned back into a ``call_module`` of that
layer, targeted by its module path (``encoder.layer.0.attention.self.query``).

A call is rewritten only when it provably equals ``layer(x)``: the innermost entry of
``node.meta["nn_module_stack"]`` names a layer of the original model whose forward is
the stock one (not overridden, no hooks), the call's weight/bias/statistics are
``get_attr`` nodes of that layer's own tensors, and every configuration argument
(stride, padding, eps, ...) equals the layer's. Everything else stays an ATen op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lowbit.ir.graph import get_attr

logger = logging.getLogger("lowbit.trace")

_Args = dict[str, Any]
aten = torch.ops.aten


@dataclass(frozen=True)
class _LayerRule:
    """How to recognise one layer kind's forward among ATen calls."""

    layers: tuple[type[nn.Module], ...]
    input_arg: str  # schema name of the argument that becomes the layer's input
    tensors: Callable[[Any], dict[str, torch.Tensor | None]]  # schema name -> layer tensor
    config_matches: Callable[[Any, _Args], bool]


def _ntuple(value: Any, n: int) -> tuple[Any, ...]:
    """Expand an ATen int-list argument (``1``, ``[1]`` or ``[1, 1]``) to an n-tuple."""
    if isinstance(value, (list, tuple)):
        return tuple(value) * n if len(value) == 1 else tuple(value)
    return (value,) * n


def _conv_matches(layer: Any, args: _Args) -> bool:
    n = len(layer.kernel_size)
    padding = layer.padding if isinstance(layer.padding, str) else _ntuple(args["padding"], n)
    return (
        layer.padding_mode == "zeros"
        and padding == layer.padding
        and _ntuple(args["stride"], n) == tuple(layer.stride)
        and _ntuple(args["dilation"], n) == tuple(layer.dilation)
        and args["groups"] == layer.groups
        and (not layer.transposed or _ntuple(args["output_padding"], n) == tuple(layer.output_padding))
    )


def _embedding_matches(layer: Any, args: _Args) -> bool:
    padding_idx = -1 if layer.padding_idx is None else layer.padding_idx
    return (
        layer.max_norm is None
        and args["padding_idx"] == padding_idx
        and args["scale_grad_by_freq"] == layer.scale_grad_by_freq
        and args["sparse"] == layer.sparse
    )


def _batch_norm_matches(layer: Any, args: _Args) -> bool:
    # Inference only: in eval mode the layer normalises with its running statistics,
    # or with batch statistics when it tracks none.
    return not layer.training and bool(args["training"]) == (layer.running_mean is None) and args["eps"] == layer.eps


def _weight_bias(layer: Any) -> dict[str, torch.Tensor | None]:
    return {"weight": layer.weight, "bias": layer.bias}


_LINEAR = _LayerRule((nn.Linear,), "input", _weight_bias, lambda layer, args: True)
_CONV = _LayerRule((nn.Conv1d, nn.Conv2d, nn.Conv3d), "input", _weight_bias, _conv_matches)
_CONV_T = _LayerRule((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "input", _weight_bias, _conv_matches)
_EMBEDDING = _LayerRule((nn.Embedding,), "indices", lambda layer: {"weight": layer.weight}, _embedding_matches)
_LAYER_NORM = _LayerRule(
    (nn.LayerNorm,),
    "input",
    _weight_bias,
    lambda layer, args: tuple(args["normalized_shape"]) == layer.normalized_shape and args["eps"] == layer.eps,
)
_GROUP_NORM = _LayerRule(
    (nn.GroupNorm,),
    "input",
    _weight_bias,
    lambda layer, args: args["num_groups"] == layer.num_groups and args["eps"] == layer.eps,
)
_RMS_NORM = _LayerRule(
    (nn.RMSNorm,),
    "input",
    lambda layer: {"weight": layer.weight},
    lambda layer, args: tuple(args["normalized_shape"]) == layer.normalized_shape and args["eps"] == layer.eps,
)
_BATCH_NORM = _LayerRule(
    (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "input",
    lambda layer: {
        "weight": layer.weight,
        "bias": layer.bias,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
    },
    _batch_norm_matches,
)

_RULES: dict[Any, _LayerRule] = {
    aten.linear.default: _LINEAR,
    aten.conv1d.default: _CONV,
    aten.conv2d.default: _CONV,
    aten.conv3d.default: _CONV,
    aten.conv1d.padding: _CONV,
    aten.conv2d.padding: _CONV,
    aten.conv3d.padding: _CONV,
    aten.conv_transpose1d.default: _CONV_T,
    aten.conv_transpose2d.input: _CONV_T,
    aten.conv_transpose3d.input: _CONV_T,
    aten.embedding.default: _EMBEDDING,
    aten.layer_norm.default: _LAYER_NORM,
    aten.group_norm.default: _GROUP_NORM,
    aten.rms_norm.default: _RMS_NORM,
    aten.batch_norm.default: _BATCH_NORM,
}


def _bind(node: fx.Node) -> _Args:
    """Map every schema argument of an ATen call to its value, defaults included."""
    bound: _Args = {}
    for i, arg in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _is_layer_tensor(arg: Any, tensor: torch.Tensor | None, model: nn.Module) -> bool:
    """True when ``arg`` is exactly ``tensor``: a get_attr of it, or None for a missing one."""
    if tensor is None:
        return arg is None
    return isinstance(arg, fx.Node) and arg.op == "get_attr" and get_attr(model, arg, None) is tensor


def _has_stock_forward(layer: nn.Module, rule: _LayerRule) -> bool:
    """The layer runs exactly its class's library forward: no override, no hooks."""
    return (
        isinstance(layer, rule.layers)
        and any(type(layer).forward is cls.forward for cls in rule.layers)
        and not (layer._forward_hooks or layer._forward_pre_hooks)
    )


def _owning_layer(node: fx.Node, model: nn.Module) -> tuple[str, nn.Module] | None:
    """The innermost module the node was traced in (path, module), if it still exists."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    layer = get_attr(model, path, None) if path else None
    return (path, layer) if isinstance(layer, nn.Module) else None


def _match(node: fx.Node, model: nn.Module) -> tuple[str, nn.Module, Any] | None:
    """(path, layer, input) when ``node`` is exactly ``layer(input)``, else None."""
    rule = _RULES.get(node.target) if node.op == "call_function" else None
    owner = _owning_layer(node, model) if rule else None
    if rule is None or owner is None:
        return None
    path, layer = owner
    if not _has_stock_forward(layer, rule):
        return None
    args = _bind(node)
    tensors_match = all(_is_layer_tensor(args.get(name), t, model) for name, t in rule.tensors(layer).items())
    if not (tensors_match and rule.config_matches(layer, args)):
        return None
    return path, layer, args[rule.input_arg]


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` under ``root``, creating empty parents as needed."""
    *parents, name = path.split(".")
    for part in parents:
        child = getattr(root, part, None)
        if child is None:
            child = nn.Module()
            root.add_module(part, child)
        root = child
    root.add_module(name, module)


def _replace_with_call_module(graph: fx.Graph, node: fx.Node, path: str, layer_input: Any) -> None:
    with graph.inserting_before(node):
        new = graph.call_module(path, (layer_input,))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _erase_dead_get_attrs(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


def canonicalize_exported(program: torch.export.ExportedProgram, model: nn.Module) -> fx.GraphModule:
    """An fx.GraphModule equivalent to ``program`` with ``model``'s layers as ``call_module`` nodes.

    The result is called like ``model`` (same args, kwargs and output structure, through
    the exported pytree specs), holds parameters and buffers at their original dotted
    names and shares the layer modules and tensors with ``model``, as fx tracing does.
    Input-shape guards are dropped: the graph is specialised to the example shapes.
    """
    exported = program.module(check_guards=False)
    graph = exported.graph
    rewritten = 0
    for node in list(graph.nodes):
        match = _match(node, model)
        if match is None:
            continue
        path, layer, layer_input = match
        _install(exported, path, layer)
        _replace_with_call_module(graph, node, path, layer_input)
        rewritten += 1
    _erase_dead_get_attrs(graph)
    logger.debug("canonicalized %d ATen layer calls into call_module nodes", rewritten)
    return fx.GraphModule(exported, graph, class_name=type(model).__name__)
