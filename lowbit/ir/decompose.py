"""Decompose recurrent and attention layers into ordinary linears and primitive ops.

``nn.LSTM``, ``nn.GRU`` and ``nn.MultiheadAttention`` hide their matrix products behind fused
kernels, so neither the quantization passes nor the TVM frontend see a linear layer in them. After fx
tracing, each ``call_module`` of such a layer is replaced by the graph of an equivalent module made of
``nn.Linear`` layers (sharing the original weights) and elementwise ops, inlined under the layer's own
path: an LSTM at ``rnn`` becomes ``rnn.ih_l0`` / ``rnn.hh_l0`` linears and its gate math unrolled over
the (static) sequence length; an attention layer at ``attn`` becomes ``attn.q_proj`` ... ``attn.out_proj``
and an explicit ``softmax(q kᵀ / √d + mask) v``. torch.export has no ``call_module`` to replace: the same
modules stand in for the layers while it traces (`decomposed_for_export`). An option that is not decomposed raises
`UnsupportedOptionError` naming the layer, the option and the fix, never a different result.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from lowbit.errors import TraceError

logger = logging.getLogger("lowbit.trace")

_FIX = "keep the layer whole with leaf_modules=(its class or path,) and compile with target='torch'"


class UnsupportedOptionError(TraceError):
    """A recurrent or attention layer uses an option lowbit does not decompose."""


def _refuse(path: str, layer: nn.Module, option: str) -> UnsupportedOptionError:
    return UnsupportedOptionError(
        f"module {path!r} ({type(layer).__name__}): {option} is not supported by the decomposition into linears; "
        f"{_FIX}, or drop the option"
    )


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are (views of) the given tensors, not copies."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=False)
    return layer


# --- recurrent layers -----------------------------------------------------------


class UnrolledRNN(nn.Module):
    """An ``nn.LSTM`` or ``nn.GRU`` (eval mode) unrolled over ``seq_len`` steps.

    Each layer and direction has an input linear ``ih_l{k}[_reverse]``, applied to the whole
    sequence at once, and a hidden linear ``hh_l{k}[_reverse]``, applied at every step.
    ``forward(x, h0, c0)`` returns what the original returns; without ``initial_state`` the states start at zero.
    """

    def __init__(self, rnn: nn.LSTM | nn.GRU, seq_len: int, batch: int, initial_state: bool) -> None:
        super().__init__()
        self.initial_state = initial_state
        self.lstm = isinstance(rnn, nn.LSTM)
        self.seq_len, self.batch = seq_len, batch
        self.hidden, self.layers, self.batch_first = rnn.hidden_size, rnn.num_layers, rnn.batch_first
        self.directions = 2 if rnn.bidirectional else 1
        for layer in range(self.layers):
            for suffix in self._suffixes(layer):
                for kind in ("ih", "hh"):
                    bias = getattr(rnn, f"bias_{kind}{suffix}") if rnn.bias else None
                    self.add_module(f"{kind}{suffix}", _linear(getattr(rnn, f"weight_{kind}{suffix}"), bias))

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: self.directions]

    def _cell(self, gates: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, suffix: str) -> tuple[Any, Any]:
        recurrent = getattr(self, f"hh{suffix}")(h)
        if self.lstm:
            i, f, g, o = torch.chunk(gates + recurrent, 4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        x_r, x_z, x_n = torch.chunk(gates, 3, dim=-1)
        h_r, h_z, h_n = torch.chunk(recurrent, 3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1.0 - z) * n + z * h, None  # a float constant: as an ATen rsub, TVM types an int one int32

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None, c0: torch.Tensor | None = None) -> Any:
        if self.batch_first:
            x = x.transpose(0, 1)
        finals_h, finals_c = [], []
        for layer in range(self.layers):
            outputs = []
            for direction, suffix in enumerate(self._suffixes(layer)):
                index = layer * self.directions + direction
                gates = getattr(self, f"ih{suffix}")(x)
                zeros = torch.zeros_like(torch.select(gates, 0, 0).narrow(-1, 0, self.hidden))
                h = torch.select(h0, 0, index) if self.initial_state else zeros
                c = torch.select(c0, 0, index) if self.initial_state and self.lstm else zeros
                steps: list[Any] = [None] * self.seq_len
                order = range(self.seq_len - 1, -1, -1) if direction else range(self.seq_len)
                for t in order:
                    h, c = self._cell(torch.select(gates, 0, t), h, c, suffix)
                    steps[t] = h
                outputs.append(torch.stack(steps, dim=0))
                finals_h.append(h)
                finals_c.append(c)
            x = outputs[0] if self.directions == 1 else torch.cat(outputs, dim=-1)
        out = x.transpose(0, 1) if self.batch_first else x
        h_n = torch.stack(finals_h, dim=0)
        return (out, (h_n, torch.stack(finals_c, dim=0))) if self.lstm else (out, h_n)


def _rnn_module(path: str, rnn: nn.Module, bound: dict[str, Any]) -> nn.Module:
    x, hx = bound.get("input"), bound.get("hx")
    for option, used in (
        ("proj_size", getattr(rnn, "proj_size", 0)),
        ("training mode (dropout between layers)", rnn.training and rnn.dropout),
        ("a PackedSequence input", _shape(x) is None),
    ):
        if used:
            raise _refuse(path, rnn, option)
    shape = _shape(x)
    if len(shape) != 3:
        raise _refuse(path, rnn, "an unbatched (2-D) input")
    seq_len, batch = (shape[1], shape[0]) if rnn.batch_first else (shape[0], shape[1])
    return UnrolledRNN(rnn, seq_len, batch, hx is not None)


def _rnn_inputs(rnn: nn.Module, node: fx.Node) -> list[Any]:
    bound = _bind(rnn, node)
    hx = bound.get("hx")
    if isinstance(rnn, nn.LSTM) and isinstance(hx, fx.Node):
        bound["hx"] = (_getitem(node.graph, node, hx, 0), _getitem(node.graph, node, hx, 1))
    return _rnn_arguments(rnn, bound)


def _rnn_arguments(rnn: nn.Module, bound: dict[str, Any]) -> list[Any]:
    """`UnrolledRNN.forward`'s ``(x, h0, c0)`` from the layer's arguments (an LSTM's ``hx`` as a pair)."""
    x, hx = bound.get("input"), bound.get("hx")
    if not isinstance(rnn, nn.LSTM):
        return [x, hx, None]
    return [x, *(hx if hx is not None else (None, None))]


# --- attention ------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCall:
    """What one call of an attention layer does, known when tracing: static sizes and options (the batch is
    left free: it is whatever the inputs hold)."""

    q_len: int
    kv_len: int
    need_weights: bool = True
    average_weights: bool = True
    key_padding_mask: str | None = None  # "bool" or "float" when given
    attn_mask: str | None = None
    attn_mask_rank: int = 2


class DecomposedAttention(nn.Module):
    """An ``nn.MultiheadAttention`` (eval mode) as ``q_proj``/``k_proj``/``v_proj``/``out_proj`` linears
    around ``softmax(q kᵀ / √d + mask) v``; ``forward`` returns ``(output, weights or None)`` like it."""

    def __init__(self, mha: nn.MultiheadAttention, call: AttentionCall) -> None:
        super().__init__()
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight[:e], mha.in_proj_weight[e : 2 * e], mha.in_proj_weight[2 * e :]
        else:
            weights = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            self.add_module(name, _linear(weight, bias))
        self.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        self.heads, self.head_dim, self.embed, self.batch_first = mha.num_heads, mha.head_dim, e, mha.batch_first
        self.call = call

    def _split(self, x: torch.Tensor, length: int) -> torch.Tensor:
        return x.reshape(-1, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        call = self.call
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._split(self.q_proj(query), call.q_len)
        k = self._split(self.k_proj(key), call.kv_len)
        v = self._split(self.v_proj(value), call.kv_len)
        scores = torch.matmul(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(-2, -1))
        if call.attn_mask is not None:
            if call.attn_mask_rank == 3:
                attn_mask = attn_mask.reshape(-1, self.heads, call.q_len, call.kv_len)
            scores = _masked(scores, attn_mask, call.attn_mask == "bool")
        if call.key_padding_mask is not None:
            mask = key_padding_mask.reshape(-1, 1, 1, call.kv_len)
            scores = _masked(scores, mask, call.key_padding_mask == "bool")
        weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(-1, call.q_len, self.embed)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not call.need_weights:
            return out, None
        return out, weights.mean(dim=1) if call.average_weights else weights


def _masked(scores: torch.Tensor, mask: torch.Tensor, is_bool: bool) -> torch.Tensor:
    """Scores with a mask applied as torch does: a float mask is added, boolean ``True`` (masked out) is ``-inf``."""
    return scores.masked_fill(mask, float("-inf")) if is_bool else scores + mask


#: ``MultiheadAttention.forward`` options that must be Python constants, with their defaults.
_MHA_OPTIONS = {"need_weights": True, "average_attn_weights": True, "is_causal": False}


def _attention_module(path: str, mha: nn.Module, bound: dict[str, Any]) -> nn.Module:
    options = {name: bound.get(name, default) for name, default in _MHA_OPTIONS.items()}
    for name, value in options.items():
        if isinstance(value, fx.Node):
            raise _refuse(path, mha, f"{name} given as a traced value")
    query, key = _shape(bound["query"]), _shape(bound["key"])
    attn_mask, padding = bound.get("attn_mask"), bound.get("key_padding_mask")
    for option, used in (
        ("add_bias_kv", mha.bias_k is not None),
        ("add_zero_attn", mha.add_zero_attn),
        ("is_causal without attn_mask", options["is_causal"] and attn_mask is None),
        ("training mode (attention dropout)", mha.training and mha.dropout),
        ("an unbatched (2-D) query", query is None or len(query) != 3),
    ):
        if used:
            raise _refuse(path, mha, option)
    seq_dim = 1 if mha.batch_first else 0
    call = AttentionCall(
        q_len=query[seq_dim],
        kv_len=key[seq_dim],
        need_weights=bool(options["need_weights"]),
        average_weights=bool(options["average_attn_weights"]),
        key_padding_mask=_mask_kind(padding),
        attn_mask=_mask_kind(attn_mask),
        attn_mask_rank=len(_shape(attn_mask) or ()),
    )
    return DecomposedAttention(mha, call)


def _attention_inputs(mha: nn.Module, node: fx.Node) -> list[Any]:
    return _attention_arguments(mha, _bind(mha, node))


def _attention_arguments(mha: nn.Module, bound: dict[str, Any]) -> list[Any]:
    """`DecomposedAttention.forward`'s arguments from the layer's."""
    return [bound["query"], bound["key"], bound["value"], bound.get("key_padding_mask"), bound.get("attn_mask")]


def _mask_kind(mask: Any) -> str | None:
    if mask is None:
        return None
    dtype = mask.meta["tensor_meta"].dtype if isinstance(mask, fx.Node) else mask.dtype
    return "bool" if dtype == torch.bool else "float"


# --- graph rewriting ------------------------------------------------------------


@dataclass(frozen=True)
class _Decomposition:
    """How one layer kind is decomposed: the equivalent module for a call (from the static shapes of its
    arguments, bound by name: nodes or tensors) and the values bound to that module's ``forward`` parameters,
    from a graph's call (``inputs``) or from the layer's arguments bound by name (``arguments``)."""

    module: Callable[[str, nn.Module, dict[str, Any]], nn.Module]
    inputs: Callable[[nn.Module, fx.Node], list[Any]]
    arguments: Callable[[nn.Module, dict[str, Any]], list[Any]]


_RNN = _Decomposition(_rnn_module, _rnn_inputs, _rnn_arguments)
_DECOMPOSITIONS: dict[type[nn.Module], _Decomposition] = {
    nn.LSTM: _RNN,
    nn.GRU: _RNN,
    nn.MultiheadAttention: _Decomposition(_attention_module, _attention_inputs, _attention_arguments),
}


def _bind(layer: nn.Module, node: fx.Node) -> dict[str, Any]:
    return _bind_call(layer, node.args, node.kwargs)


def _bind_call(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    signature = inspect.signature(type(layer).forward)
    return dict(signature.bind(None, *args, **kwargs).arguments)


def _shape(value: Any) -> tuple[int, ...] | None:
    """The static shape of the tensor a node stands for (from its ``tensor_meta``), None if not a tensor."""
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else value
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _getitem(graph: fx.Graph, before: fx.Node, value: fx.Node, index: int) -> fx.Node:
    with graph.inserting_before(before):
        return graph.call_function(operator.getitem, (value, index))


def _inline(gm: fx.GraphModule, node: fx.Node, path: str, module: nn.Module, inputs: list[Any]) -> Any:
    """Copy the traced graph of ``module`` before ``node`` with its placeholders bound to ``inputs``
    and its layers and attributes under ``path``; returns the copy's output structure."""
    sub = fx.Tracer().trace(module)
    graph = gm.graph
    env: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
    output: Any = None
    with graph.inserting_before(node):
        for sub_node in sub.nodes:
            if sub_node.op == "placeholder":
                env[sub_node] = next(placeholders)
            elif sub_node.op == "output":
                output = fx.map_arg(sub_node.args[0], lambda n: env[n])
            else:
                copy = graph.node_copy(sub_node, lambda n: env[n])
                if copy.op in ("call_module", "get_attr"):
                    copy.target = f"{path}.{copy.target}"
                copy.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
                env[sub_node] = copy
    return output


def _replace(node: fx.Node, structure: Any) -> None:
    """Make the users of ``node`` use ``structure`` (nested tuples of nodes), folding ``getitem``s on it."""
    for user in list(node.users):
        if user.target is operator.getitem and user.args[0] is node and isinstance(user.args[1], int):
            part = structure[user.args[1]]
            if isinstance(part, fx.Node):
                user.replace_all_uses_with(part)
            else:
                _replace(user, part)
            user.graph.erase_node(user)
        else:
            user.args = fx.map_arg(user.args, lambda n: structure if n is node else n)
            user.kwargs = fx.map_arg(user.kwargs, lambda n: structure if n is node else n)


def output_structure(layer: nn.Module, call: Any) -> Any:
    """The result of a traced call of a decomposable layer as the tuple it returns: ``(out, (h_n, c_n))`` for
    an LSTM, ``(out, h_n)`` for a GRU, ``(out, weights)`` for attention, each item a ``getitem`` of the call."""
    if isinstance(layer, nn.LSTM):
        return call[0], (call[1][0], call[1][1])
    return call[0], call[1]


def decomposable(layer: nn.Module) -> bool:
    """True for a layer `decompose` rewrites: exactly one of the classes above, with the stock forward, no hooks."""
    return type(layer) in _DECOMPOSITIONS and not (layer._forward_hooks or layer._forward_pre_hooks)


def decompose(gm: fx.GraphModule, keep: Callable[[nn.Module, str], bool] = lambda layer, path: False) -> int:
    """Replace every call of a decomposable layer in ``gm`` (shape-propagated) by its decomposition,
    except layers for which ``keep(layer, path)`` is true.

    Returns the number of calls replaced; the caller re-propagates shapes.
    """
    # Every equivalent module is built first, while each call's inputs still carry their shapes.
    calls = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            path, layer = str(node.target), gm.get_submodule(str(node.target))
            if decomposable(layer) and not keep(layer, path):
                module = _DECOMPOSITIONS[type(layer)].module(path, layer, _bind(layer, node))
                calls.append((node, path, layer, module))
    for node, path, layer, module in calls:
        structure = _inline(gm, node, path, module, _DECOMPOSITIONS[type(layer)].inputs(layer, node))
        _replace(node, structure)
        gm.graph.erase_node(node)
        _set_submodule(gm, path, module)
    if calls:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        logger.info("decomposed %d recurrent/attention layer call(s) into linears", len(calls))
    return len(calls)


@contextlib.contextmanager
def decomposed_for_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[int]:
    """Within the block, every decomposable layer of ``model`` that its forward calls is replaced by its
    decomposition, so that torch.export traces linears and primitive ops; the layers are put back on exit.

    torch.export sees calls, not ``call_module`` nodes, so each layer's decomposition is built beforehand from
    the arguments of its call in one eager run of ``model`` on the example inputs. Yields the number replaced.
    """
    layers = {path: layer for path, layer in model.named_modules() if path and decomposable(layer)}
    modules = {}
    for path, bound in _recorded_calls(model, layers, args, kwargs):
        module = _DECOMPOSITIONS[type(layers[path])].module(path, layers[path], bound)
        module.forward = _called_as(layers[path], module)  # the instance's forward takes the layer's arguments
        modules[path] = module
    try:
        for path, module in modules.items():
            _set_submodule(model, path, module)
        if modules:
            logger.info("decomposed %d recurrent/attention layer(s) into linears before torch.export", len(modules))
        yield len(modules)
    finally:
        for path in modules:
            _set_submodule(model, path, layers[path])


def _recorded_calls(
    model: nn.Module, layers: dict[str, nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """Per layer of ``layers`` that ``model(*args, **kwargs)`` calls, its arguments bound by name; a layer called
    twice with arguments of other shapes or options raises `UnsupportedOptionError`."""
    if not layers:
        return []
    calls: dict[str, dict[str, Any]] = {}

    def record(path: str, layer: nn.Module, call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> None:
        bound = _bind_call(layer, call_args, call_kwargs)
        if path in calls and _signature(calls[path]) != _signature(bound):
            raise UnsupportedOptionError(
                f"module {path!r} ({type(layer).__name__}): calls with inputs of different shapes or options are "
                "not decomposed under tracer='export'; use tracer='fx', which decomposes each call"
            )
        calls[path] = bound

    handles = [
        layer.register_forward_pre_hook(lambda layer, a, k, path=path: record(path, layer, a, k), with_kwargs=True)
        for path, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return list(calls.items())


def _called_as(layer: nn.Module, module: nn.Module) -> Callable[..., Any]:
    """``module``'s forward taking ``layer``'s arguments."""
    arguments = _DECOMPOSITIONS[type(layer)].arguments

    def forward(*args: Any, **kwargs: Any) -> Any:
        return type(module).forward(module, *arguments(layer, _bind_call(layer, args, kwargs)))

    return forward


def _signature(bound: dict[str, Any]) -> Any:
    """What a decomposition depends on in a call: tensor shapes and dtypes, and every other value."""
    return tree_map(lambda v: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v, bound)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    parent = root.get_submodule(owner) if owner else root
    setattr(parent, name, module)


__all__ = [
    "AttentionCall",
    "DecomposedAttention",
    "UnrolledRNN",
    "UnsupportedOptionError",
    "decomposable",
    "decompose",
    "decomposed_for_export",
    "output_structure",
]
