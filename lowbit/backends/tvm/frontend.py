"""Graph import: a lowbit GraphModule → a Relax IRModule through TVM's torch frontend.

`GraphImporter` is TVM's FX importer extended with the ATen overloads that graphs traced by torch.export keep, and
a few conversions the frontend lacks or gets wrong (attention written out as matmuls and softmax, ``diff``, integer
``cumsum``, ``to.device``, ``new_ones`` with a dtype, ``masked_fill``, integer indexing, ``F.layer_norm`` with keyword
arguments, ``torch._assert`` on static shapes, patch-embedding convolutions as matmuls). The lowbit linears are
converted by the caller's ``custom_convert_map`` (`convert`); fp32 linears whose weight is a graph constant go to the
toolchain's hook (`ConstantLinear`). A layer type the frontend has no converter for is named in the error, with the
fix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import tvm
from torch import fx
from torch.fx.operator_schemas import normalize_function
from tvm import relax, sym
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
from tvm.relax.frontend.torch.fx_translator import TorchFXImporter

from lowbit.backends.tvm.kernels.generic import rows as rows_module
from lowbit.errors import BackendError
from lowbit.ir.shapes import SYMBOLIC_DIMS, SymbolicDim

log = logging.getLogger(__name__)

#: ``hook(bb, x, weight, bias)``: a Relax expression for ``x · weightᵀ + bias`` (fp32 constants), or None to keep
#: Relax's own ``linear``.
ConstantLinear = Callable[[relax.BlockBuilder, relax.Expr, torch.Tensor, "torch.Tensor | None"], "relax.Expr | None"]

_STRIDED_SLICE = tvm.ir.Op.get("relax.strided_slice")
_PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")


def _unit_last(mask: relax.Expr) -> bool:
    """Whether an additive mask broadcasts over the keys (its last dimension is 1)."""
    last = mask.ty.shape[-1]
    return isinstance(last, tvm.tirx.IntImm) and int(last) == 1


#: ``F.max_pool2d``'s options after the stride, with their defaults.
PAD_DILATE_CEIL = (("padding", 0), ("dilation", 1), ("ceil_mode", False))


@dataclass(frozen=True)
class InputSpec:
    """One graph input: placeholder name, shape (a size, or the name of a symbolic dimension,
    `lowbit.ir.shapes.SymbolicDim`) and torch dtype name (``"float32"``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


def input_specs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> list[InputSpec]:
    """The graph's inputs: the leading ones shaped like ``example_inputs``, the rest from placeholder metadata.

    Graphs traced from keyword inputs (torch.export) record each placeholder's example
    value in ``node.meta["val"]``; `lowbit.compile` hands the backend only the
    positional example inputs.
    """
    inputs = list(example_inputs)
    for index, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            raise BackendError(f"example input {index} is a {type(value).__name__}; the TVM backend takes tensors")
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(inputs) > len(placeholders):
        raise BackendError(f"{len(inputs)} example inputs for a graph with {len(placeholders)} inputs")
    symbols = gm.meta.get(SYMBOLIC_DIMS, {})
    specs = []
    for index, node in enumerate(placeholders):
        value = node.meta.get("val") if symbols or index >= len(inputs) else inputs[index]
        if not isinstance(value, torch.Tensor):
            raise BackendError(f"graph input '{node.target}' has no example tensor; pass it in example_inputs")
        shape = tuple(symbols[str(d)].name if str(d) in symbols else int(d) for d in value.shape)
        specs.append(InputSpec(str(node.target), shape, str(value.dtype).removeprefix("torch.")))
    return specs


def symbolic_dims(gm: fx.GraphModule) -> dict[str, SymbolicDim]:
    """The symbolic dimensions of ``gm``'s inputs by name (none for a graph of static shapes)."""
    return {dim.name: dim for dim in gm.meta.get(SYMBOLIC_DIMS, {}).values()}


def relax_shape(shape: Sequence[int | str], variables: dict[str, tvm.tirx.Var]) -> tuple[Any, ...]:
    """An `InputSpec` shape for Relax: a symbolic dimension as one int64 TIR variable per name (``variables``)."""
    return tuple(variables.setdefault(d, tvm.tirx.Var(d, "int64")) if isinstance(d, str) else d for d in shape)


def import_graph(
    gm: fx.GraphModule,
    inputs: Sequence[InputSpec],
    convert: Mapping[str, Any],
    constant_linear: ConstantLinear | None = None,
) -> tvm.IRModule:
    """``gm`` as a Relax module for ``inputs``, with ``convert`` as extra converters (by operator name).

    Raises `BackendError` where the frontend cannot import an operator, naming the layers it does not know.
    """
    variables: dict[str, tvm.tirx.Var] = {}
    shapes = [(relax_shape(spec.shape, variables), spec.dtype) for spec in inputs]
    dims = symbolic_dims(gm)
    importer = GraphImporter(constant_linear, {variables[name]: (dim.low, dim.high) for name, dim in dims.items()})
    _check_modules(gm, importer.create_convert_map())
    try:
        mod = importer.from_fx(
            gm,
            shapes,
            keep_params_as_input=False,
            unwrap_unit_return_tuple=True,
            no_bind_return_tuple=False,
            custom_convert_map=dict(convert),
        )
    except (AssertionError, KeyError, NotImplementedError) as error:  # how the frontend reports unsupported ops
        where = "; ".join(_describe(node) for node in _failing_nodes(gm, importer))
        raise BackendError(
            f"TVM's torch frontend cannot import this graph: {error}"
            + (f"\n  at {where}\n  fix: compile with target='torch'" if where else "")
        ) from error
    if not dims:
        return mod
    # Relax's memory planner sizes the buffers of a symbolic shape by these bounds: planned once, reused every call.
    bounds = {name: dim.high for name, dim in dims.items()}
    mod["main"] = mod["main"].with_attrs({"tir_var_upper_bound": bounds, "tir_non_negative_var": list(bounds)})
    return mod


def _failing_nodes(gm: fx.GraphModule, importer: GraphImporter) -> list[fx.Node]:
    """The nodes the import stopped at: those with no converter, else the first one left unconverted."""
    known = getattr(importer, "convert_map", {})
    calls = [node for node in gm.graph.nodes if node.op == "call_function"]
    missing = [node for node in calls if getattr(node.target, "__name__", None) not in known]
    if missing or not importer.env:
        return missing
    stopped = next((node for node in gm.graph.nodes if node not in importer.env and node.op != "output"), None)
    return [stopped] if stopped is not None else []


def _describe(node: fx.Node) -> str:
    """``node 'lstm' (aten.lstm.input) of module 'rnn' (torch.nn.modules.rnn.LSTM)``, as far as it is known."""
    text = f"node '{node.name}' ({node.target})"
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, kind = list(stack.values())[-1]
        name = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        text += f" of module '{path}' ({name})"
    return text


def _check_modules(gm: fx.GraphModule, convert_map: Mapping[Any, Any]) -> None:
    """`BackendError` naming every ``call_module`` layer whose type the frontend has no converter for."""
    unknown = {
        str(node.target): type(gm.get_submodule(str(node.target)))
        for node in gm.graph.nodes
        if node.op == "call_module" and type(gm.get_submodule(str(node.target))) not in convert_map
    }
    if unknown:
        layers = ", ".join(f"{path!r} ({kind.__module__}.{kind.__qualname__})" for path, kind in unknown.items())
        raise BackendError(
            f"TVM's torch frontend cannot import the layer(s) {layers}: the module type has no converter; "
            "trace without leaf_modules= naming them (so they are traced into primitive ops), "
            "or compile with target='torch'"
        )


#: Attention pads its keys to a multiple of this (a vector of AVX-512 float32 lanes).
KEY_MULTIPLE = 16
#: ``F.conv2d``'s arguments in order.
#: Modules that pad with a constant (``padding`` in ``F.pad`` order, ``value``), imported as ``F.pad``.
_CONSTANT_PADS = (
    torch.nn.ZeroPad1d,
    torch.nn.ZeroPad2d,
    torch.nn.ZeroPad3d,
    torch.nn.ConstantPad1d,
    torch.nn.ConstantPad2d,
    torch.nn.ConstantPad3d,
)
_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
#: ``F.conv2d``'s window arguments and their defaults.
_CONV_DEFAULTS = (("stride", 1), ("padding", 0), ("dilation", 1))


def _pair(value: Any) -> Any:
    return (value, value) if isinstance(value, int) else value if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class _Window:
    """A 2-D convolution's stride, padding, dilation and groups."""

    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int

    def tiles(self, x: Sequence[int | None], weight: Sequence[int | None]) -> bool:
        """Whether the windows tile an input of shape ``x`` exactly (stride = kernel, no padding or dilation) with
        a kernel larger than 1x1 (a 1x1 convolution stays one: the CPU runs it channels-last, as a GEMM)."""
        if len(x) != 4 or len(weight) != 4 or None in x or None in weight:
            return False
        kernel = tuple(weight[2:])
        if kernel == (1, 1):
            return False
        unpadded = self.padding == "valid" or (not isinstance(self.padding, str) and not any(self.padding))
        return (
            self.stride == kernel
            and unpadded
            and self.dilation == (1, 1)
            and self.groups == 1
            and x[2] % kernel[0] == 0
            and x[3] % kernel[1] == 0
        )


class GraphImporter(TorchFXImporter, ExportedProgramImporter):
    """TVM's FX importer that also knows the ATen overloads (``add.Tensor``, ``view.default``, ...).

    Graphs traced through torch.export keep ATen calls next to ``call_module`` layers;
    `from_fx` alone knows only torch functions and modules, `from_exported_program` only
    ATen. The two importers share their base class and per-node conventions, so the ATen
    table of the latter is merged under the FX table (FX names win where both exist).

    With ``constant_linear``, an fp32 linear layer whose weight (and bias) is a graph constant
    and whose input has a static shape goes to that hook first (the CPU toolchain runs it on
    the dense kernel, its weight laid out at compile time, instead of Relax's ``linear``: a
    matmul with the transposed weight, read with strides).
    """

    def __init__(
        self,
        constant_linear: ConstantLinear | None = None,
        bounds: Mapping[tvm.tirx.Var, tuple[int, int]] | None = None,
    ) -> None:
        self.bounded = bool(bounds)  # before the base class reads the convert map
        super().__init__()
        self.constant_linear = constant_linear
        self.padded_masks: dict[fx.Node, relax.Expr] = {}  # an attention mask over symbolic keys, for every layer
        self.analyzer = sym.Analyzer()
        for var, (low, high) in (bounds or {}).items():
            self.analyzer.bind(var, tvm.ir.Range(low, high + 1))

    def _within_bounds(self, convert: Callable[..., Any]) -> Callable[..., Any]:
        """``convert`` whose slices are known in bounds under the symbolic dimensions' ranges: slicing a 64-row
        table to ``seq`` rows gives ``min(seq, 64)`` rows, which is ``seq`` when ``seq <= 64`` (an unsimplified
        shape leaves the ops after it without a shape, which Relax cannot legalize)."""

        def converted(node: fx.Node, *args: Any) -> Any:
            value = convert(node, *args)
            call = self.block_builder.lookup_binding(value) if isinstance(value, relax.Var) else None
            if not isinstance(call, relax.Call) or call.op != _STRIDED_SLICE or call.attrs.assume_inbound:
                return value
            inbound = self.block_builder.normalize(relax.op.strided_slice(*call.args, assume_inbound=True))
            proven = [self.analyzer.simplify(d) for d in value.ty.shape]
            if all(self.analyzer.can_prove_equal(a, b) for a, b in zip(proven, inbound.ty.shape)):
                return self.block_builder.emit(inbound)
            return value

        return converted

    def _linear_module(self, node: fx.Node) -> relax.Expr:
        module = self.named_modules[node.target]
        dense = self._dense_linear(
            node.name, self.env[node.args[0]], self.params[module.weight], self.params.get(module.bias)
        )
        return dense if dense is not None else super()._linear_module(node)

    def _linear(self, node: fx.Node) -> relax.Expr:
        args = self.retrieve_args(node)
        dense = self._dense_linear(node.name, args[0], args[1], args[2] if len(args) > 2 else None)
        return dense if dense is not None else super()._linear(node)

    def _conv2d_module(self, node: fx.Node) -> relax.Expr:
        conv = self.named_modules[node.target]
        bias = self.params[conv.bias] if conv.bias is not None else None
        window = _Window(tuple(conv.stride), conv.padding, tuple(conv.dilation), conv.groups)
        patches = self._patch_conv(node.name, self.env[node.args[0]], self.params[conv.weight], bias, window)
        return patches if patches is not None else super()._conv2d_module(node)

    def _constant_pad_module(self, node: fx.Node) -> relax.Expr:
        """``nn.ZeroPad2d`` and the other constant-padding modules as the ``F.pad`` call they make."""
        module = self.named_modules[node.target]
        call = SimpleNamespace(args=(node.args[0], tuple(module.padding), "constant", float(module.value)), kwargs={})
        return self._pad(call)

    def _conv2d_call(self, node: fx.Node) -> relax.Expr:
        call = {**dict(zip(_CONV_ARGUMENTS, node.args)), **node.kwargs}  # two schemas: torch cannot normalize it
        bias = self.env[call["bias"]] if call.get("bias") is not None else None
        window = _Window(*(_pair(call.get(name, default)) for name, default in _CONV_DEFAULTS), call.get("groups", 1))
        patches = self._patch_conv(node.name, self.env[call["input"]], self.env[call["weight"]], bias, window)
        return patches if patches is not None else self._conv2d(node)

    def _patch_conv(
        self, name: str, x: relax.Expr, weight: relax.Expr, bias: relax.Expr | None, window: _Window
    ) -> relax.Expr | None:
        """A convolution whose stride is its kernel, without padding (a ViT's patch embedding) as one matmul.

        Its windows tile the image: ``x (N, C, H, W)`` is cut into ``N·Hₒ·Wₒ`` patch rows of ``C·kh·kw``
        values (reshape and transpose), multiplied by the weight as a linear layer (the constant-weight hook when
        there is one), and the result is laid out back as ``(N, O, Hₒ, Wₒ)``. None for any other convolution.
        """
        shapes = [[int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in t.ty.shape] for t in (x, weight)]
        if not window.tiles(*shapes):
            return None
        (n, c, h, w), (out, _, kh, kw) = shapes
        bb = self.block_builder
        rows = (n, h // kh, w // kw)
        x = bb.emit(relax.op.reshape(x, (n, c, rows[1], kh, rows[2], kw)))
        x = bb.emit(relax.op.permute_dims(x, [0, 2, 4, 1, 3, 5]))
        x = bb.emit(relax.op.reshape(x, (math.prod(rows), c * kh * kw)))
        if isinstance(weight, tvm.ir.expr.Constant):
            weight = relax.const(weight.value.numpy().reshape(out, c * kh * kw))
        else:
            weight = bb.emit(relax.op.reshape(weight, (out, c * kh * kw)))
        y = self._dense_linear(name, x, weight, bias)
        if y is None:
            y = bb.emit(relax.op.linear(x, weight, bias))
        y = bb.emit(relax.op.reshape(y, (*rows, out)))
        return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))

    def _dense_linear(self, name: str, x: relax.Expr, weight: relax.Expr, bias: relax.Expr | None) -> relax.Expr | None:
        """The hook's expression for ``x · weightᵀ + bias``, or None unless every operand allows it."""
        operands = [weight] + ([bias] if bias is not None else [])
        if self.constant_linear is None or not all(
            isinstance(t, tvm.ir.expr.Constant) and t.value.dtype == "float32" for t in operands
        ):
            return None
        if (
            x.ty.dtype != "float32"
            or len(weight.value.shape) != 2
            or not all(isinstance(d, tvm.tirx.IntImm) for d in x.ty.shape)
        ):
            return None
        as_torch = [torch.from_numpy(t.value.numpy()) for t in operands]
        log.debug("node '%s': fp32 linear %dx%d with a constant weight", name, *as_torch[0].shape[::-1])
        return self.constant_linear(self.block_builder, x, as_torch[0], as_torch[1] if bias is not None else None)

    def create_convert_map(self) -> dict[Any, Any]:
        converters = self._convert_map()
        if not self.bounded:
            return converters
        return {name: self._within_bounds(convert) for name, convert in converters.items()}

    def _convert_map(self) -> dict[Any, Any]:
        aten = ExportedProgramImporter.create_convert_map(self)
        return {
            **aten,
            "to.device": self._to_device,
            "new_ones.default": self._new_ones_typed,
            "scaled_dot_product_attention.default": self._attention,
            "diff.default": self._diff,
            "cumsum.default": self._cumsum_promoted,
            **TorchFXImporter.create_convert_map(self),
            "masked_fill": self._masked_fill_where,
            "masked_fill.Scalar": self._masked_fill_where,
            "getitem": self._getitem_int,
            "_assert": self._static_assert,
            "layer_norm": self._layer_norm_call,
            "scaled_dot_product_attention": self._attention,
            "conv2d": self._conv2d_call,
            "max_pool2d": self._max_pool2d_keywords,
            **{module: self._constant_pad_module for module in _CONSTANT_PADS},
        }

    def _layer_norm_call(self, node: fx.Node) -> relax.Expr:
        """``F.layer_norm(x, shape, weight=, bias=, eps=)``: the upstream converter reads positional arguments only,
        so a call with keywords (how fx records ``nn.LayerNorm.forward``) lost its weight, bias and ``eps``."""
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        weight, bias = (self.env[call[name]] if call.get(name) is not None else None for name in ("weight", "bias"))
        eps = call.get("eps", 1e-5)
        return self._layer_norm_impl(self.env[call["input"]], weight, bias, eps, call["normalized_shape"])

    def _static_assert(self, node: fx.Node) -> None:
        """``torch._assert(condition, message)`` on shapes: checked now, since the module is compiled for the
        input shapes given; a condition on tensor values, which the compiled module could not check, is an error."""
        condition = self.env[node.args[0]] if isinstance(node.args[0], fx.Node) else node.args[0]
        if isinstance(condition, tvm.tirx.IntImm):  # a comparison of static shapes, folded by the importer
            condition = bool(condition.value)
        if not isinstance(condition, bool | int):
            raise BackendError(
                f"node '{node.name}': torch._assert on tensor values cannot be checked by the compiled module; "
                "remove it from the model or compile with target='torch'"
            )
        if not condition:
            message = node.args[1] if len(node.args) > 1 else node.kwargs.get("message", "")
            raise BackendError(f"node '{node.name}': torch._assert fails for the example input shapes: {message}")

    def _getitem_int(self, node: fx.Node) -> relax.Expr:
        """``x[i]`` on a tensor with an integer ``i``: the upstream converter returns ``x`` itself."""
        x, index = self.env.get(node.args[0]), node.args[1]
        if not (isinstance(x, relax.Expr) and isinstance(x.ty, relax.TensorType) and isinstance(index, int)):
            return self._getitem(node)
        length = int(x.ty.shape[0])
        index = index + length if index < 0 else index
        row = self.block_builder.emit(relax.op.strided_slice(x, axes=[0], begin=[index], end=[index + 1]))
        return self.block_builder.emit(relax.op.squeeze(row, axis=[0]))

    def _masked_fill_where(self, node: fx.Node) -> relax.Expr:
        """``x.masked_fill(mask, value)`` with a scalar value as ``where(mask, value, x)`` (the upstream converter
        emits a ``full_like`` that this TVM cannot legalize)."""
        x, mask, value = self.retrieve_args(node)[:3]
        if not isinstance(value, int | float):
            return self._masked_fill(node)
        return self.block_builder.emit(relax.op.where(mask, relax.const(value, x.ty.dtype), x))

    def _new_ones_typed(self, node: fx.Node) -> relax.Expr:
        """``aten.new_ones(x, size, dtype=...)``: the upstream converter ignores ``dtype``."""
        ones = self._new_ones(node)
        dtype = node.kwargs.get("dtype")
        if dtype is None:
            return ones
        return self.block_builder.emit(relax.op.astype(ones, self._convert_data_type(dtype, self.env)))

    def _attention(self, node: fx.Node) -> relax.Expr:
        """``F.scaled_dot_product_attention`` (or its ATen overload) on ``(..., L, E)`` tensors with a float or
        boolean mask.

        Written out as ``softmax(q kᵀ · scale + mask) v`` because Relax's fused attention
        takes float masks of one exact shape only and legalizes to one unscheduled loop nest
        (the batched matmuls and the softmax get the CPU schedules instead); a boolean mask
        keeps ``True`` positions and sends the others to ``-inf``, as torch does. Keys and values of
        static length are zero-padded to a multiple of `KEY_MULTIPLE` and the padded keys' scores
        sent to ``-inf`` (their weights are 0; a mask is padded likewise): the softmax rows then fill
        whole vectors (197 tokens have no power-of-two divisor).
        """
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        if call.get("dropout_p", 0.0) or call.get("is_causal", False) or call.get("enable_gqa", False):
            raise BackendError(f"node '{node.name}': attention with dropout, is_causal or enable_gqa is not lowered")
        bb = self.block_builder
        query, key, value = (self.env[call[name]] for name in ("query", "key", "value"))
        head_dim = int(query.ty.shape[-1])
        scale = call.get("scale") or 1.0 / math.sqrt(head_dim)
        dtype = query.ty.dtype
        keys = int(key.ty.shape[-2]) if isinstance(key.ty.shape[-2], tvm.tirx.IntImm) else 0
        padded = -(-keys // KEY_MULTIPLE) * KEY_MULTIPLE
        rank = len(key.ty.shape)
        if not keys and self.bounded:
            key_t, value, masks = self._pad_symbolic_keys(key, value, call.get("attn_mask"), dtype)
        else:
            mask = call.get("attn_mask")
            masks = [self._additive_mask(self.env[mask], dtype)] if mask is not None else []
            if keys > KEY_MULTIPLE and padded != keys:
                pad_width = [0, 0] * (rank - 2) + [0, padded - keys, 0, 0]
                key, value = (bb.emit(relax.op.nn.pad(t, pad_width)) for t in (key, value))
                masks = [self._pad_keys(mask, padded) for mask in masks]
                if not masks or int(masks[0].ty.shape[-1]) != padded:
                    masks.append(relax.const(np.where(np.arange(padded) < keys, 0.0, -np.inf).astype(str(dtype))))
            key_t = bb.emit(relax.op.permute_dims(key, [*range(rank - 2), rank - 1, rank - 2]))
        scores = bb.emit(relax.op.multiply(relax.op.matmul(query, key_t), relax.const(scale, dtype)))
        for mask in masks:
            scores = bb.emit(relax.op.add(scores, mask))
        return bb.emit(relax.op.matmul(bb.emit(relax.op.nn.softmax(scores, axis=-1)), value))

    def _pad_symbolic_keys(
        self, key: relax.Expr, value: relax.Expr, mask: fx.Node | None, dtype: str
    ) -> tuple[relax.Expr, relax.Expr, list[relax.Expr]]:
        """A symbolic number of keys padded to a multiple of `KEY_MULTIPLE` (`rows.pad_axis_func`), the padded keys'
        scores sent to ``-inf``: the scores and the softmax then run in whole vectors at every length. The keys come
        back transposed (``(..., E, keys)``, padded in the same copy, as is a transpose that splits the heads off
        the keys and values); the additive masks, the ``mask`` node's made and padded once for every layer that reads
        it."""
        bb, rank, keys = self.block_builder, len(key.ty.shape), key.ty.shape[-2]

        def padded(tensor: relax.Expr, axis: int, fill: float, swap: bool = False) -> relax.Expr:
            order = [*range(rank - 2), rank - 1, rank - 2] if swap else list(range(len(tensor.ty.shape)))
            binding = bb.lookup_binding(tensor)
            if isinstance(binding, relax.Call) and binding.op == _PERMUTE_DIMS and binding.attrs.axes is not None:
                # The heads' transpose before attention, taken in the same copy (it is left without a use).
                axes = [int(a) for a in binding.attrs.axes]
                tensor, order, axis = binding.args[0], [axes[k] for k in order], axes[axis]
            source = list(tensor.ty.shape)
            shape = [rows_module.padded_rows(source[k], KEY_MULTIPLE) if k == axis else source[k] for k in order]
            static = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in source]
            func = rows_module.pad_axis_func(static, axis, KEY_MULTIPLE, fill, dtype, order)
            call = relax.call_tir(bb.add_func(func, "lowbit_pad"), [tensor], out_ty=relax.TensorType(shape, dtype))
            return bb.emit(call)

        key_t, value = padded(key, rank - 2, 0.0, swap=True), padded(value, rank - 2, 0.0)
        masks = []
        if mask is not None:
            if mask not in self.padded_masks:
                additive = self._additive_mask(self.env[mask], dtype)
                last = len(additive.ty.shape) - 1
                self.padded_masks[mask] = additive if _unit_last(additive) else padded(additive, last, float("-inf"))
            masks.append(self.padded_masks[mask])
        if all(_unit_last(m) for m in masks):  # no mask covers the keys: one for the padding
            func = bb.add_func(rows_module.key_mask_func(KEY_MULTIPLE, dtype), "lowbit_key_mask")
            shape = (rows_module.padded_rows(keys, KEY_MULTIPLE),)
            masks.append(bb.emit(relax.call_tir(func, [relax.prim_value(keys)], out_ty=relax.TensorType(shape, dtype))))
        return key_t, value, masks

    def _additive_mask(self, mask: relax.Expr, dtype: str) -> relax.Expr:
        """A float mask as it is; a boolean one as 0 where ``True`` and ``-inf`` elsewhere."""
        if mask.ty.dtype != "bool":
            return mask
        zero, never = relax.const(0.0, dtype), relax.const(float("-inf"), dtype)
        return self.block_builder.emit(relax.op.where(mask, zero, never))

    def _pad_keys(self, mask: relax.Expr, padded: int) -> relax.Expr:
        """An additive mask over the keys extended to ``padded`` keys at ``-inf`` (one broadcast over them stays)."""
        if int(mask.ty.shape[-1]) == 1:
            return mask
        pad_width = [0, 0] * (len(mask.ty.shape) - 1) + [0, padded - int(mask.ty.shape[-1])]
        return self.block_builder.emit(relax.op.nn.pad(mask, pad_width, pad_value=float("-inf")))

    def _diff(self, node: fx.Node) -> relax.Expr:
        """``aten.diff(x, n, dim, prepend, append)``: ``n`` times ``x[1:] - x[:-1]`` along ``dim``.

        transformers' Llama mask code calls it on position ids (to detect packed sequences).
        """
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        bb = self.block_builder
        parts = [self.env[call[name]] for name in ("prepend", "input", "append") if call.get(name) is not None]
        dim = call.get("dim", -1) % len(parts[0].ty.shape)
        x = bb.emit(relax.op.concat(parts, axis=dim)) if len(parts) > 1 else parts[0]
        for _ in range(call.get("n", 1)):
            length = int(x.ty.shape[dim])
            later = relax.op.strided_slice(x, axes=[dim], begin=[1], end=[length])
            earlier = relax.op.strided_slice(x, axes=[dim], begin=[0], end=[length - 1])
            x = bb.emit(relax.op.subtract(later, earlier))
        return x

    def _cumsum_promoted(self, node: fx.Node) -> relax.Expr:
        """``aten.cumsum`` with torch's promotion: bool and integer inputs sum in int64 unless ``dtype`` is given."""
        x = self.env[node.args[0]]
        if "dtype" in node.kwargs or x.ty.dtype not in ("bool", "int8", "uint8", "int16", "int32"):
            return self._cumsum(node)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        return self.block_builder.emit(relax.op.cumsum(x, dim, "int64"))

    def _to_device(self, node: fx.Node) -> relax.Expr:
        """``aten.to.device(x, device, dtype, ...)``: on one device only the dtype can change."""
        x = self.env[node.args[0]]
        dtype = self._convert_data_type(node.args[2] if len(node.args) > 2 else node.kwargs["dtype"], self.env)
        return x if dtype == x.ty.dtype else self.block_builder.emit(relax.op.astype(x, dtype))

    def _max_pool2d_keywords(self, node: fx.Node) -> relax.Expr:
        """``F.max_pool2d`` with stride, padding, dilation or ceil_mode given by keyword, as fx records
        ``nn.MaxPool2d`` (the upstream converter reads them by position only)."""
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        if call.get("return_indices"):
            raise BackendError(f"node '{node.name}': max_pool2d with return_indices is not lowered")
        x, stride = self.env[call["input"]], call.get("stride") or None  # None or []: the kernel size
        padding, dilation, ceil_mode = (call.get(name, default) for name, default in PAD_DILATE_CEIL)
        return self._max_pool2d_impl(x, call["kernel_size"], stride, padding, dilation, ceil_mode)


__all__ = [
    "ConstantLinear",
    "GraphImporter",
    "InputSpec",
    "import_graph",
    "input_specs",
    "relax_shape",
    "symbolic_dims",
]
