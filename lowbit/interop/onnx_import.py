"""ONNX import: an ONNX file becomes a torch.fx graph (onnx2torch's converters), so every pass and backend applies.

Before converting, every node is checked against the converters for the model's opset, so a model with ops
onnx2torch cannot convert fails with one error naming all of them. Example inputs come from the graph's input
shapes (random floats, zero indices) unless given; a symbolic dimension needs them given. Models of opsets newer
than onnx2torch covers are first taken down to `CONVERTER_OPSET` by ONNX's version converter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError

#: File suffix `is_onnx` recognizes.
SUFFIX = ".onnx"
#: The newest opset onnx2torch converts every op of; newer models are converted down to it where needed.
CONVERTER_OPSET = 17


class OnnxImportError(LowbitError):
    """An ONNX model that cannot be imported (ops without a converter, inputs without a fixed shape)."""


@dataclass(frozen=True)
class ImportedModel:
    """An imported ONNX model: the torch module, example inputs (one per graph input, in order) and the names of
    the graph's inputs."""

    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]


def is_onnx(model: Any) -> bool:
    """Whether ``model`` is the path of an ONNX file."""
    return isinstance(model, str | Path) and Path(model).suffix == SUFFIX


def unsupported_ops(model: Any) -> list[str]:
    """``domain::op_type`` (``op_type`` for the standard domain) of each op of ``model`` (an ``onnx.ModelProto``)
    that onnx2torch has no converter for at the model's opset, sorted."""
    from onnx import defs
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    opsets = {entry.domain or defs.ONNX_DOMAIN: entry.version for entry in model.opset_import}
    missing = set()
    for node in _nodes(model.graph):
        domain = node.domain or defs.ONNX_DOMAIN
        version = opsets.get(domain, 1)
        with contextlib.suppress(defs.SchemaError):
            version = defs.get_schema(node.op_type, max_inclusive_version=version, domain=domain).since_version
        if OperationDescription(domain, node.op_type, version) not in _CONVERTER_REGISTRY:
            missing.add(node.op_type if domain == defs.ONNX_DOMAIN else f"{domain}::{node.op_type}")
    return sorted(missing)


def _nodes(graph: Any) -> list[Any]:
    """The nodes of ``graph`` and of its subgraphs (If/Loop bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                nodes += _nodes(body)
    return nodes


def load(path: str | Path, example_inputs: Any = None) -> ImportedModel:
    """Convert the ONNX file at ``path`` to a torch module with example inputs (``example_inputs`` if given, else
    from the graph's input shapes)."""
    import onnx

    try:
        import onnx2torch
    except ImportError as exc:
        raise OnnxImportError("ONNX import needs onnx2torch: pip install 'lowbit[onnx]'") from exc
    model = _converted(onnx.load(str(path)))
    missing = unsupported_ops(model)
    if missing:
        raise OnnxImportError(f"{path}: no converter for the ONNX op(s) {', '.join(missing)}")
    initializers = {tensor.name for tensor in model.graph.initializer}
    graph_inputs = [value for value in model.graph.input if value.name not in initializers]
    names = tuple(value.name for value in graph_inputs)
    if example_inputs is None:
        example_inputs = tuple(_example(path, value) for value in graph_inputs)
    elif not isinstance(example_inputs, tuple | list):
        example_inputs = (example_inputs,)
    _drop_unneeded_allowzero(model)
    try:
        module = onnx2torch.convert(model)
    except NotImplementedError as exc:
        raise OnnxImportError(f"{path}: onnx2torch cannot convert the model: {exc}") from exc
    _static_shapes(module, tuple(example_inputs))
    return ImportedModel(module.eval(), tuple(example_inputs), names)


#: onnx2torch modules that take a target shape as a tensor (which tracing cannot turn into sizes), and the torch
#: function computing the same output from the input and the output's shape.
_SHAPED = {"OnnxReshape": torch.reshape, "OnnxExpand": torch.broadcast_to}


def _static_shapes(module: torch.fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Replace each onnx2torch reshape or expand whose shape is a constant by the torch function with the output's
    shape at ``example_inputs``, and each gather of one constant index by ``torch.select``, so tracers and backends
    see sizes and indices rather than tensors holding them."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(module).propagate(*example_inputs)
    for node in list(module.graph.nodes):
        kind = type(module.get_submodule(node.target)).__name__ if node.op == "call_module" else None
        constant = len(node.args) == 2 and getattr(node.args[1], "op", None) == "get_attr"
        if not constant or kind not in (*_SHAPED, "OnnxGather"):
            continue
        if kind == "OnnxGather":
            index = _attribute(module, node.args[1].target)
            if index.dim() != 0:
                continue
            call = (torch.select, (node.args[0], module.get_submodule(node.target)._axis, int(index)))
        else:
            call = (_SHAPED[kind], (node.args[0], tuple(node.meta["tensor_meta"].shape)))
        with module.graph.inserting_before(node):
            replacement = module.graph.call_function(*call)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        module.graph.erase_node(node)
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()


def _attribute(module: torch.nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _converted(model: Any) -> Any:
    """``model``, or the same model at `CONVERTER_OPSET` where onnx2torch lacks converters for a newer opset's ops
    (torch.onnx writes opset 18 and later) and ONNX's version converter can take it down."""
    from onnx import version_converter

    current = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    if current <= CONVERTER_OPSET or not unsupported_ops(model):
        return model
    try:
        return version_converter.convert_version(model, CONVERTER_OPSET)
    except Exception:  # the converter lacks an adapter: report the original model's ops
        return model


def _drop_unneeded_allowzero(model: Any) -> None:
    """Clear ``allowzero=1`` (which onnx2torch refuses) on the ``Reshape`` nodes whose constant target shape has no
    zero, where it changes nothing; torch.onnx writes it on every ``Reshape``."""
    from onnx import numpy_helper

    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    constants |= {
        node.output[0]: attribute.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attribute in node.attribute
        if attribute.name == "value"
    }
    for node in model.graph.node:
        shape = constants.get(node.input[1]) if node.op_type == "Reshape" else None
        if shape is not None and 0 not in numpy_helper.to_array(shape):
            kept = [attribute for attribute in node.attribute if attribute.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend(kept)


def _example(path: str | Path, value: Any) -> torch.Tensor:
    """A tensor of the graph input ``value``'s shape and type: standard normal floats, zeros for integers."""
    from onnx import helper

    shape = []
    for dim in value.type.tensor_type.shape.dim:
        if not dim.HasField("dim_value"):
            raise OnnxImportError(
                f"{path}: input {value.name!r} has the symbolic dimension {dim.dim_param or '?'}; "
                "pass example_inputs to fix its size"
            )
        shape.append(dim.dim_value)
    dtype = torch.from_numpy(np.zeros((), helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))).dtype
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.zeros(shape, dtype=dtype)


__all__ = ["ImportedModel", "OnnxImportError", "SUFFIX", "is_onnx", "load", "unsupported_ops"]
