"""lowbit.compile through TVM for x86/ARM, export of the compiled library, and load checks."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit import artifact
from lowbit.backends import get_backend
from lowbit.backends.tvm import ARM_CXX_PACKAGE, LIBRARY_FILE, TVMBackend
from lowbit.errors import ArtifactError, BackendError

from helpers import norm_mlp

ELF_MACHINE_AARCH64 = 183
ELF_MACHINE_X86_64 = 62


def _elf_machine(path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


@pytest.fixture(scope="module")
def compiled_x86() -> lowbit.CompiledModel:
    return lowbit.compile(norm_mlp(), (torch.randn(4, 128),), recipe="w4a16-x86")


def test_recipe_target_compiles_through_tvm(compiled_x86) -> None:
    x = torch.randn(4, 128)
    assert compiled_x86.report.target == "x86"
    assert isinstance(get_backend("x86"), TVMBackend)
    assert [linear.kernel for linear in compiled_x86._runner.linears] == ["packed_gemm", "packed_gemm"]  # 4 rows
    with torch.no_grad():
        expected = compiled_x86.graph(x)
    got = compiled_x86(x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5
    # The report compares with the fp32 model: the error of the 4-bit weights, not of TVM.
    assert 0 < compiled_x86.report.rel_error < 0.2


def test_export_load_reproduces_outputs(compiled_x86, tmp_path) -> None:
    path = compiled_x86.export(tmp_path / "x86")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"] == "x86" and set(manifest["files"]) == {"model.so", "signature.json"}
    assert _elf_machine(path / LIBRARY_FILE) == ELF_MACHINE_X86_64
    loaded = lowbit.load(path)
    x = torch.randn(4, 128)
    assert torch.equal(loaded(x), compiled_x86(x))
    assert loaded.runner.linears == compiled_x86.runner.linears
    with pytest.raises(BackendError, match="compiled for inputs"):
        loaded(torch.randn(5, 128))


def test_a_cnn_with_int8_convolutions_loads_back(tmp_path) -> None:
    """The saved signature keeps a convolution kernel's spec as a `ConvSpec` (image, kernel, stride, ...)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(512, 8)
    )
    x = torch.randn(1, 16, 4, 4)
    compiled = lowbit.compile(net.eval(), (x,), recipe="w8a8-x86", calibration=[(torch.randn(2, 16, 4, 4),)])
    assert any(linear.spec.__class__.__name__ == "ConvSpec" for linear in compiled.runner.linears)
    loaded = lowbit.load(compiled.export(tmp_path / "cnn"))
    assert loaded.runner.linears == compiled.runner.linears
    assert torch.equal(loaded(x), compiled(x))


def test_corrupted_library_is_refused(compiled_x86, tmp_path) -> None:
    path = compiled_x86.export(tmp_path / "bad")
    with (path / LIBRARY_FILE).open("r+b") as handle:
        handle.seek(64)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match="checksum mismatch for model.so"):
        lowbit.load(path)


def test_library_needing_missing_cpu_features_is_refused(compiled_x86, tmp_path) -> None:
    path = compiled_x86.export(tmp_path / "future")
    signature = json.loads((path / "signature.json").read_text())
    signature["features"].append("avx10.2-512")  # no CPU LLVM knows has this
    (path / "signature.json").write_text(json.dumps(signature))
    with pytest.raises(ArtifactError, match="avx10.2-512"):
        TVMBackend("x86").load(path)


def test_arm_export_is_an_aarch64_library_that_x86_refuses(tmp_path) -> None:
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip(f"needs {ARM_CXX_PACKAGE}")
    gm = lowbit.passes.Pipeline([lowbit.passes.get("rtn")])(torch.fx.symbolic_trace(norm_mlp()))
    runner = TVMBackend("arm").compile(gm, (torch.randn(2, 128),))
    path = artifact.write(tmp_path / "arm", "arm", runner, {"recipe": None})
    assert _elf_machine(path / LIBRARY_FILE) == ELF_MACHINE_AARCH64
    with pytest.raises(ArtifactError, match="library for aarch64; this machine is x86_64"):
        lowbit.load(path)


def test_arm_export_without_cross_compiler_names_the_package(tmp_path, monkeypatch) -> None:
    runner = TVMBackend("arm").compile(torch.fx.symbolic_trace(nn.Linear(16, 8)), (torch.randn(2, 16),))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BackendError, match=re.escape(ARM_CXX_PACKAGE)):
        TVMBackend("arm").save(runner, tmp_path)


def test_cuda_goes_through_tvm_from_sm80_on() -> None:
    for target in ("cuda", {"kind": "cuda", "arch": "sm_90"}):
        assert get_backend(target).target.kind.name == "cuda"
    with pytest.raises(BackendError, match="older than sm_80"):
        get_backend({"kind": "cuda", "arch": "sm_75"})
