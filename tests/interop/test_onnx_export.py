"""ONNX export: ONNX Runtime runs the exported graph and agrees with the torch target (docs/onnx.md tolerances)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lowbit
from lowbit.errors import ArtifactError
from lowbit.interop import onnx_export
from tests.conv_models import TinyCNN, images, trained
from tests.helpers import norm_mlp, tiny_bert, token_ids

A8 = "quantize_activations:bits=8,granularity=per_token,dynamic=true,symmetric=true"
#: Largest error of ``int8="fast"`` relative to the largest output (ONNX Runtime rounds the activations per block of
#: 16 to 128 columns, lowbit per token: measured up to 1.8e-2, docs/onnx.md).
FAST_TOLERANCE = 3e-2


def _session(directory: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(directory / onnx_export.MODEL_FILE), providers=["CPUExecutionProvider"])


def _relative(actual: np.ndarray, expected: torch.Tensor) -> float:
    return float((torch.from_numpy(actual) - expected).abs().max() / expected.abs().max())


def _ops(directory: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(directory / onnx_export.MODEL_FILE)).graph.node}


@pytest.mark.parametrize(
    ("passes", "int8", "op", "tolerance"),
    [
        (["rtn:bits=4,group_size=32,symmetric=true"], "fast", "MatMulNBits", 2e-6),
        (["rtn:bits=4,group_size=32,symmetric=false"], "fast", "MatMulNBits", 2e-6),
        (["rtn:bits=2,group_size=16,symmetric=false"], "fast", "MatMulNBits", 2e-6),
        (["rtn:bits=8,group_size=64,symmetric=true"], "fast", "MatMulNBits", 2e-6),
        (["gptq:bits=4,group_size=32,act_order=true,act_group_aware=false"], "fast", "MatMulNBits", 2e-6),
        (["rtn:bits=3,group_size=32,symmetric=true"], "fast", "MatMul", 2e-6),
        (["rtn:bits=4,group_size=32,symmetric=true", A8], "exact", "MatMulInteger", 2e-6),
        (["rtn:bits=8,group_size=-1,symmetric=true", A8], "exact", "MatMulInteger", 2e-6),
        (["rtn:bits=8,group_size=-1,symmetric=false", A8], "exact", "MatMul", 2e-6),
        (["rtn:bits=4,group_size=32,symmetric=true", A8], "fast", "MatMulNBits", FAST_TOLERANCE),
        (["rtn:bits=4,group_size=32,symmetric=false", A8], "fast", "MatMulNBits", FAST_TOLERANCE),
        (["rtn:bits=2,group_size=16,symmetric=false", A8], "fast", "MatMulNBits", FAST_TOLERANCE),
        (["gptq:bits=4,group_size=32,act_order=true,act_group_aware=false", A8], "fast", "MatMulNBits", FAST_TOLERANCE),
        (["rtn:bits=8,group_size=-1,symmetric=false", A8], "fast", "MatMulNBits", FAST_TOLERANCE),
        # 3-bit codes have no MatMulNBits kernel: the fast mode writes the exact translation.
        (["rtn:bits=3,group_size=32,symmetric=true", A8], "fast", "MatMulInteger", 2e-6),
    ],
)
def test_mlp_runs_in_onnx_runtime_like_the_torch_target(
    tmp_path: Path, passes: list[str], int8: str, op: str, tolerance: float
):
    model = norm_mlp()
    calibration = [(torch.randn(4, 128, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    compiled = lowbit.compile(model, (torch.randn(3, 128),), passes=passes, target="torch", calibration=calibration)
    directory = compiled.export(tmp_path / "mlp", format="onnx", int8=int8)
    assert op in _ops(directory)
    session = _session(directory)
    for batch in (1, 3):  # the batch dimension is symbolic
        x = torch.randn(batch, 128, generator=torch.Generator().manual_seed(batch))
        (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert _relative(actual, compiled(x)) <= tolerance


# Symmetric 8-bit codes reach -128 (the grid's most negative weight rounds half to even): int8 still holds them.
@pytest.mark.parametrize("weights", ["rtn:bits=4,group_size=32", "rtn:bits=8,group_size=-1,symmetric=true"])
def test_int8_activation_linear_is_bit_exact(tmp_path: Path, weights: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64)).eval()
    compiled = lowbit.compile(model, (torch.randn(3, 128),), passes=[weights, A8], target="torch")
    directory = compiled.export(tmp_path / "a8", format="onnx", int8="exact")
    assert "MatMulInteger" in _ops(directory)
    session = _session(directory)
    x = torch.randn(7, 128)
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.equal(torch.from_numpy(actual), compiled(x))


@pytest.mark.parametrize("in_features", [128, 100])
def test_fast_int8_over_a_whole_row_is_per_token(tmp_path: Path, in_features: int):
    """Per-channel weights over at most 128 inputs make one ``MatMulNBits`` block per row: ONNX Runtime's per-block
    int8 rounding is then lowbit's per-token one, and only the float sums differ."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, 64)).eval()
    passes = ["rtn:bits=8,group_size=-1,symmetric=true", A8]
    compiled = lowbit.compile(model, (torch.randn(3, in_features),), passes=passes, target="torch")
    directory = compiled.export(tmp_path / "a8", format="onnx")
    assert "MatMulNBits" in _ops(directory) and "MatMulInteger" not in _ops(directory)
    session = _session(directory)
    x = torch.randn(7, in_features)
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert _relative(actual, compiled(x)) <= 1e-6


@pytest.mark.parametrize(("int8", "tolerance"), [("exact", 1e-5), ("fast", FAST_TOLERANCE)])
def test_cnn_with_int8_convolutions(tmp_path: Path, int8: str, tolerance: float):
    model = trained(TinyCNN())
    passes = ["rtn:bits=4,group_size=16", "quantize_activations:bits=8,granularity=per_token,dynamic=true"]
    compiled = lowbit.compile(model, images()[0], passes=passes, target="torch", calibration=images())
    targets = {str(node.target) for node in compiled.graph.graph.nodes}
    assert "lowbit.conv_packed_a8.default" in targets
    directory = compiled.export(tmp_path / "cnn", format="onnx", int8=int8)
    assert {"DequantizeLinear", "Conv"} <= _ops(directory)
    session = _session(directory)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(batch))
        (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert _relative(actual, compiled(x)) <= tolerance


def _zero_points(directory: Path) -> list[np.ndarray | None]:
    """The zero points of each ``MatMulNBits`` node (None where it has none)."""
    model = onnx.load(str(directory / onnx_export.MODEL_FILE))
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    nodes = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    return [initializers[node.input[3]] if len(node.input) > 3 and node.input[3] else None for node in nodes]


# Zero points that are codes are packed uint8 like the codes (two 4-bit ones a byte, low nibble first, each row
# padded to whole bytes); 2-bit ones stay float32 (ONNX Runtime's faster 2-bit kernel), symmetric 2-bit grids write
# their zero point 2 as float32 for the same reason, and other symmetric grids write none (MatMulNBits' default zero
# point is theirs). The layer has 96 inputs: an odd number of 32-column blocks.
@pytest.mark.parametrize(
    ("weights", "dtype", "shape"),
    [
        ("rtn:bits=4,group_size=32,symmetric=false", np.uint8, (64, 2)),  # 3 blocks
        ("rtn:bits=4,group_size=64,symmetric=false", np.uint8, (64, 1)),  # 2 blocks, the last one partial
        ("gptq:bits=4,group_size=16,act_order=true,act_group_aware=false,symmetric=false", np.uint8, (64, 3)),
        ("rtn:bits=8,group_size=32,symmetric=false", np.uint8, (64, 3)),
        ("rtn:bits=2,group_size=16,symmetric=false", np.float32, (64, 6)),
        ("rtn:bits=2,group_size=16,symmetric=true", np.float32, (64, 6)),
        ("rtn:bits=4,group_size=32,symmetric=true", None, None),
        ("rtn:bits=8,group_size=32,symmetric=true", None, None),
    ],
)
def test_weight_only_zero_points(tmp_path: Path, weights: str, dtype: type | None, shape: tuple[int, int] | None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 64)).eval()
    calibration = [(torch.randn(4, 96, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    compiled = lowbit.compile(model, (torch.randn(3, 96),), passes=[weights], target="torch", calibration=calibration)
    directory = compiled.export(tmp_path / "layer", format="onnx")
    (zero_points,) = _zero_points(directory)
    assert zero_points is None if dtype is None else (zero_points.dtype, zero_points.shape) == (dtype, shape)
    if dtype is np.uint8 and "bits=4,group_size=32" in weights:
        zeros = dict(compiled.graph.named_buffers())["0.zeros"].to(torch.uint8).numpy()
        assert np.array_equal(zero_points & 15, zeros[:, 0::2]) and np.array_equal(zero_points[:, 0] >> 4, zeros[:, 1])
        assert not np.any(zero_points[:, 1] >> 4)  # the padding nibble
    if "bits=2,group_size=16,symmetric=true" in weights:
        assert np.all(zero_points == 2.0)
    session = _session(directory)
    for batch in (1, 5):
        x = torch.randn(batch, 96, generator=torch.Generator().manual_seed(batch))
        (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert _relative(actual, compiled(x)) <= 2e-6


@pytest.mark.parametrize(("bits", "op"), [(4, "MatMulNBits"), (8, "MatMul")])
def test_zero_points_that_are_not_codes(tmp_path: Path, bits: int, op: str):
    """Half-integer zero points stay float32 for ``MatMulNBits``; ONNX Runtime's 8-bit kernel takes none, so 8-bit
    weights with them are dequantized and multiplied in standard ops."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64)).eval()
    weights = f"rtn:bits={bits},group_size=32,symmetric=false"
    compiled = lowbit.compile(model, (torch.randn(3, 128),), passes=[weights], target="torch")
    zeros = dict(compiled.graph.named_buffers())["0.zeros"]
    zeros.add_(0.5)
    directory = compiled.export(tmp_path / "mlp", format="onnx")
    assert op in _ops(directory)
    if op == "MatMulNBits":
        assert _zero_points(directory)[0].dtype == np.float32
    session = _session(directory)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(5))
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert _relative(actual, compiled(x)) <= 2e-6


@pytest.mark.parametrize(("int8", "tolerance"), [("exact", 1e-5), ("fast", FAST_TOLERANCE)])
def test_bert_with_packed_embeddings(tmp_path: Path, int8: str, tolerance: float):
    passes = ["quantize_embeddings:bits=4,group_size=32", "rtn:bits=4,group_size=32", A8]
    ids = token_ids()
    compiled = lowbit.compile(tiny_bert(), (ids,), passes=passes, target="torch")
    directory = compiled.export(tmp_path / "bert", format="onnx", int8=int8)
    session = _session(directory)
    expected = compiled(ids)
    outputs = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    assert _relative(outputs[0], expected.last_hidden_state) <= tolerance


def test_the_artifact_is_checksummed_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    compiled = lowbit.compile(norm_mlp(), (torch.randn(3, 128),), passes=["rtn"], target="torch")
    directory = compiled.export(tmp_path / "mlp", format="onnx")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["target"] == "onnx" and set(manifest["files"]) == {onnx_export.MODEL_FILE}
    assert manifest["onnx"]["int8"] == onnx_export.DEFAULT_INT8 == "fast"
    lowbit.artifact.read_manifest(directory)
    with pytest.raises(ArtifactError, match="already exists"):
        compiled.export(directory, format="onnx")

    def fail(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("onnx_ir.save", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        compiled.export(tmp_path / "broken", format="onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp"]


@torch.library.custom_op("lowbit::untranslated", mutates_args=())
def _untranslated(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def test_an_op_without_translation_is_a_named_error():
    graph = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    x = graph.graph.placeholder("x")
    graph.graph.output(graph.graph.call_function(torch.ops.lowbit.untranslated.default, (x,)))
    graph.recompile()
    with pytest.raises(onnx_export.OnnxExportError, match="no ONNX translation for lowbit.untranslated"):
        onnx_export.to_onnx(graph, {"x": torch.randn(3, 4)})


def factory() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    return norm_mlp(), (torch.randn(3, 128),)


def test_cli_compile_writes_onnx(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    from lowbit.cli import main

    spec = f"{__name__}:factory"
    assert (
        main(["-q", "compile", spec, "--pass", "rtn:bits=4,group_size=32", "--export-onnx", str(tmp_path / "m")]) == 0
    )
    assert "exported ONNX to" in capsys.readouterr().out
    assert "MatMulNBits" in _ops(tmp_path / "m")


def a8_factory() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    return torch.nn.Sequential(torch.nn.Linear(128, 64)).eval(), (torch.randn(3, 128),)


def test_cli_onnx_int8_exact(tmp_path: Path):
    from lowbit.cli import main

    spec = f"{__name__}:a8_factory"
    passes = ["--pass", "rtn:bits=4,group_size=32", "--pass", A8]
    assert main(["-q", "compile", spec, *passes, "--export-onnx", str(tmp_path / "m"), "--onnx-int8", "exact"]) == 0
    assert "MatMulInteger" in _ops(tmp_path / "m")


def test_an_unknown_format_is_a_named_error(tmp_path: Path):
    compiled = lowbit.compile(norm_mlp(), (torch.randn(3, 128),), passes=["rtn"], target="torch")
    with pytest.raises(ArtifactError, match="unknown export format 'tflite'"):
        compiled.export(tmp_path / "x", format="tflite")


def test_an_unknown_int8_mode_is_a_named_error(tmp_path: Path):
    compiled = lowbit.compile(norm_mlp(), (torch.randn(3, 128),), passes=["rtn"], target="torch")
    with pytest.raises(onnx_export.OnnxExportError, match="unknown int8 mode 'fastest'; known: 'fast', 'exact'"):
        compiled.export(tmp_path / "x", format="onnx", int8="fastest")
    with pytest.raises(ArtifactError, match="int8='exact' applies to format='onnx' only"):
        compiled.export(tmp_path / "y", int8="exact")
    assert not any(tmp_path.iterdir())
