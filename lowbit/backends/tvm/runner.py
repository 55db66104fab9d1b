"""Runners: a built Relax VM executable called with torch tensors, and the signature saved next to its library.

`Runner` binds the inputs (positionally or by placeholder name) and checks them against the compiled shapes (a
symbolic dimension against its range: `InputShapeError`) and dtypes, hands them to TVM, and returns torch tensors.
Subclasses say only on which device the module runs (`CPURunner`: this CPU, when the library is for this
architecture; `CUDARunner`: ``tvm.cuda(0)``, where there is a GPU) and what their signature adds. A runner that
cannot run here still exists for export (``runnable`` False).
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import tvm
from tvm import relax
from tvm.target import Target

from lowbit.backends.tvm.convert import LoweredLinear, fallbacks
from lowbit.backends.tvm.frontend import InputSpec
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec
from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.target import cuda_arch, host_arch
from lowbit.errors import BackendError
from lowbit.interface import Interface
from lowbit.ir.shapes import SymbolicDim, check_symbolic

#: The shared library a saved module is exported to (weights embedded as constants).
LIBRARY_FILE = "model.so"
#: The JSON next to it: target details, the inputs and the lowered linears.
SIGNATURE_FILE = "signature.json"
#: Alignment of a tensor's data that TVM's DLPack import requires.
DLPACK_ALIGNMENT = 64


class Runner(ABC):
    """Runs a compiled graph through ``relax.VirtualMachine`` on ``device`` (None: not runnable here).

    Called with the graph's inputs, positionally or by placeholder name; returns a tensor, or
    a flat tuple of tensors for a graph with several outputs. ``tuning`` lists the knobs chosen per
    low-bit kernel signature (with times where measured).
    """

    #: TVM's name of the device inputs are copied to (``"cpu"``, ``"cuda"``).
    device_type: ClassVar[str]
    #: What calls must satisfy (index ranges, finite floats), set by `lowbit.compile` and saved in the signature.
    interface: Interface = Interface()
    #: The symbolic dimensions of the inputs by name, with the range of sizes the module serves (saved with it).
    dims: Mapping[str, SymbolicDim] = {}

    def __init__(
        self,
        executable: Any,
        device: Any,
        inputs: Sequence[InputSpec],
        linears: Sequence[LoweredLinear] = (),
        tuning: Sequence[Any] = (),
    ) -> None:
        self.executable = executable
        self.inputs = list(inputs)
        self.linears = list(linears)
        self.tuning = list(tuning)
        self._main = relax.VirtualMachine(executable, device)["main"] if device is not None else None

    @property
    def runnable(self) -> bool:
        """Whether this machine can run the module."""
        return self._main is not None

    @property
    def fallbacks(self) -> list[LoweredLinear]:
        """Low-bit linears that run as dequantized fp32 dense kernels (with the reason)."""
        return fallbacks(self.linears)

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        if not self.runnable:
            raise BackendError(self.not_runnable())
        values = self.bind(args, kwargs)
        self.interface.check(values, {})
        device = self.output_device(values)
        return to_torch(self._main(*[to_tvm(v, self.device_type) for v in values]), device)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
        """The inputs in graph order, checked against the compiled shapes and dtypes."""
        names = [spec.name for spec in self.inputs]
        unknown = sorted(set(kwargs) - set(names[len(args) :]))
        if len(args) > len(names) or unknown:
            raise BackendError(f"this module takes inputs {names}, got {len(args)} positional and {sorted(kwargs)}")
        values = list(args) + [kwargs.get(name) for name in names[len(args) :]]
        self.check_shapes(values)
        for spec, value in zip(self.inputs, values):
            dtype = str(value.dtype).removeprefix("torch.")
            if dtype != spec.dtype:
                raise BackendError(
                    f"input '{spec.name}' is {dtype}, but this module was compiled for {spec.dtype}: convert it "
                    f"(.to(torch.{spec.dtype})) or compile it again for {dtype}"
                )
        return values

    def check_shapes(self, values: Sequence[Any]) -> None:
        """`BackendError` for inputs of another rank or static size than compiled; `InputShapeError` for a symbolic
        dimension outside its range, or one symbol at two sizes."""
        names = [spec.name for spec in self.inputs]
        expected = [spec.shape for spec in self.inputs]
        got = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]
        if any(
            isinstance(shape, str)
            or len(shape) != len(spec)
            or any(isinstance(d, int) and d != size for d, size in zip(spec, shape))
            for spec, shape in zip(expected, got)
        ):
            raise BackendError(
                f"this module was compiled for inputs {names} of shapes {expected}, got {got}; "
                "compile it again for new shapes"
                + (" (or with dynamic_shapes for a range of them)" if not self.dims else "")
            )
        axes = {
            spec.name: {axis: self.dims[d] for axis, d in enumerate(spec.shape) if isinstance(d, str)}
            for spec in self.inputs
        }
        check_symbolic(axes, dict(zip(names, values)))

    @abstractmethod
    def not_runnable(self) -> str:
        """Why this machine cannot run the module."""

    def output_device(self, inputs: Sequence[torch.Tensor]) -> torch.device | None:
        """The torch device outputs are moved to (None: where TVM left them)."""
        return None

    def signature(self) -> dict[str, Any]:
        """What a saved library needs to be loaded and called again (`write_signature`)."""
        return {
            "inputs": [dataclasses.asdict(spec) for spec in self.inputs],
            "linears": [dataclasses.asdict(linear) for linear in self.linears],
            "interface": self.interface.as_dict(),
            **({"dims": {name: [dim.low, dim.high] for name, dim in self.dims.items()}} if self.dims else {}),
        }


class CPURunner(Runner):
    """A module for an LLVM CPU target; runs in-process when built for this machine's architecture."""

    device_type = "cpu"

    def __init__(
        self,
        executable: Any,
        arch: str,
        features: Sequence[str],
        inputs: Sequence[InputSpec],
        linears: Sequence[LoweredLinear] = (),
        tuning: Sequence[Any] = (),
    ) -> None:
        self.arch = arch
        self.features = list(features)
        super().__init__(executable, tvm.cpu() if arch == host_arch() else None, inputs, linears, tuning)

    def not_runnable(self) -> str:
        return (
            f"this module is cross-compiled for {self.arch} and cannot run on this {host_arch()} machine; "
            "export it and run it on the device"
        )

    def signature(self) -> dict[str, Any]:
        return {"arch": self.arch, "features": self.features, **super().signature()}


class CUDARunner(Runner):
    """A module for a CUDA target; runs on ``tvm.cuda(0)`` where there is one.

    Inputs are torch tensors (CPU or CUDA); outputs come back on the device of the first
    input. ``source`` is the CUDA source of its kernels (what export compiles with nvcc).
    """

    device_type = "cuda"

    def __init__(
        self,
        executable: Any,
        target: Target,
        inputs: Sequence[InputSpec],
        linears: Sequence[LoweredLinear] = (),
        source: str | None = None,
        tuning: Sequence[Any] = (),
    ) -> None:
        self.target = target
        self.arch = cuda_arch(target)
        self.source = source
        super().__init__(executable, tvm.cuda(0) if cuda_available() else None, inputs, linears, tuning)

    def not_runnable(self) -> str:
        return (
            f"this module is compiled for CUDA {self.arch} and this machine has no CUDA device; "
            "export it and run it on a GPU machine"
        )

    def output_device(self, inputs: Sequence[torch.Tensor]) -> torch.device | None:
        return inputs[0].device if inputs else torch.device("cpu")


def cuda_available() -> bool:
    """Whether TVM's CUDA runtime is loaded and sees a device (needs the NVIDIA driver)."""
    return bool(tvm.runtime.enabled("cuda")) and bool(tvm.cuda(0).exist)


def write_signature(directory: Path, signature: Mapping[str, Any]) -> None:
    """Write ``signature`` (`Runner.signature`, plus what export adds) as `SIGNATURE_FILE`."""
    (Path(directory) / SIGNATURE_FILE).write_text(json.dumps(dict(signature), indent=2) + "\n")


def read_signature(directory: Path) -> dict[str, Any]:
    """The signature saved in ``directory``."""
    return json.loads((Path(directory) / SIGNATURE_FILE).read_text())


def signature_inputs(signature: Mapping[str, Any]) -> list[InputSpec]:
    """The `InputSpec` list of a saved signature."""
    return [InputSpec(item["name"], tuple(item["shape"]), item["dtype"]) for item in signature["inputs"]]


def signature_dims(signature: Mapping[str, Any]) -> dict[str, SymbolicDim]:
    """The symbolic dimensions of a saved signature (none for libraries of static shapes)."""
    return {name: SymbolicDim(name, int(low), int(high)) for name, (low, high) in signature.get("dims", {}).items()}


def signature_interface(signature: Mapping[str, Any]) -> Interface:
    """The `Interface` of a saved signature (an empty one for libraries saved before it was recorded)."""
    return Interface.from_dict(signature.get("interface"))


def signature_linears(signature: Mapping[str, Any]) -> list[LoweredLinear]:
    """The `LoweredLinear` list of a saved signature."""
    return [
        LoweredLinear(
            item["node"],
            saved_spec(item["spec"]),
            item["kernel"],
            item["reason"],
            item.get("nearest"),  # absent from signatures written before it was recorded
            item.get("layer"),
        )
        for item in signature["linears"]
    ]


def saved_spec(fields: Mapping[str, Any]) -> PackedLinearSpec:
    """The kernel spec of a saved signature: a `ConvSpec` where the fields hold a convolution's (JSON lists back
    to tuples)."""
    values = {name: tuple(value) if isinstance(value, list) else value for name, value in fields.items()}
    return (ConvSpec if "image" in values else PackedLinearSpec)(**values)


def to_tvm(value: torch.Tensor, device: str = "cpu") -> tvm.runtime.Tensor:
    """``value`` as a TVM tensor, contiguous on ``device`` and shared where possible; copied once more when its data
    is not `DLPACK_ALIGNMENT`-aligned (a slice, an array from numpy), which TVM's DLPack import refuses."""
    tensor = value.detach().to(device).contiguous()
    if tensor.data_ptr() % DLPACK_ALIGNMENT:
        tensor = tensor.clone()
    return tvm.runtime.from_dlpack(tensor)


def to_torch(value: Any, device: torch.device | None = None) -> Any:
    """VM results (a tensor or nested tuples of them) as torch tensors, moved to ``device`` if given."""
    if isinstance(value, tvm.runtime.Tensor):
        tensor = torch.from_dlpack(value)
        return tensor if device is None else tensor.to(device)
    return tuple(to_torch(item, device) for item in value)


__all__ = [
    "DLPACK_ALIGNMENT",
    "LIBRARY_FILE",
    "SIGNATURE_FILE",
    "CPURunner",
    "CUDARunner",
    "Runner",
    "cuda_available",
    "read_signature",
    "signature_dims",
    "signature_inputs",
    "signature_interface",
    "signature_linears",
    "to_torch",
    "to_tvm",
    "write_signature",
]
