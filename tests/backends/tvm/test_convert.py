"""The lowering of low-bit linears: the first kernel of the toolchain's list that supports a layer runs it; without
one the fallback does, with the reason recorded; `LoweredLinear.kernel` names the kernel on every target."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from lowbit import passes
from lowbit.backends.tvm.convert import FALLBACK
from lowbit.backends.tvm.kernels.generic import packed_gemm, packed_linear
from lowbit.backends.tvm.kernels.spec import LinearKernel, PackedLinearSpec, Tensors
from lowbit.backends.tvm.lowering import lower
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.toolchains import CPUToolchain, CUDAToolchain


class Declining(packed_linear.PackedLinear):
    """A kernel that takes no layer, for ``reason``."""

    name = "declining"

    def __init__(self, reason: str = "declines every layer") -> None:
        self.reason = reason

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target) -> str | None:
        return self.reason


class Listed(CPUToolchain):
    """The CPU toolchain with a given kernel list."""

    def __init__(self, kernels: list[LinearKernel]) -> None:
        super().__init__(resolve_target("x86"))
        self.listed = kernels

    def kernels(self, spec: PackedLinearSpec) -> list[LinearKernel]:
        return self.listed


def _graph(rows: int = 1, a8: bool = False) -> tuple[fx.GraphModule, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    pipeline = [passes.get("rtn", bits=4, group_size=32)] + ([passes.get("quantize_activations")] if a8 else [])
    return passes.Pipeline(pipeline)(fx.symbolic_trace(nn.Sequential(nn.Linear(64, 32)))), (torch.randn(rows, 64),)


def test_the_first_kernel_that_supports_the_layer_runs_it() -> None:
    gm, inputs = _graph()
    lowering = lower(gm, inputs, Listed([Declining(), packed_linear.KERNEL, packed_gemm.KERNEL]))
    assert [(linear.kernel, linear.reason) for linear in lowering.linears] == [("packed_linear", None)]
    assert not lowering.fallbacks


def test_without_a_supporting_kernel_the_fallback_runs_with_the_last_reason() -> None:
    gm, inputs = _graph()
    lowering = lower(gm, inputs, Listed([Declining("first"), Declining("last")]))
    assert [(linear.kernel, linear.reason) for linear in lowering.fallbacks] == [(FALLBACK, "last")]
    lowering = lower(gm, inputs, Listed([]))
    assert [linear.kernel for linear in lowering.fallbacks] == [FALLBACK]
    assert "has no kernel for float activations" in lowering.fallbacks[0].reason


def test_lowered_linears_name_their_kernel_on_cpu_and_cuda() -> None:
    gm, inputs = _graph(rows=8)
    cpu = lower(gm, inputs, CPUToolchain(resolve_target("x86")))
    cuda = lower(gm, inputs, CUDAToolchain(resolve_target("cuda")))
    assert [linear.kernel for linear in cpu.linears] == ["packed_gemm"]
    assert [linear.kernel for linear in cuda.linears] == ["cuda_linear"]
    gm, inputs = _graph(rows=2, a8=True)
    assert [linear.kernel for linear in lower(gm, inputs, CPUToolchain(resolve_target("x86"))).linears] == [
        "a8_linear_x86"
    ]
    assert [linear.kernel for linear in lower(gm, inputs, CPUToolchain(resolve_target("arm"))).linears] == [
        "a8_linear_arm"
    ]
    assert [linear.kernel for linear in lower(gm, inputs, CUDAToolchain(resolve_target("cuda"))).linears] == [
        "cuda_a8_linear"
    ]
