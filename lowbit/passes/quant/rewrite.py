"""Graph rewrite shared by weight-quantization passes: ``nn.Linear`` → ``lowbit.linear_packed`` and
``nn.Conv1d``/``nn.Conv2d`` → ``lowbit.conv_packed``.

A pass computes a `QuantizedWeight` for a layer's weight matrix (`weight_matrix`: a convolution's
weight flattened to ``(C_out, C_in/groups · prod(kernel))``) and calls `replace_layer`, which swaps the
submodule for a buffer-only `PackedLinear` or `PackedConv` (so the packed weight, scales and zeros are
buffers of the GraphModule) and replaces each ``call_module`` of that layer with ``get_attr`` nodes
feeding a ``call_function`` of the custom op. Convolutions the op cannot compute (3-D, transposed,
non-zero padding modes) are listed by `layer_nodes` too, so passes report why they stay in floating point.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.ir import ops, ops_conv, packing
from lowbit.ir.annotations import QuantScheme, annotate
from lowbit.passes.quant.grid import QuantizedWeight
from lowbit.passes.selection import matches

log = logging.getLogger(__name__)

#: Buffers of a `PackedLinear`, in the order the op takes them after the input.
PACKED_BUFFERS: tuple[str, ...] = ("qweight", "scales", "zeros", "g_idx", "bias")
#: The convolutions ``lowbit.conv_packed`` computes.
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)


class PackedLinear(nn.Module):
    """A linear layer stored in the packed format; ``forward`` calls ``lowbit.linear_packed``.

    It holds only buffers (``qweight``, ``scales`` and, when present, ``zeros``, ``g_idx``
    and ``bias``); the GraphModule reads them through ``get_attr`` nodes, and the module
    also works standalone.
    """

    #: The layer's kind for positional override keys (`lowbit.passes.selection`).
    layer_kind = "linear"

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

    def packed_args(self) -> tuple:
        """The op's arguments after the input, in its order: the `PACKED_BUFFERS` (each a tensor or None), then
        ``bits, group_size, in_features`` (and a convolution's geometry, `PackedConv`)."""
        return (*(getattr(self, name) for name in PACKED_BUFFERS), self.bits, self.group_size, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_packed(x, *self.packed_args())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, zeros={self.zeros is not None}, act_order={self.g_idx is not None}, "
            f"bias={self.bias is not None}"
        )


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's shape arguments, one entry per spatial dimension (1 or 2)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @classmethod
    def of(cls, conv: nn.Conv1d | nn.Conv2d) -> ConvGeometry:
        """The geometry of a supported convolution (`conv_reason` is None), string paddings made explicit."""
        padding = conv.padding
        if isinstance(padding, str):
            padding = tuple(
                0 if conv.padding == "valid" else d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation)
            )
        return cls(tuple(conv.kernel_size), tuple(conv.stride), tuple(padding), tuple(conv.dilation), conv.groups)

    def args(self) -> tuple[list[int], list[int], list[int], list[int], int]:
        """The op's geometry arguments."""
        return list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation), self.groups


class PackedConv(PackedLinear):
    """A 1-D or 2-D convolution whose weight matrix is stored as a `PackedLinear`'s; ``forward`` calls
    ``lowbit.conv_packed``."""

    layer_kind = "conv"

    def __init__(self, packed: PackedLinear, geometry: ConvGeometry) -> None:
        super().__init__(*PackedLinear.packed_args(packed))
        self.geometry = geometry

    def packed_args(self) -> tuple:
        return (*super().packed_args(), *self.geometry.args())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops_conv.conv_packed(x, *self.packed_args())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.geometry}"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """A linear's weight, or a convolution's as the matrix ``(C_out, C_in/groups · prod(kernel))`` (detached)."""
    return module.weight.detach().flatten(1)


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution of any kind (supported or not)."""
    return isinstance(module, nn.modules.conv._ConvNd)


def layer_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, str, nn.Module]]:
    """Every ``call_module`` node of an ``nn.Linear`` or a convolution (any kind), with its module path."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Linear) or is_conv(module):
                yield node, node.target, module


def linear_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, str, nn.Linear]]:
    """Every ``call_module`` node whose target is an ``nn.Linear``, with its module path."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Linear):
                yield node, node.target, module


def conv_reason(conv: nn.Module) -> str | None:
    """Why the convolution ``conv`` has no packed form, or None if ``lowbit.conv_packed`` computes it."""
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return f"{type(conv).__name__} is a transposed convolution, which has no packed form (it stays fp32)"
    base = next((t for t in CONV_TYPES if isinstance(conv, t)), None)
    if base is None:
        return f"{type(conv).__name__} has no packed form: only Conv1d and Conv2d are packed (it stays fp32)"
    if type(conv).forward is not base.forward:
        return f"{type(conv).__name__} overrides {base.__name__}.forward, so its computation is not a plain convolution"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: the packed convolution pads with zeros only"
    if conv.padding == "same" and any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
        return "padding='same' with an even receptive field pads unevenly, which the packed convolution does not"
    return None


def unsupported_reason(gm: fx.GraphModule, path: str) -> str | None:
    """Why the ``nn.Linear`` or convolution at ``path`` cannot be replaced by a packed one, or None if it can."""
    layer = gm.get_submodule(path)
    if is_conv(layer):
        reason = conv_reason(layer)
        if reason is not None:
            return reason
    elif type(layer).forward is not nn.Linear.forward:
        return f"{type(layer).__name__} overrides nn.Linear.forward, so its computation is not a plain linear"
    weight = layer.weight
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


def replace_layer(
    gm: fx.GraphModule, node: fx.Node, qw: QuantizedWeight, scheme: QuantScheme, recompile: bool = True
) -> fx.Node:
    """`replace_linear` for a linear, `replace_conv` for a convolution."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    replace = replace_conv if module is not None and is_conv(module) else replace_linear
    return replace(gm, node, qw, scheme, recompile)


def replace_conv(
    gm: fx.GraphModule, node: fx.Node, qw: QuantizedWeight, scheme: QuantScheme, recompile: bool = True
) -> fx.Node:
    """Replace the convolution called by ``node`` with a `PackedConv` whose weight matrix is ``qw``; every call
    site becomes a ``lowbit.conv_packed`` call (as `replace_linear` does for linears)."""
    path = str(node.target)
    conv = gm.get_submodule(path)
    reason = unsupported_reason(gm, path)
    if reason is not None:
        raise LowbitError(f"layer '{path}' cannot be replaced by a packed convolution: {reason}")
    if (qw.out_features, qw.in_features) != tuple(weight_matrix(conv).shape):
        raise LowbitError(
            f"layer '{path}': quantized weight is {qw.out_features}x{qw.in_features}, "
            f"the convolution's weight matrix is {tuple(weight_matrix(conv).shape)}"
        )
    packed = PackedConv(PackedLinear.from_quantized(qw, conv.bias), ConvGeometry.of(conv))
    gm.set_submodule(path, packed.to(conv.weight.device))
    call_sites = _call_sites(gm, path)
    new_nodes = [_rewrite_call(gm, site, path, scheme) for site in call_sites]
    if recompile:
        gm.graph.lint()
        gm.recompile()
    log.debug("replaced %s with a packed %s convolution (%d call site(s))", path, scheme.describe(), len(call_sites))
    return new_nodes[call_sites.index(node)]


def _linear_target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op != "call_module":
        raise LowbitError(f"node '{node.name}' is a {node.op} node, not a call_module of an nn.Linear")
    module = gm.get_submodule(node.target)
    if not isinstance(module, nn.Linear):
        raise LowbitError(f"node '{node.name}' calls {type(module).__name__} '{node.target}', not an nn.Linear")
    return node.target


def _rewrite_call(gm: fx.GraphModule, node: fx.Node, path: str, scheme: QuantScheme) -> fx.Node:
    """Swap one ``call_module`` node for ``get_attr`` nodes feeding ``lowbit.linear_packed`` (or ``conv_packed``)."""
    packed = gm.get_submodule(path)
    x = _linear_input(node)
    args = packed.packed_args()
    with gm.graph.inserting_before(node):
        buffers = [
            None if tensor is None else gm.graph.get_attr(f"{path}.{name}")
            for name, tensor in zip(PACKED_BUFFERS, args)
        ]
        new_node = gm.graph.create_node(
            "call_function",
            ops_conv.conv_packed if isinstance(packed, PackedConv) else ops.linear_packed,
            (x, *buffers, *args[len(PACKED_BUFFERS) :]),
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


__all__ = [
    "CONV_TYPES",
    "PACKED_BUFFERS",
    "ConvGeometry",
    "PackedConv",
    "PackedLinear",
    "conv_reason",
    "is_conv",
    "layer_nodes",
    "linear_nodes",
    "replace_conv",
    "replace_layer",
    "replace_linear",
    "skip_reason",
    "unsupported_reason",
    "weight_matrix",
]


def skip_reason(gm: fx.GraphModule, path: str, ignore: tuple[str, ...]) -> str | None:
    """Why a quantizer leaves the layer at ``path`` alone: an ``ignore`` pattern, or `unsupported_reason`."""
    for pattern in ignore:
        if matches(path, pattern):
            return f"ignored (matches '{pattern}')"
    return unsupported_reason(gm, path)
