"""Toolchain resolution and the kernel lists each toolchain hands the lowering."""

from __future__ import annotations

import pytest

from lowbit.backends.tvm import TVMBackend
from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.toolchains import (
    CPUToolchain,
    CUDAToolchain,
    resolve_toolchain,
)
from lowbit.errors import BackendError


def _spec(rows: int, a8: bool = False) -> PackedLinearSpec:
    return PackedLinearSpec(rows, 128, 32, 4, 64, False, True, act_bits=8 if a8 else None)


def test_the_target_kind_picks_the_toolchain() -> None:
    assert isinstance(TVMBackend("x86").toolchain, CPUToolchain)
    assert isinstance(TVMBackend("arm").toolchain, CPUToolchain)
    assert isinstance(TVMBackend("cuda").toolchain, CUDAToolchain)
    with pytest.raises(BackendError, match="lowers for CPU \\(llvm\\) and CUDA targets, not 'c'"):
        resolve_toolchain(resolve_target({"kind": "c"}))


@pytest.mark.parametrize(
    ("target", "rows", "a8", "kernels"),
    [
        ("x86", 1, False, ["packed_linear"]),
        ("x86", 3, False, ["packed_linear"]),
        ("x86", 4, False, ["packed_gemm", "packed_linear"]),
        ("arm", 32, False, ["packed_gemm", "packed_linear"]),
        ("x86", 1, True, ["a8_linear_x86"]),
        ("arm", 8, True, ["a8_linear_arm"]),
        ("cuda", 1, False, ["cuda_linear"]),
        ("cuda", 8, True, ["cuda_a8_linear"]),
    ],
)
def test_kernel_lists(target: str, rows: int, a8: bool, kernels: list[str]) -> None:
    toolchain = resolve_toolchain(resolve_target(target))
    assert [kernel.name for kernel in toolchain.kernels(_spec(rows, a8))] == kernels


def test_an_architecture_without_an_int8_kernel_has_an_empty_list() -> None:
    riscv = resolve_toolchain(resolve_target({"kind": "llvm", "mtriple": "riscv64-linux-gnu"}))
    assert list(riscv.kernels(_spec(1, a8=True))) == []
    assert [kernel.name for kernel in riscv.kernels(_spec(1))] == ["packed_linear"]


def test_cuda_refuses_tuning() -> None:
    with pytest.raises(BackendError, match="tuning CUDA kernels is not supported"):
        CUDAToolchain(resolve_target("cuda")).check_tuning(True)
    CUDAToolchain(resolve_target("cuda")).check_tuning(None)
    CPUToolchain(resolve_target("x86")).check_tuning(True)
