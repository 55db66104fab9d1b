"""Toolchains: what differs between the TVM targets, behind one small interface.

A `Toolchain` says which kernels take a low-bit layer (an ordered list; the lowering takes the first that supports
the layer), how a layer no kernel takes runs (`Toolchain.fallback`), how fp32 linears with a constant weight are
emitted, how the Relax module is scheduled and built into a `runner.Runner`, and how a runner is saved and loaded.
`resolve_toolchain` picks the toolchain of a target once: `cpu.CPUToolchain` for LLVM targets (x86 and aarch64),
`cuda.CUDAToolchain` for CUDA.
"""

from __future__ import annotations

from tvm.target import Target

from lowbit.backends.tvm.toolchains.base import Toolchain
from lowbit.backends.tvm.toolchains.cpu import CPUToolchain
from lowbit.backends.tvm.toolchains.cuda import CUDAToolchain
from lowbit.errors import BackendError

#: The toolchain of each TVM target kind.
TOOLCHAINS: dict[str, type[Toolchain]] = {"llvm": CPUToolchain, "cuda": CUDAToolchain}


def resolve_toolchain(target: Target) -> Toolchain:
    """The toolchain of ``target``: LLVM CPU targets and CUDA targets are supported."""
    if target.kind.name not in TOOLCHAINS:
        raise BackendError(f"the TVM backend lowers for CPU (llvm) and CUDA targets, not '{target.kind.name}'")
    return TOOLCHAINS[target.kind.name](target)


__all__ = ["TOOLCHAINS", "CPUToolchain", "CUDAToolchain", "Toolchain", "resolve_toolchain"]
