"""ONNX import: models exported by torch.onnx are traced back, compiled and agree with ONNX Runtime (ResNet-18 on
x86 builds twenty convolutions with TVM: slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import lowbit
from lowbit.interop import onnx_import
from tests.helpers import tiny_bert, token_ids


def _reference(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)


def _flat(output: object) -> list[np.ndarray]:
    leaves = output if isinstance(output, tuple | list) else [output]
    return [leaf.detach().numpy() for leaf in leaves]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=True, verbose=False)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "bert.onnx"
    torch.onnx.export(tiny_bert(), (token_ids(),), str(path), dynamo=True, verbose=False, opset_version=18)
    return path


@pytest.mark.parametrize("target", ["torch", pytest.param("x86", marks=pytest.mark.slow)])
def test_resnet18_compiles_and_agrees_with_onnx_runtime(resnet: Path, target: str):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    compiled = lowbit.compile(resnet, (x,), passes=[], target=target, tune=False)
    (expected,) = _reference(resnet, {onnx.load(str(resnet)).graph.input[0].name: x.numpy()})
    (actual,) = _flat(compiled(x))
    assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("target", ["torch", "x86"])
def test_bert_compiles_and_agrees_with_onnx_runtime(bert: Path, target: str):
    ids = token_ids()
    compiled = lowbit.compile(bert, target=target, passes=[], tune=False)  # example inputs from the ONNX shapes
    expected = _reference(bert, {onnx.load(str(bert)).graph.input[0].name: ids.numpy()})
    for actual, reference in zip(_flat(compiled(ids)), expected, strict=True):
        assert np.abs(actual - reference).max() <= 1e-5


def test_an_imported_model_takes_the_quantization_passes(bert: Path):
    compiled = lowbit.compile(bert, passes=["rtn:bits=4,group_size=32"], target="torch")
    assert any("linear_packed" in str(node.target) for node in compiled.graph.graph.nodes)


def test_trace_accepts_an_onnx_file(resnet: Path):
    graph = lowbit.trace(resnet)
    modules = [
        type(graph.get_submodule(node.target)).__name__ for node in graph.graph.nodes if node.op == "call_module"
    ]
    assert modules.count("Conv2d") == 20 and modules.count("Linear") == 1


def test_unconvertible_ops_are_a_named_error(tmp_path: Path):
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Hardmax", ["r"], ["h"]),
        helper.make_node("Custom", ["h"], ["y"], domain="my.domain"),
    ]
    graph = helper.make_graph(nodes, "g", [value], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)]
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    with pytest.raises(
        onnx_import.OnnxImportError, match=r"no converter for the ONNX op\(s\) Hardmax, my.domain::Custom"
    ):
        lowbit.compile(path, target="torch")


def test_a_symbolic_dimension_needs_example_inputs(tmp_path: Path):
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [value],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(onnx_import.OnnxImportError, match="symbolic dimension batch"):
        lowbit.compile(path, target="torch")
    compiled = lowbit.compile(path, (torch.randn(3, 4),), target="torch")
    assert torch.equal(compiled(torch.tensor([[-1.0, 2.0, -3.0, 4.0]])), torch.tensor([[0.0, 2.0, 0.0, 4.0]]))
