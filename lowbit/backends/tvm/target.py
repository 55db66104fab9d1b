"""Map lowbit target names to TVM targets.

``"x86"`` is the machine compiling (LLVM's host CPU detection, so ``mcpu`` names the
real micro-architecture and code uses every vector extension it has); ``"arm"`` is a
generic aarch64 CPU with NEON and the dot-product extension; ``"cuda"`` is sm_80 with a
generic x86-64 host (choose another GPU with ``{"kind": "cuda", "arch": "sm_90"}``; sm_80
and newer). A TVM target dict (or a ``tvm.target.Target``) is passed through unchanged, so
users can name any other machine. TVM 0.27 only accepts targets as dicts or JSON, not
the old ``"llvm -mcpu=..."`` strings.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping
from typing import Any

from tvm.target import Target, codegen

from lowbit.errors import BackendError

log = logging.getLogger(__name__)

TARGET_NAMES: tuple[str, ...] = ("x86", "arm", "cuda")

#: Used when compiling for x86 on a machine that is not x86: x86-64-v3 is AVX2 + FMA.
PORTABLE_X86_CPU = "x86-64-v3"
ARM_TARGET: dict[str, Any] = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
CUDA_ARCH = "sm_80"
#: Oldest CUDA compute capability the CUDA kernels are built for (Ampere: dp4a, async copies).
MIN_CUDA_ARCH = 80
#: Host side of CUDA modules (kernel launches, VM glue): generic x86-64, so any x86 GPU host runs it.
CUDA_HOST: dict[str, Any] = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


def resolve_target(target: str | Mapping[str, Any] | Target) -> Target:
    """The TVM target for a lowbit target name, a TVM target dict or a ``Target``."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        return _named_target(target)
    if isinstance(target, Mapping):
        if "kind" not in target:
            raise BackendError("a target dict needs a 'kind' key (e.g. {'kind': 'llvm', 'mcpu': 'znver3'})")
        if target["kind"] == "cuda":
            return _cuda_target(dict(target))
        return _make_target(dict(target))
    raise BackendError(
        f"a target is a name ({', '.join(TARGET_NAMES)}) or a TVM target dict, not {type(target).__name__}"
    )


def x86_host_target() -> dict[str, Any]:
    """The x86 target of this machine: detected ``mcpu`` and the number of usable cores."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("host is %s, not x86: compiling x86 code for %s", platform.machine(), PORTABLE_X86_CPU)
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": PORTABLE_X86_CPU, "num-cores": 1}
    cpu = codegen.llvm_get_system_cpu()
    spec: dict[str, Any] = {"kind": "llvm", "mcpu": cpu, "num-cores": _usable_cores()}
    if not has_features(Target(spec), "avx2"):
        log.warning("LLVM reports host CPU '%s' without AVX2: vector kernels will be slow", cpu)
    return spec


def has_features(target: Target, *features: str) -> bool:
    """Whether an LLVM target's CPU has all ``features`` (LLVM names: ``avx2``, ``avx512f``, ``dotprod``)."""
    if target.kind.name != "llvm":
        return False
    return bool(codegen.llvm_cpu_has_features(list(features), target))


def float32_lanes(target: Target) -> int:
    """fp32 lanes of the widest vector register of an LLVM CPU target (AVX-512: 16, AVX2: 8, NEON: 4).

    On x86 this comes from the CPU features: LLVM's own vector-width query answers 512
    bits for every x86 CPU in TVM 0.27, AVX2-only ones included.
    """
    if target.kind.name != "llvm":
        raise BackendError(f"float32_lanes needs an LLVM CPU target, got kind '{target.kind.name}'")
    if target_arch(target) == "x86_64":
        if has_features(target, "avx512f"):
            return 16
        return 8 if has_features(target, "avx") else 4
    return max(4, int(codegen.llvm_get_vector_width(target)) // 32)


def runs_on_host(target: Target) -> bool:
    """Whether code built for ``target`` can run in this process (an LLVM target for this CPU architecture)."""
    return target.kind.name == "llvm" and target_arch(target) == host_arch()


def target_arch(target: Target) -> str:
    """The CPU architecture an LLVM target compiles for (``x86_64``, ``aarch64``)."""
    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    return _arch(triple.split("-")[0])


def host_arch() -> str:
    """This machine's CPU architecture, named as in target triples (``x86_64``, ``aarch64``)."""
    return _arch(platform.machine())


def _arch(name: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name.lower(), name.lower())


def _named_target(name: str) -> Target:
    if name == "x86":
        return _make_target(x86_host_target())
    if name == "arm":
        return _make_target(dict(ARM_TARGET))
    if name == "cuda":
        return _cuda_target({"kind": "cuda", "arch": CUDA_ARCH})
    raise BackendError(f"unknown target '{name}'; choose one of {', '.join(TARGET_NAMES)} or a TVM target dict")


def cuda_arch(target: Target) -> str:
    """The ``sm_XX`` a CUDA target compiles for; `BackendError` for other kinds and for archs before sm_80."""
    if target.kind.name != "cuda":
        raise BackendError(f"expected a CUDA target, got kind '{target.kind.name}'")
    arch = str(target.attrs["arch"])  # TVM checks its form (sm_XX) and sets a default
    if int(arch[3:].rstrip("af")) < MIN_CUDA_ARCH:
        raise BackendError(
            f"CUDA target {arch} is older than sm_{MIN_CUDA_ARCH}; the CUDA backend needs sm_80 or newer"
        )
    return arch


def _cuda_target(spec: dict[str, Any]) -> Target:
    """A CUDA target with the generic x86-64 host unless ``spec`` names one; the arch is checked."""
    host = spec.pop("host", CUDA_HOST)
    spec.setdefault("arch", CUDA_ARCH)
    target = _make_target(spec, host=dict(host))
    cuda_arch(target)
    return target


def _make_target(spec: dict[str, Any], host: dict[str, Any] | None = None) -> Target:
    try:
        return Target(spec, host=host) if host is not None else Target(spec)
    except (ValueError, TypeError, RuntimeError) as error:
        raise BackendError(f"TVM rejected target {spec!r}: {error}") from error


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


__all__ = [
    "TARGET_NAMES",
    "cuda_arch",
    "float32_lanes",
    "has_features",
    "host_arch",
    "resolve_target",
    "runs_on_host",
    "target_arch",
    "x86_host_target",
]
