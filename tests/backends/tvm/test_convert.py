"""The lowering of low-bit linears: the first kernel of the toolchain's list that supports a layer runs it; without
one the fallback does, with the reason recorded; `LoweredLinear.kernel` names the kernel on every target."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

import lowbit
from lowbit import passes
from lowbit.backends.tvm.convert import FALLBACK, tiled_rows
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


def test_a_prime_row_count_is_padded_to_whole_register_tiles() -> None:
    """197 tokens (prime) run as 200 rows, so the kernels' register tiles get 8 rows instead of 1; counts with a
    divisor of at least 4 up to 8, and short ones, stay as they are. The padded rows leave the result unchanged."""
    assert [tiled_rows(rows) for rows in (197, 17, 18, 20, 104, 8, 7, 1)] == [200, 24, 18, 20, 104, 8, 7, 1]
    gm, inputs = _graph(rows=197, a8=True)
    lowering = lower(gm, inputs, CPUToolchain(resolve_target("x86")))
    assert [linear.spec.batch for linear in lowering.linears] == [200]
    compiled = lowbit.compile(gm, inputs, target="x86")
    torch.testing.assert_close(compiled(*inputs), gm(*inputs), rtol=0, atol=1e-5)
