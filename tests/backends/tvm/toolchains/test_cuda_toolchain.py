"""Compiling for CUDA on a machine without a GPU: every CUDA recipe builds a model end to end,
export compiles the kernels with nvcc, and the artifact, the runner and tuning refuse clearly
what needs a GPU."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import torch
from torch import nn

import lowbit
from lowbit import zoo
from lowbit.backends.tvm import TVMBackend
from lowbit.backends.tvm.runner import CUDARunner, cuda_available
from lowbit.backends.tvm.toolchains import cuda
from lowbit.errors import ArtifactError, BackendError
from lowbit.passes import registry

pytestmark = pytest.mark.skipif(cuda_available(), reason="checks the GPU-less behaviour; test_cuda_gpu runs")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")

#: Recipe → kernel its layers must land on.
RECIPES = {
    "w4a16-cuda": "cuda_linear",
    "w8a8-cuda": "cuda_a8_linear",
    "w1.58a8-cuda": "cuda_a8_linear",
    "w2a8-cuda": "cuda_a8_linear",
    "w4a8-cuda": "cuda_a8_linear",
}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.LayerNorm(512), nn.Linear(512, 256), nn.Softmax(-1))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_cuda_recipe_compiles_an_mlp(recipe: str) -> None:
    x = torch.randn(4, 256)
    compiled = lowbit.compile(_mlp(), (x,), recipe=recipe, calibration=[(torch.randn(4, 256),) for _ in range(2)])
    runner = compiled._runner
    assert isinstance(runner, CUDARunner) and not runner.runnable and runner.arch == "sm_80"
    quantized = 1 if recipe.startswith("w1.58") else 2  # the ternary recipe keeps the last linear in floating point
    assert [linear.kernel for linear in runner.linears] == [RECIPES[recipe]] * quantized and not runner.fallbacks
    assert runner.source.count("threadIdx.x") > 0
    assert ("__dp4a" in runner.source) == RECIPES[recipe].endswith("a8_linear")
    with pytest.raises(BackendError, match="no CUDA device"):
        compiled(x)


@needs_nvcc
def test_export_embeds_the_nvcc_fatbin_and_load_refuses_without_a_gpu(tmp_path) -> None:
    x = torch.randn(2, 256)
    target = {"kind": "cuda", "arch": "sm_90"}
    compiled = lowbit.compile(_mlp(), (x,), recipe="w1.58a8-cuda", target=target)
    path = compiled.export(tmp_path / "mlp")
    assert {p.name for p in path.iterdir()} == {"manifest.json", "model.so", "signature.json"}
    signature = json.loads((path / "signature.json").read_text())
    fatbin = cuda.embedded_fatbin(path / "model.so")
    assert signature["cuda_arch"] == "sm_90" and fatbin[:4] == bytes.fromhex("50ed55ba")  # fatbin magic
    assert hashlib.sha256(fatbin).hexdigest() == signature["fatbin_sha256"]
    with pytest.raises(ArtifactError, match=r"target cuda \(sm_90\).*no CUDA device"):
        lowbit.load(path)


@pytest.mark.slow
def test_a_llama_block_compiles_with_int8_kernels() -> None:
    llama = zoo.build("llama-tiny")
    compiled = lowbit.compile(llama.model, (), example_kwargs=llama.example_kwargs, recipe="w1.58a8-cuda")
    runner = compiled._runner
    assert len(runner.linears) == 14 and {linear.kernel for linear in runner.linears} == {"cuda_a8_linear"}
    assert len(re.findall(r'^extern "C" __global__ .*\{$', runner.source, flags=re.MULTILINE)) > 20


def test_unsupported_layout_falls_back_with_its_reason() -> None:
    """3-bit codes have no CUDA kernel: the layer runs as a dequantized matmul, and the report says why."""
    compiled = lowbit.compile(
        _mlp(), (torch.randn(4, 256),), passes=[registry.get("rtn", bits=3, group_size=64)], target="cuda"
    )
    assert [linear.kernel for linear in compiled._runner.fallbacks] == ["dense", "dense"]
    assert "straddle" in compiled._runner.fallbacks[0].reason
    assert "straddle" in str(compiled.report)


def test_int8_layer_without_a_kernel_falls_back_on_fake_quantized_input() -> None:
    passes = [registry.get("rtn", bits=3, group_size=64), registry.get("quantize_activations", bits=8)]
    compiled = lowbit.compile(_mlp(), (torch.randn(4, 256),), passes=passes, target="cuda")
    assert [linear.kernel for linear in compiled._runner.fallbacks] == ["dense", "dense"]
    assert "lowbit_fake_quantize" in compiled._runner.source and "__dp4a" not in compiled._runner.source


def test_old_gpus_and_cuda_tuning_are_refused() -> None:
    with pytest.raises(BackendError, match="sm_75 is older than sm_80"):
        TVMBackend({"kind": "cuda", "arch": "sm_75"})
    gm = lowbit.trace(nn.Linear(8, 8), (torch.randn(1, 8),))
    with pytest.raises(BackendError, match="tuning CUDA kernels is not supported"):
        TVMBackend("cuda").compile(gm, (torch.randn(1, 8),), tune=True)


def test_partial_last_group_is_padded_onto_the_cuda_kernel() -> None:
    """in_features=96 in groups of 64: padded to whole groups (zero codes, zero inputs) as on the CPU."""
    model = nn.Sequential(nn.Linear(96, 64)).eval()
    compiled = lowbit.compile(
        model, (torch.randn(4, 96),), passes=[registry.get("rtn", bits=4, group_size=64)], target="cuda"
    )
    assert [(linear.kernel, linear.spec.in_features) for linear in compiled._runner.linears] == [("cuda_linear", 128)]
    assert not compiled._runner.fallbacks
