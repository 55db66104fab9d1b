"""ONNX export of a compiled graph: torch's dynamo exporter for the float parts, ONNX Runtime ops for the packed ones.

Each ``lowbit`` op is first exported as a placeholder node of the ``lowbit`` domain carrying the op's tensors and
arguments; a rewrite then replaces it with ops ONNX Runtime runs, encoding the packed tensors for them: weight-only
linears as ``com.microsoft::MatMulNBits`` (act-order as a column permutation of the input), int8-activation linears
either as ``MatMulNBits`` whose int8 path quantizes the input per block (``int8="fast"``, the default: ONNX
Runtime's fast kernels) or as the per-token (or static) int8 quantization written in standard ops and an exact
``MatMulInteger`` per weight group (``int8="exact"``: lowbit's arithmetic bit for bit), convolutions as ``Conv``
on the dequantized weight (QDQ on the input for int8 activations), packed embeddings as a ``Gather`` of the packed
rows and their dequantization. The mapping and its tolerances are in docs/onnx.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from lowbit.errors import LowbitError
from lowbit.ir import ops_a8, ops_conv, ops_embedding, packing  # noqa: F401  (registers the lowbit ops)

log = logging.getLogger(__name__)

#: Domain of the placeholder nodes the rewrite replaces.
PLACEHOLDER_DOMAIN = "lowbit"
#: Opset of the standard ops the exporter writes.
OPSET = 20
#: ONNX Runtime's ``MatMulNBits`` serves these code widths with power-of-two blocks of at least 16 columns.
MATMUL_NBITS_BITS = (2, 4, 8)
MATMUL_NBITS_MIN_BLOCK = 16
#: Code widths whose weight-only ``MatMulNBits`` takes zero points that are codes as packed uint8 (ONNX Runtime's
#: fast kernels; its 8-bit kernel takes no others). 2-bit ones stay float32: ONNX Runtime 1.32 runs 2-bit weights
#: several times slower with uint8 zero points than with float ones (docs/onnx.md).
PACKED_ZERO_POINT_BITS = (4, 8)
#: The file of an ONNX artifact directory (next to its manifest).
MODEL_FILE = "model.onnx"
#: How int8-activation linears are written (docs/onnx.md): ``"fast"``, ONNX Runtime's int8 ``MatMulNBits`` (it
#: quantizes the input per block itself); ``"exact"``, lowbit's per-token quantization and per-group integer products.
INT8_MODES = ("fast", "exact")
DEFAULT_INT8 = "fast"
#: ``MatMulNBits``' ``accuracy_level`` for int8 inputs, and the largest block of the fast translation (a per-channel
#: weight is split into blocks of this many columns, each with the channel's scale).
FAST_INT8_ACCURACY = 4
FAST_INT8_BLOCK = 128


class OnnxExportError(LowbitError):
    """A graph the ONNX export cannot write (an op without an ONNX translation, a packed tensor that is not a
    constant)."""


@dataclass(frozen=True)
class Placeholder:
    """How one ``lowbit`` op is exported before the rewrite: its leading tensors, its integer (list) arguments in
    schema order and its trailing tensors, as the inputs and attributes of a ``lowbit``-domain node."""

    op: Any
    tensors: tuple[str, ...]
    arguments: tuple[str, ...]
    trailing: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.op._schema.name.split("::")[1]

    def register_schema(self) -> None:
        """Declare the placeholder to ONNX (onnxscript builds nodes only for ops with a schema)."""
        from onnx import defs

        if defs.has(self.name, PLACEHOLDER_DOMAIN):
            return
        names = (*self.tensors, *self.trailing)
        option = defs.OpSchema.FormalParameterOption
        kinds = defs.OpSchema.AttrType
        types = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "double", "uint8", "int8", "int32", "int64")]
        defs.register_schema(
            defs.OpSchema(
                self.name,
                PLACEHOLDER_DOMAIN,
                1,
                inputs=[
                    defs.OpSchema.FormalParameter(n, f"T{i}", param_option=option.Single if i == 0 else option.Optional)
                    for i, n in enumerate(names)
                ],
                outputs=[defs.OpSchema.FormalParameter("y", "T")],
                type_constraints=[(f"T{i}", types, "") for i in range(len(names))] + [("T", types, "")],
                attributes=[
                    defs.OpSchema.Attribute(a, kinds.INTS if a in _LIST_ARGUMENTS else kinds.INT, "")
                    for a in self.arguments
                ],
            )
        )

    def translation(self) -> Callable[..., Any]:
        """The exporter's translation of the op: the placeholder node with the op's inputs and arguments."""
        import onnxscript

        opset = onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1)
        arity = len(self.tensors) + len(self.arguments)

        def translate(*args: Any) -> Any:
            args = args + (None,) * (arity + len(self.trailing) - len(args))
            attributes = dict(zip(self.arguments, args[len(self.tensors) : arity], strict=True))
            return getattr(opset, self.name)(*args[: len(self.tensors)], *args[arity:], **attributes)

        return translate


_LINEAR = ("x", "qweight", "scales", "zeros", "g_idx", "bias")
_LAYOUT = ("bits", "group_size", "in_features")
_CONV = (*_LAYOUT, "kernel_size", "stride", "padding", "dilation", "groups")
_LIST_ARGUMENTS = frozenset({"kernel_size", "stride", "padding", "dilation"})

#: Every lowbit op the export translates.
PLACEHOLDERS: dict[str, Placeholder] = {
    p.name: p
    for p in (
        Placeholder(torch.ops.lowbit.linear_packed.default, _LINEAR, _LAYOUT),
        Placeholder(torch.ops.lowbit.linear_packed_a8.default, _LINEAR, _LAYOUT, ("act_scale",)),
        Placeholder(torch.ops.lowbit.conv_packed.default, _LINEAR, _CONV),
        Placeholder(torch.ops.lowbit.conv_packed_a8.default, _LINEAR, _CONV, ("act_scale",)),
        Placeholder(
            torch.ops.lowbit.embedding_packed.default,
            ("ids", "qweight", "scales", "zeros"),
            ("bits", "group_size", "embedding_dim"),
        ),
    )
}


def check_int8(int8: str) -> None:
    """Raise `OnnxExportError` unless ``int8`` is one of `INT8_MODES`."""
    if int8 not in INT8_MODES:
        raise OnnxExportError(f"unknown int8 mode {int8!r}; known: {', '.join(map(repr, INT8_MODES))}")


def to_onnx(graph: fx.GraphModule, inputs: Mapping[str, torch.Tensor], int8: str = DEFAULT_INT8) -> Any:
    """The ONNX model (an ``onnx_ir.Model``) of ``graph`` called with the named ``inputs`` (its placeholders), its
    int8-activation linears written the ``int8`` way (`INT8_MODES`); every input dimension the graph leaves free is
    symbolic."""
    import onnx_ir as ir

    from lowbit.onnx_peer import _quiet

    check_int8(int8)
    unknown = sorted(
        {
            str(node.target)
            for node in graph.graph.nodes
            if node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == "lowbit"
            and node.target._schema.name.split("::")[1] not in PLACEHOLDERS
        }
    )
    if unknown:
        raise OnnxExportError(f"no ONNX translation for {', '.join(unknown)}")
    for placeholder in PLACEHOLDERS.values():
        placeholder.register_schema()
    table = {p.op: p.translation() for p in PLACEHOLDERS.values()}
    dynamic = {name: {dim: torch.export.Dim.AUTO for dim in range(t.dim())} for name, t in inputs.items()}
    with _quiet("onnxscript"), torch.no_grad():
        try:
            program = torch.onnx.export(
                graph,
                (),
                kwargs=dict(inputs),
                dynamo=True,
                custom_translation_table=table,
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                verbose=False,
            )
        except Exception as exc:  # the exporter wraps what it cannot translate in its own errors
            raise OnnxExportError(f"torch.onnx could not export the graph: {exc}") from exc
    model = program.model
    translations = {**_TRANSLATIONS, **_FAST_TRANSLATIONS} if int8 == "fast" else _TRANSLATIONS
    for node in list(model.graph):
        if node.domain == PLACEHOLDER_DOMAIN:
            _rewrite(model.graph, node, translations[node.op_type])
    model.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    model.opset_imports["com.microsoft"] = 1
    used = {value.name for node in model.graph for value in node.inputs if value is not None}
    used |= {value.name for value in model.graph.outputs}
    for name in [name for name in model.graph.initializers if name not in used]:
        del model.graph.initializers[name]
    ir.passes.common.TopologicalSortPass()(model)
    return model


def _rewrite(graph: Any, node: Any, translation: Callable[..., Any]) -> None:
    """Replace one placeholder node by the ONNX Runtime ops ``translation`` writes for its ``lowbit`` op."""
    import onnx_ir as ir

    placeholder = PLACEHOLDERS[node.op_type]
    names = (*placeholder.tensors, *placeholder.trailing)
    values = dict(zip(names, list(node.inputs) + [None] * (len(names) - len(node.inputs)), strict=True))
    constants = {}
    for name, value in list(values.items())[1:]:
        if value is None:
            constants[name] = None
        elif value.const_value is None:
            raise OnnxExportError(f"{node.name}: the packed tensor {name!r} is not a constant of the graph")
        else:
            constants[name] = torch.from_numpy(np.array(value.const_value.numpy()))
    arguments = {name: node.attributes[name].value for name in placeholder.arguments}
    builder = _Builder(ir.tape.Tape(), node.name)
    output = translation(builder, values[names[0]], constants, arguments)
    graph.insert_before(node, builder.tape.nodes)
    for initializer in builder.tape.initializers:
        graph.register_initializer(initializer)
    ir.convenience.replace_all_uses_with(node.outputs[0], output, replace_graph_outputs=True)
    output.name = node.outputs[0].name if node.outputs[0].is_graph_output() else output.name
    graph.remove(node, safe=True)


@dataclass
class _Builder:
    """Nodes and initializers of one rewrite, named after the node they replace."""

    tape: Any
    prefix: str

    def const(self, name: str, array: np.ndarray | torch.Tensor) -> Any:
        import onnx_ir as ir

        data = array.numpy() if isinstance(array, torch.Tensor) else array
        return self.tape.initializer(ir.tensor(np.ascontiguousarray(data)), name=f"{self.prefix}.{name}")

    def op(self, op_type: str, *inputs: Any, domain: str = "", **attributes: Any) -> Any:
        return self.tape.op(op_type, list(inputs), attributes or None, domain=domain)


def _float(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def _codes(tensors: Mapping[str, Any], arguments: Mapping[str, Any], width: str = "in_features") -> torch.Tensor:
    return packing.unpack(tensors["qweight"], arguments["bits"], arguments[width])


def _dequantized_weight(b: _Builder, tensors: Mapping[str, Any], arguments: Mapping[str, Any]) -> Any:
    """``(q − zero) · scale`` as a float32 ``(N, K)`` value: uint8 codes and per-column gathers of the group
    parameters (the float operations of `packing.dequantize_codes`)."""
    import onnx_ir as ir

    bits, group_size, in_features = arguments["bits"], arguments["group_size"], arguments["in_features"]
    columns = packing.group_index(in_features, group_size, tensors["g_idx"], torch.device("cpu"))
    index = b.const("columns", columns.numpy())
    codes = b.op("Cast", b.const("codes", _codes(tensors, arguments)), to=ir.DataType.FLOAT)
    zeros = tensors["zeros"]
    zero = (
        b.const("zero", _float(packing.default_zero(bits)))
        if zeros is None
        else b.op("Gather", b.const("zeros", zeros), index, axis=1)
    )
    return b.op("Mul", b.op("Sub", codes, zero), b.op("Gather", b.const("scales", tensors["scales"]), index, axis=1))


def _act_order(tensors: Mapping[str, Any], arguments: Mapping[str, Any]) -> torch.Tensor | None:
    """The input-column permutation that makes the weight's groups contiguous (identity without act-order), or None
    where an act-order's groups are uneven."""
    group_size, in_features = arguments["group_size"], arguments["in_features"]
    if tensors["g_idx"] is None:
        return torch.arange(in_features)
    order = torch.argsort(tensors["g_idx"].to(torch.long), stable=True)
    contiguous = torch.equal(tensors["g_idx"].to(torch.long)[order], torch.arange(in_features) // group_size)
    return order if contiguous else None


def _nbits_layout(tensors: Mapping[str, Any], arguments: Mapping[str, Any]) -> torch.Tensor | None:
    """The column permutation (`_act_order`) for ``MatMulNBits`` blocks equal to the weight's groups, or None where
    ``MatMulNBits`` cannot serve the layout."""
    bits, group_size = arguments["bits"], arguments["group_size"]
    power_of_two = group_size & (group_size - 1) == 0
    if bits not in MATMUL_NBITS_BITS or group_size < MATMUL_NBITS_MIN_BLOCK or not power_of_two:
        return None
    return _act_order(tensors, arguments)


def _matmul_nbits(
    b: _Builder,
    x: Any,
    tensors: Mapping[str, Any],
    arguments: Mapping[str, Any],
    order: torch.Tensor,
    block: int,
    zero_points: torch.Tensor | None,
    accuracy_level: int,
) -> Any:
    """``MatMulNBits`` over blocks of ``block`` columns in ``order`` (each block within one weight group, whose scale
    and zero point it repeats; uint8 zero points are packed like the codes, float32 ones stay floats), with the
    input's columns gathered in that order unless it is the identity."""
    bits, group_size, in_features = arguments["bits"], arguments["group_size"], arguments["in_features"]
    rows = tensors["qweight"].shape[0]
    blocks = -(-in_features // block)  # a per-channel row may be narrower than its one block
    codes = torch.nn.functional.pad(_codes(tensors, arguments)[:, order], (0, blocks * block - in_features))
    blob = packing.pack(codes, bits).view(rows, blocks, block * bits // 8)
    group = torch.arange(blocks) * block // group_size
    zeros = None if zero_points is None else zero_points[:, group].contiguous()
    if zeros is not None and zeros.dtype == torch.uint8 and bits < 8:  # packed like the codes, each row padded
        zeros = packing.pack(zeros, bits)
    if not torch.equal(order, torch.arange(in_features)):
        x = b.op("Gather", x, b.const("order", order.numpy()), axis=-1)
    bias = None if tensors["bias"] is None else b.const("bias", tensors["bias"].to(torch.float32))
    return b.op(
        "MatMulNBits",
        x,
        b.const("B", blob),
        b.const("scales", tensors["scales"][:, group].contiguous()),
        None if zeros is None else b.const("zero_points", zeros),
        None,
        bias,
        domain="com.microsoft",
        K=in_features,
        N=rows,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )


def _linear_packed(b: _Builder, x: Any, tensors: Mapping[str, Any], arguments: Mapping[str, Any]) -> Any:
    """``MatMulNBits`` where its layout fits (module doc), with packed uint8 zero points where they are codes of a
    width in `PACKED_ZERO_POINT_BITS` and float32 ones otherwise; else (and for 8-bit weights whose zero points are
    not codes, which ONNX Runtime's 8-bit kernel refuses) the dequantized weight and ``MatMul``."""
    order = _nbits_layout(tensors, arguments)
    zeros, bits = tensors["zeros"], arguments["bits"]
    codes = bits in PACKED_ZERO_POINT_BITS and _integral_zeros(zeros, bits)
    if order is None or (bits == 8 and not codes):
        weight = _dequantized_weight(b, tensors, arguments)
        y = b.op("MatMul", x, b.op("Transpose", weight, perm=[1, 0]))
        bias = None if tensors["bias"] is None else b.const("bias", tensors["bias"].to(torch.float32))
        return y if bias is None else b.op("Add", y, bias)
    zero_points = _code_zero_points(zeros) if codes else zeros
    if zero_points is None and bits not in PACKED_ZERO_POINT_BITS:  # ONNX Runtime's fast path reads float ones
        zero_points = torch.full_like(tensors["scales"], float(1 << (bits - 1)))
    return _matmul_nbits(b, x, tensors, arguments, order, arguments["group_size"], zero_points, accuracy_level=0)


def _rows_of(b: _Builder, x: Any, width: int) -> Any:
    return b.op("Reshape", x, b.const("rows", np.array([-1, width], dtype=np.int64)))


def _quantized_activation(b: _Builder, x: Any, step: torch.Tensor | None) -> tuple[Any, Any]:
    """`ops_a8.quantize_activation` in standard ops: the float codes of ``x`` (rows) and their multiplier or step."""
    if step is None:
        absmax = b.op("ReduceMax", b.op("Abs", x), b.const("axis", np.array([-1], dtype=np.int64)), keepdims=1)
        absmax = b.op("Max", absmax, b.const("floor", _float(ops_a8.ACT_ABSMAX_FLOOR)))
        scale = b.op("Div", b.const("qmax", _float(127.0)), absmax)
        scaled = b.op("Mul", x, scale)
    else:
        scale = b.const("step", step.to(torch.float32))
        scaled = b.op("Div", x, scale)
    low, high = b.const("qmin", _float(ops_a8.ACT_QMIN)), b.const("qmax_clip", _float(ops_a8.ACT_QMAX))
    return b.op("Clip", b.op("Round", scaled), low, high), scale


def _linear_packed_a8(b: _Builder, x: Any, tensors: Mapping[str, Any], arguments: Mapping[str, Any]) -> Any:
    """Per-token (or static) int8 codes, one exact integer product per weight group, the float32 group sum,
    rescale and bias: `ops_a8` in ONNX ops (module doc)."""
    import onnx_ir as ir

    bits, group_size, in_features = arguments["bits"], arguments["group_size"], arguments["in_features"]
    qweight, scales, zeros = tensors["qweight"], tensors["scales"], tensors["zeros"]
    rows, groups = qweight.shape[0], scales.shape[1]
    step = tensors["act_scale"]
    codes, scale = _quantized_activation(b, _rows_of(b, b.op("Cast", x, to=ir.DataType.FLOAT), in_features), step)
    # Column k of group g goes to slot (g, rank of k in g); empty slots read an extra zero column.
    columns = packing.group_index(in_features, group_size, tensors["g_idx"], torch.device("cpu"))
    counts = torch.bincount(columns, minlength=groups)
    width = int(counts.max())
    slots = torch.full((groups, width), in_features, dtype=torch.long)
    order = torch.argsort(columns, stable=True)
    rank = torch.arange(in_features) - (torch.cumsum(counts, 0) - counts)[columns[order]]
    slots[columns[order], rank] = order
    centered = packing.unpack(qweight, bits, in_features).to(torch.float64)
    centered = centered - (packing.default_zero(bits) if zeros is None else zeros.to(torch.float64)[:, columns])
    padded = torch.cat([centered, torch.zeros(rows, 1, dtype=torch.float64)], dim=1)
    grouped_weight = padded[:, slots].permute(1, 2, 0)  # (G, width, N)
    pad = b.op("Pad", codes, b.const("pads", np.array([0, 0, 0, 1], dtype=np.int64)))
    gathered = b.op("Gather", pad, b.const("slots", slots.reshape(-1).numpy()), axis=1)
    grouped = b.op(
        "Transpose",
        b.op("Reshape", gathered, b.const("grouped", np.array([-1, groups, width], dtype=np.int64))),
        perm=[1, 0, 2],
    )
    integral = torch.all(grouped_weight == grouped_weight.round())
    if bool(integral and torch.all((grouped_weight >= -128) & (grouped_weight <= 127))):
        weight = b.const("weight_codes", grouped_weight.to(torch.int8))
        product = b.op("MatMulInteger", b.op("Cast", grouped, to=ir.DataType.INT8), weight)
        product = b.op("Cast", product, to=ir.DataType.FLOAT)
    else:  # codes beyond int8 (asymmetric 8-bit) or half-integers (1 bit): float products, exact below 2^24
        product = b.op("MatMul", grouped, b.const("weight_codes", grouped_weight.to(torch.float32)))
    group_scales = b.const("scales", scales.T.contiguous().view(groups, 1, rows))
    y = b.op(
        "ReduceSum", b.op("Mul", product, group_scales), b.const("groups", np.array([0], dtype=np.int64)), keepdims=0
    )
    y = b.op("Div", y, scale) if step is None else b.op("Mul", y, scale)
    if tensors["bias"] is not None:
        y = b.op("Add", y, b.const("bias", tensors["bias"].to(torch.float32)))
    leading = b.op("Shape", x, end=-1)
    shape = b.op("Concat", leading, b.const("out_features", np.array([rows], dtype=np.int64)), axis=0)
    return b.op("Reshape", y, shape)


def _fast_block(bits: int, group_size: int, in_features: int) -> int | None:
    """The ``MatMulNBits`` block of the fast int8 translation: the largest power of two up to `FAST_INT8_BLOCK` that
    divides the weight's groups, or None below the smallest block. A per-channel row is one block up to
    `FAST_INT8_BLOCK` columns, and blocks of its largest such divisor beyond (`FAST_INT8_BLOCK` columns where that is
    below the smallest block; the last block partial)."""
    if bits not in MATMUL_NBITS_BITS:
        return None
    block = min(FAST_INT8_BLOCK, group_size & -group_size)
    if group_size < in_features:
        return block if block >= MATMUL_NBITS_MIN_BLOCK else None
    if in_features <= FAST_INT8_BLOCK:
        return max(MATMUL_NBITS_MIN_BLOCK, 1 << (in_features - 1).bit_length())
    return block if block >= MATMUL_NBITS_MIN_BLOCK else FAST_INT8_BLOCK


def _integral_zeros(zeros: torch.Tensor | None, bits: int) -> bool:
    """Whether the zero points are codes (integers in ``[0, 2^bits)``); None is ``2^(bits−1)``, ``MatMulNBits``'
    default as well."""
    return zeros is None or bool(torch.all((zeros == zeros.round()) & (zeros >= 0) & (zeros < 1 << bits)))


def _code_zero_points(zeros: torch.Tensor | None) -> torch.Tensor | None:
    """Zero points that are codes (`_integral_zeros`) as uint8, which `_matmul_nbits` packs like the weight."""
    return None if zeros is None else zeros.to(torch.uint8)


def _linear_packed_a8_fast(b: _Builder, x: Any, tensors: Mapping[str, Any], arguments: Mapping[str, Any]) -> Any:
    """``MatMulNBits`` with ``accuracy_level`` 4, uint8 zero points: ONNX Runtime quantizes the input to int8 per
    block itself (module doc); the exact translation where the weight's layout or zero points do not fit it."""
    bits, group_size, in_features = arguments["bits"], arguments["group_size"], arguments["in_features"]
    block = _fast_block(bits, group_size, in_features)
    order = _act_order(tensors, arguments)
    zeros = tensors["zeros"]
    if block is None or order is None or not _integral_zeros(zeros, bits):
        return _linear_packed_a8(b, x, tensors, arguments)
    return _matmul_nbits(
        b, x, tensors, arguments, order, block, _code_zero_points(zeros), accuracy_level=FAST_INT8_ACCURACY
    )


def _conv_attributes(arguments: Mapping[str, Any]) -> dict[str, Any]:
    padding = list(arguments["padding"])
    return {
        "kernel_shape": list(arguments["kernel_size"]),
        "strides": list(arguments["stride"]),
        "pads": padding + padding,
        "dilations": list(arguments["dilation"]),
        "group": arguments["groups"],
    }


def _conv_weight(b: _Builder, tensors: Mapping[str, Any], arguments: Mapping[str, Any]) -> Any:
    shape = np.array([tensors["qweight"].shape[0], -1, *arguments["kernel_size"]], dtype=np.int64)
    return b.op("Reshape", _dequantized_weight(b, tensors, arguments), b.const("conv_shape", shape))


def _conv_packed(b: _Builder, x: Any, tensors: Mapping[str, Any], arguments: Mapping[str, Any]) -> Any:
    """``Conv`` on the dequantized weight."""
    bias = None if tensors["bias"] is None else b.const("bias", tensors["bias"].to(torch.float32))
    return b.op("Conv", x, _conv_weight(b, tensors, arguments), bias, **_conv_attributes(arguments))


def _conv_packed_a8(b: _Builder, x: Any, tensors: Mapping[str, Any], arguments: Mapping[str, Any]) -> Any:
    """The input's int8 codes with the static step (as `ops_a8.quantize_activation`: ``x / Δ``, round, clip), their
    ``DequantizeLinear``, then ``Conv`` on the dequantized weight."""
    import onnx_ir as ir

    codes, step = _quantized_activation(b, b.op("Cast", x, to=ir.DataType.FLOAT), tensors["act_scale"])
    zero = b.const("zero_point", np.array(0, dtype=np.int8))
    x = b.op("DequantizeLinear", b.op("Cast", codes, to=ir.DataType.INT8), step, zero)
    return _conv_packed(b, x, tensors, arguments)


def _embedding_packed(b: _Builder, ids: Any, tensors: Mapping[str, Any], arguments: Mapping[str, Any]) -> Any:
    """A ``Gather`` of the packed rows, their codes (low nibble first) and ``(q − zero) · scale`` per group."""
    import onnx_ir as ir

    bits, group_size, dim = arguments["bits"], arguments["group_size"], arguments["embedding_dim"]
    groups = dim // group_size
    picked = b.op("Gather", b.const("qweight", tensors["qweight"]), ids, axis=0)
    if bits == 4:
        low = b.op("BitwiseAnd", picked, b.const("low_mask", np.array(15, dtype=np.uint8)))
        high = b.op("BitShift", picked, b.const("shift", np.array(4, dtype=np.uint8)), direction="RIGHT")
        last = b.const("last", np.array([-1], dtype=np.int64))
        picked = b.op("Concat", b.op("Unsqueeze", low, last), b.op("Unsqueeze", high, last), axis=-1)
    ids_shape = b.op("Shape", ids)
    grouped_shape = b.op("Concat", ids_shape, b.const("groups", np.array([groups, group_size], dtype=np.int64)), axis=0)
    codes = b.op("Reshape", b.op("Cast", picked, to=ir.DataType.FLOAT), grouped_shape)
    last = b.const("unsqueeze", np.array([-1], dtype=np.int64))
    zeros = tensors["zeros"]
    zero = (
        b.const("zero", _float(packing.default_zero(bits)))
        if zeros is None
        else b.op("Unsqueeze", b.op("Gather", b.const("zeros", zeros), ids, axis=0), last)
    )
    scale = b.op("Unsqueeze", b.op("Gather", b.const("scales", tensors["scales"]), ids, axis=0), last)
    values = b.op("Mul", b.op("Sub", codes, zero), scale)
    shape = b.op("Concat", ids_shape, b.const("dim", np.array([dim], dtype=np.int64)), axis=0)
    return b.op("Reshape", values, shape)


_TRANSLATIONS: dict[str, Callable[..., Any]] = {
    "linear_packed": _linear_packed,
    "linear_packed_a8": _linear_packed_a8,
    "conv_packed": _conv_packed,
    "conv_packed_a8": _conv_packed_a8,
    "embedding_packed": _embedding_packed,
}
#: What ``int8="fast"`` writes instead.
_FAST_TRANSLATIONS: dict[str, Callable[..., Any]] = {"linear_packed_a8": _linear_packed_a8_fast}


def example_inputs(graph: fx.GraphModule, signature: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Inputs for the exporter, named after ``graph``'s placeholders, from a compiled model's input signature
    (``{"name", "shape", "dtype"}`` per tensor: positional ones first; indices are zeros)."""
    placeholders = [node.target for node in graph.graph.nodes if node.op == "placeholder"]
    inputs = {}
    for position, entry in enumerate(signature):
        name = entry["name"] if not entry["name"].isdigit() else placeholders[position]
        dtype = getattr(torch, entry["dtype"])
        shape = tuple(entry["shape"])
        inputs[name] = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    return inputs


def write(
    graph: fx.GraphModule,
    inputs: Mapping[str, torch.Tensor],
    path: str | Path,
    info: dict[str, Any],
    overwrite: bool = False,
    int8: str = DEFAULT_INT8,
) -> Path:
    """Write ``graph`` as ``model.onnx`` in the artifact directory ``path`` (atomic, with a checksummed manifest whose
    target is ``"onnx"`` and which records the ``int8`` mode)."""
    import onnx_ir as ir

    from lowbit import artifact

    model = to_onnx(graph, inputs, int8)

    def save(directory: Path) -> list[str]:
        ir.save(model, directory / MODEL_FILE)
        return [MODEL_FILE]

    onnx_info = {**info, "onnx": {"opset": OPSET, "int8": int8, "inputs": [v.name for v in model.graph.inputs]}}
    return artifact.write(path, "onnx", None, onnx_info, overwrite=overwrite, save=save)


__all__ = [
    "DEFAULT_INT8",
    "INT8_MODES",
    "MODEL_FILE",
    "OnnxExportError",
    "PLACEHOLDERS",
    "check_int8",
    "example_inputs",
    "to_onnx",
    "write",
]
