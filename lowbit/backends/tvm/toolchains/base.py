"""The `Toolchain` interface: what differs between TVM targets (kernels, fallback, schedule, build, export)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import tvm
from tvm import relax
from tvm.target import Target

from lowbit.backends.tvm.convert import Lowering
from lowbit.backends.tvm.kernels.spec import LinearKernel, PackedLinearSpec, Tensors
from lowbit.backends.tvm.runner import Runner


class Toolchain(ABC):
    """Kernels, fallback, schedule, build, save and load for one TVM target."""

    #: How messages name the target.
    name: str

    def __init__(self, target: Target) -> None:
        self.target = target

    @abstractmethod
    def kernels(self, spec: PackedLinearSpec) -> Sequence[LinearKernel]:
        """The kernels that may take a layer like ``spec``, in order of preference."""

    @abstractmethod
    def fallback(self, bb: relax.BlockBuilder, x: relax.Expr, spec: PackedLinearSpec, tensors: Tensors) -> relax.Expr:
        """``x · Wᵀ + b`` (``x̂`` for int8 activations) with the weight dequantized at compile time."""

    def constant_linear(
        self, bb: relax.BlockBuilder, x: relax.Expr, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> relax.Expr | None:
        """An fp32 linear with a constant weight, or None to keep Relax's ``linear`` (`frontend.ConstantLinear`)."""
        return None

    def check_tuning(self, tune: Any) -> None:
        """Raise `BackendError` if this target cannot tune with ``tune`` (a compile's ``tune=``)."""
        return None

    @abstractmethod
    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        """Legalize the Relax module and schedule every TIR function of it."""

    @abstractmethod
    def build(self, lowering: Lowering, tuning: Sequence[Any] = ()) -> Runner:
        """Schedule and compile a lowered module for the VM; a runner for it."""

    @abstractmethod
    def save(self, runner: Runner, directory: Path) -> list[str]:
        """Export ``runner`` into ``directory``; the names of the files written."""

    @abstractmethod
    def load(self, directory: Path, signature: Mapping[str, Any]) -> Runner:
        """A runner for a module saved in ``directory`` with ``signature``, after checking this machine can run it."""


__all__ = ["Toolchain"]
