"""Graph rewrite shared by weight-quantization passes: ``nn.Linear`` → ``lowbit.linear_packed``.

A pass computes a `QuantizedWeight` for a layer and calls `replace_linear`, which swaps
the ``nn.Linear`` submodule for a buffer-only `PackedLinear` (so the packed weight,
scales and zeros are buffers of the GraphModule) and replaces each ``call_module`` of
that layer with ``get_attr`` nodes feeding a ``call_function`` of the custom op.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.ir import ops, packing
from lowbit.ir.annotations import QuantScheme, annotate
from lowbit.passes.quant.grid import QuantizedWeight
from lowbit.passes.selection import matches

log = logging.getLogger(__name__)

#: Buffers of a `PackedLinear`, in the order the op takes them after the input.
PACKED_BUFFERS: tuple[str, ...] = ("qweight", "scales", "zeros", "g_idx", "bias")


class PackedLinear(nn.Module):
    """A linear layer stored in the packed format; ``forward`` calls ``lowbit.linear_packed``.

    It holds only buffers (``qweight``, ``scales`` and, when present, ``zeros``, ``g_idx``
    and ``bias``); the GraphModule reads them through ``get_attr`` nodes, and the module
    also works standalone.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        g_idx: torch.Tensor | None,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        in_features: int,
    ) -> None:
        super().__init__()
        packing.check_layout(qweight, scales, zeros, g_idx, bits, group_size, in_features)
        if g_idx is not None:
            packing.check_g_idx_range(g_idx, in_features, group_size)
        if bias is not None and tuple(bias.shape) != (qweight.shape[0],):
            raise packing.PackedFormatError(
                f"bias of shape {tuple(bias.shape)} does not match {qweight.shape[0]} outputs"
            )
        for name, tensor in zip(PACKED_BUFFERS, (qweight, scales, zeros, g_idx, bias)):
            self.register_buffer(name, tensor)
        self.bits = bits
        self.group_size = group_size
        self.in_features = in_features
        self.out_features = qweight.shape[0]

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None) -> PackedLinear:
        """Pack ``qw`` (and keep a detached copy of ``bias``)."""
        return cls(
            qw.pack(),
            qw.scales,
            qw.zeros,
            qw.g_idx,
            None if bias is None else bias.detach().clone(),
            qw.bits,
            qw.group_size,
            qw.in_features,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_packed(
            x,
            self.qweight,
            self.scales,
            self.zeros,
            self.g_idx,
            self.bias,
            self.bits,
            self.group_size,
            self.in_features,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, zeros={self.zeros is not None}, act_order={self.g_idx is not None}, "
            f"bias={self.bias is not None}"
        )


def linear_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, str, nn.Linear]]:
    """Every ``call_module`` node whose target is an ``nn.Linear``, with its module path."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Linear):
                yield node, node.target, module


def unsupported_reason(gm: fx.GraphModule, path: str) -> str | None:
    """Why the ``nn.Linear`` at ``path`` cannot be replaced by a packed one, or None if it can."""
    linear = gm.get_submodule(path)
    if type(linear).forward is not nn.Linear.forward:
        return f"{type(linear).__name__} overrides nn.Linear.forward, so its computation is not a plain linear"
    weight = linear.weight
    if weight.device.type == "meta":
        return "weight is on the meta device (no data to quantize)"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    readers = [n.name for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith(path + ".")]
    if readers:
        return f"its parameters are also read outside the layer call (nodes {', '.join(readers)})"
    odd_calls = [n.name for n in _call_sites(gm, path) if _linear_input(n) is None]
    if odd_calls:
        return f"it is called with arguments other than one input (nodes {', '.join(odd_calls)})"
    return None


def replace_linear(
    gm: fx.GraphModule, node: fx.Node, qw: QuantizedWeight, scheme: QuantScheme, recompile: bool = True
) -> fx.Node:
    """Replace the ``nn.Linear`` called by ``node`` with its packed form; return the new op node.

    Every call site of the same layer is rewritten (they all share the swapped
    submodule). The new node keeps the replaced node's meta (``tensor_meta`` etc.) and
    gets ``quant=scheme`` added to its lowbit annotation. The graph is recompiled unless
    ``recompile`` is False: a pass replacing many layers of a large graph recompiles once
    at the end instead (until then the old code still calls the swapped-in module, whose
    forward is the same op).
    """
    path = _linear_target(gm, node)
    linear = gm.get_submodule(path)
    reason = unsupported_reason(gm, path)
    if reason is not None:
        raise LowbitError(f"layer '{path}' cannot be replaced by a packed linear: {reason}")
    if (qw.out_features, qw.in_features) != tuple(linear.weight.shape):
        raise LowbitError(
            f"layer '{path}': quantized weight is {qw.out_features}x{qw.in_features}, "
            f"the layer's weight is {tuple(linear.weight.shape)}"
        )
    gm.set_submodule(path, PackedLinear.from_quantized(qw, linear.bias).to(linear.weight.device))
    call_sites = _call_sites(gm, path)
    new_nodes = [_rewrite_call(gm, site, path, scheme) for site in call_sites]
    if recompile:
        gm.graph.lint()
        gm.recompile()
    log.debug("replaced %s with a packed %s linear (%d call site(s))", path, scheme.describe(), len(call_sites))
    return new_nodes[call_sites.index(node)]


def _linear_target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op != "call_module":
        raise LowbitError(f"node '{node.name}' is a {node.op} node, not a call_module of an nn.Linear")
    module = gm.get_submodule(node.target)
    if not isinstance(module, nn.Linear):
        raise LowbitError(f"node '{node.name}' calls {type(module).__name__} '{node.target}', not an nn.Linear")
    return node.target


def _rewrite_call(gm: fx.GraphModule, node: fx.Node, path: str, scheme: QuantScheme) -> fx.Node:
    """Swap one ``call_module`` node for ``get_attr`` nodes feeding ``lowbit.linear_packed``."""
    packed = gm.get_submodule(path)
    x = _linear_input(node)
    with gm.graph.inserting_before(node):
        buffers = [
            None if getattr(packed, name) is None else gm.graph.get_attr(f"{path}.{name}") for name in PACKED_BUFFERS
        ]
        new_node = gm.graph.create_node(
            "call_function",
            ops.linear_packed,
            (x, *buffers, packed.bits, packed.group_size, packed.in_features),
            name=f"{node.name}_packed",
        )
    new_node.meta = copy.copy(node.meta)
    annotate(new_node, layer=path, quant=scheme)
    node.replace_all_uses_with(new_node)
    gm.graph.erase_node(node)
    return new_node


def _call_sites(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]


def _linear_input(node: fx.Node) -> fx.Node | None:
    """The input of an ``nn.Linear`` call, or None if the call does not pass exactly one."""
    if len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if not node.args and set(node.kwargs) == {"input"}:
        return node.kwargs["input"]
    return None


__all__ = ["PACKED_BUFFERS", "PackedLinear", "linear_nodes", "replace_linear", "unsupported_reason"]


def skip_reason(gm: fx.GraphModule, path: str, ignore: tuple[str, ...]) -> str | None:
    """Why a quantizer leaves the Linear at ``path`` alone: an ``ignore`` pattern, or `unsupported_reason`."""
    for pattern in ignore:
        if matches(path, pattern):
            return f"ignored (matches '{pattern}')"
    return unsupported_reason(gm, path)
