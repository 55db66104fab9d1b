"""The TVM backend: a lowbit GraphModule compiled to a Relax VM executable.

    from lowbit.backends.tvm import TVMBackend
    runner = TVMBackend("x86").compile(gm, example_inputs)
    y = runner(x)                      # torch tensors in, torch tensors out
    runner.fallbacks                   # packed layers running as dequantized fp32
    files = TVMBackend("x86").save(runner, directory)   # model.so + signature.json
    runner = TVMBackend("x86").load(directory)

Parts: `target` (lowbit target names → TVM targets), `kernels` (TIR generators),
`schedule` (default CPU schedules for fp32 operators), `lower` (GraphModule → Relax,
build), `tuning` (knob search for the low-bit kernels with a persistent database:
``compile(..., tune=True, cache_dir=...)``; ``runner.tuning`` lists the knobs chosen).
The module is specialized to the shapes of the example inputs. LLVM CPU targets
compile (``x86``; ``arm`` cross-compiles; or a TVM target dict) and modules for this
machine's architecture run in-process; ``cuda`` (or ``{"kind": "cuda", "arch":
"sm_90"}``) builds CUDA kernels (`cuda`: a `cuda.CUDARunner`, runnable where there is a
GPU; its export compiles the kernels with nvcc into a fatbin next to the library). Saved
modules are shared libraries with the weights embedded as constants; loading checks
that this machine has the architecture and CPU features the library was built for.
TVM's thread pool uses every core this process may run on unless ``TVM_NUM_THREADS`` says
otherwise (TVM's own default is half the hardware threads).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

# Read when TVM's thread pool starts (the first parallel kernel), so setting it here is in time.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import tvm  # noqa: E402
from tvm import relax
from tvm.support import cc
from tvm.target import Target

import lowbit.ir.ops  # noqa: F401  (registers torch.ops.lowbit before a graph is lowered)
from lowbit.backends.tvm import cuda
from lowbit.backends.tvm.lower import InputSpec, LoweredLinear, build, lower, to_tvm
from lowbit.backends.tvm.kernels.packed_linear import PackedLinearSpec
from lowbit.backends.tvm.target import has_features, host_arch, resolve_target, target_arch, x86_host_target
from lowbit.backends.tvm.tuning import Tuner, TuningOptions, TuningResult, default_cache_dir
from lowbit.errors import ArtifactError, BackendError

log = logging.getLogger(__name__)

LIBRARY_FILE = "model.so"
SIGNATURE_FILE = "signature.json"
#: The aarch64 cross compiler used to link ARM libraries, and the Debian package that has it.
ARM_CXX = "aarch64-linux-gnu-g++"
ARM_CXX_PACKAGE = "g++-aarch64-linux-gnu"
#: x86 features a library may be compiled to use; loading checks the host has each one the library needs.
X86_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni")


class TVMRunner:
    """Runs a compiled graph on the CPU through ``relax.VirtualMachine``.

    Called with the graph's inputs, positionally or by placeholder name; returns a
    tensor, or a flat tuple of tensors for a graph with several outputs. ``tuning`` lists
    the knobs chosen per low-bit kernel signature (with times where measured). A module built
    for another architecture (``"arm"`` on x86) keeps its ``executable`` for export but
    cannot be called here.
    """

    def __init__(self, module: Any, arch: str, features: Sequence[str], inputs: Sequence[InputSpec],
                 linears: Sequence[LoweredLinear] = (), tuning: Sequence[TuningResult] = ()) -> None:
        self.executable = module
        self.arch = arch
        self.features = list(features)
        self.inputs = list(inputs)
        self.linears = list(linears)
        self.tuning = list(tuning)
        self._main = None
        if arch == host_arch():
            self._main = relax.VirtualMachine(module, tvm.cpu())["main"]

    @property
    def runnable(self) -> bool:
        """Whether this machine can run the module (False for a cross-compiled one)."""
        return self._main is not None

    @property
    def fallbacks(self) -> list[LoweredLinear]:
        """Packed linears that run as dequantized fp32 dense kernels (with the reason)."""
        return [linear for linear in self.linears if linear.kernel == "dense"]

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        if not self.runnable:
            raise BackendError(
                f"this module is cross-compiled for {self.arch} and cannot run on this {host_arch()} machine; "
                "export it and run it on the device"
            )
        inputs = self._bind(args, kwargs)
        tensors = [to_tvm(t) for t in inputs]
        return _to_torch(self._main(*tensors))

    def _bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
        """The inputs in graph order, checked against the compiled shapes and dtypes."""
        names = [spec.name for spec in self.inputs]
        unknown = sorted(set(kwargs) - set(names[len(args):]))
        if len(args) > len(names) or unknown:
            raise BackendError(f"this module takes inputs {names}, got {len(args)} positional and {sorted(kwargs)}")
        values = list(args) + [kwargs.get(name) for name in names[len(args):]]
        got = [(tuple(v.shape), str(v.dtype).removeprefix("torch.")) if isinstance(v, torch.Tensor) else
               type(v).__name__ for v in values]
        expected = [(spec.shape, spec.dtype) for spec in self.inputs]
        if got != expected:
            raise BackendError(f"this module was compiled for inputs {expected}, got {got}; compile it again for new shapes")
        return values


class TVMBackend:
    """Compiles GraphModules with TVM for one target (a lowbit target name or a TVM target dict)."""

    name = "tvm"

    def __init__(self, target: str | Mapping[str, Any] | Target = "x86") -> None:
        self.target = resolve_target(target)

    def compile(self, gm: fx.GraphModule, example_inputs: tuple, *, cache_dir: Any = None,
                tune: Any = None) -> TVMRunner:
        """Lower ``gm`` for the shapes of its inputs, build it, and return a runner.

        Inputs beyond ``example_inputs`` take their shapes from the graph's placeholder
        metadata (graphs traced with keyword inputs). Low-bit kernels take their knobs from
        the tuning database in ``cache_dir`` (default `tuning.default_cache_dir`) and the
        shipped one. ``tune``: None reads those records and measures nothing; False uses the
        hand schedules only; True, a mapping (``trials``, ``max_seconds``, ``database``,
        ``rpc``, ...) or `tuning.TuningOptions` also tunes the kernels that have no
        finished record (see `lowbit.backends.tvm.tuning`).
        """
        if self.target.kind.name == "cuda" and tune:
            raise BackendError("tuning CUDA kernels is not supported (the tuner times kernels on CPUs, locally or "
                               "over RPC); compile with tune=None (recorded knobs) or tune=False (hand schedules)")
        tuner = None
        if tune is not False:
            tuner = Tuner(self.target, cache_dir if cache_dir is not None else default_cache_dir(),
                          TuningOptions.of(tune))
        try:
            lowering = lower(gm.eval(), example_inputs, self.target, tuner)
        finally:
            if tuner is not None:
                tuner.close()
        if self.target.kind.name == "cuda":
            built = cuda.build(lowering)
            return cuda.CUDARunner(built.executable, self.target, lowering.inputs, lowering.linears, built.source)
        with torch.no_grad():
            executable = build(lowering)
        for linear in lowering.fallbacks:
            log.warning("%s runs as a dequantized fp32 dense kernel: %s", linear.node, linear.reason)
        return TVMRunner(executable, target_arch(self.target), _features(self.target), lowering.inputs,
                         lowering.linears, tuner.results if tuner else ())

    def save(self, runner: TVMRunner, directory: Path) -> list[str]:
        """Write the shared library (weights embedded) and the input signature; returns the file names.

        Libraries for aarch64 are linked with the cross compiler ``aarch64-linux-gnu-g++``.
        """
        directory = Path(directory)
        if isinstance(runner, cuda.CUDARunner):
            return cuda.save(runner, directory)
        fcompile = None
        if runner.arch != host_arch():
            if runner.arch != "aarch64":
                raise BackendError(f"exporting a library for {runner.arch} from {host_arch()} is not supported")
            if shutil.which(ARM_CXX) is None:
                raise BackendError(f"exporting for ARM needs the cross compiler {ARM_CXX}: "
                                   f"install the Debian package {ARM_CXX_PACKAGE}")
            fcompile = cc.cross_compiler(ARM_CXX)
        runner.executable.export_library(str(directory / LIBRARY_FILE), fcompile=fcompile)
        signature = {
            "arch": runner.arch,
            "features": runner.features,
            "inputs": [dataclasses.asdict(spec) for spec in runner.inputs],
            "linears": [dataclasses.asdict(linear) for linear in runner.linears],
        }
        (directory / SIGNATURE_FILE).write_text(json.dumps(signature, indent=2) + "\n")
        return [LIBRARY_FILE, SIGNATURE_FILE]

    def load(self, directory: Path) -> TVMRunner:
        """A runner for a saved library, after checking this machine can run it (architecture, CPU features)."""
        directory = Path(directory)
        signature = json.loads((directory / SIGNATURE_FILE).read_text())
        if signature["arch"] == "cuda":
            return cuda.load(directory, self.target)
        arch, features = signature["arch"], signature["features"]
        if arch != host_arch():
            raise ArtifactError(f"{directory} holds a library for {arch}; this machine is {host_arch()}. "
                                "Run it on a matching device")
        if arch == "x86_64":
            host = Target(x86_host_target())
            missing = [feature for feature in features if not has_features(host, feature)]
            if missing:
                raise ArtifactError(f"{directory} was compiled for a CPU with {', '.join(missing)}, "
                                    "which this machine lacks; compile it again here")
        inputs = [InputSpec(item["name"], tuple(item["shape"]), item["dtype"]) for item in signature["inputs"]]
        linears = [LoweredLinear(item["node"], PackedLinearSpec(**item["spec"]), item["kernel"], item["reason"])
                   for item in signature["linears"]]
        return TVMRunner(tvm.runtime.load_module(str(directory / LIBRARY_FILE)), arch, features, inputs, linears)


def _features(target: Target) -> list[str]:
    """The x86 features an LLVM target compiles for (empty for other architectures)."""
    if target_arch(target) != "x86_64":
        return []
    return [feature for feature in X86_FEATURES if has_features(target, feature)]


def _to_torch(value: Any) -> Any:
    """VM results (a tensor or nested tuples of them) as torch tensors."""
    if isinstance(value, tvm.runtime.Tensor):
        return torch.from_dlpack(value)
    return tuple(_to_torch(item) for item in value)


__all__ = ["ARM_CXX", "ARM_CXX_PACKAGE", "LIBRARY_FILE", "SIGNATURE_FILE", "TVMBackend", "TVMRunner"]
