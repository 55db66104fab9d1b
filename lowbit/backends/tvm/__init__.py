"""The TVM backend: a lowbit GraphModule compiled to a Relax VM executable.

    from lowbit.backends.tvm import TVMBackend
    runner = TVMBackend("x86").compile(gm, example_inputs)
    y = runner(x)                      # torch tensors in, torch tensors out
    runner.fallbacks                   # low-bit layers running as dequantized fp32
    files = TVMBackend("x86").save(runner, directory)   # model.so + signature.json
    runner = TVMBackend("x86").load(directory)

Parts: `target` (lowbit target names → TVM targets), `frontend` (GraphModule → Relax), `convert` (the low-bit
linears → kernel calls: `lower`), `kernels` (TIR generators behind one `kernels.spec.LinearKernel` contract),
`toolchains` (per target: kernel lists, fallback, schedules, build, export), `runner` (calling a built module),
`tuning` (knob search for the low-bit kernels with a persistent database: ``compile(..., tune=True,
cache_dir=...)``; ``runner.tuning`` lists the knobs chosen). The module is specialized to the shapes of the example
inputs, except the symbolic dimensions of a graph traced with ``dynamic_shapes`` (x86). LLVM CPU targets compile
(``x86``; ``arm`` cross-compiles; or a TVM target dict) and modules for this
machine's architecture run in-process; ``cuda`` (or ``{"kind": "cuda", "arch": "sm_90"}``) builds CUDA kernels,
runnable where there is a GPU. Saved modules are shared libraries with the weights embedded as constants; loading
checks that this machine can run them. TVM's thread pool uses every core this process may run on unless
``TVM_NUM_THREADS`` says otherwise (TVM's own default is half the hardware threads).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import fx

# Read when TVM's thread pool starts (the first parallel kernel), so setting it here is in time.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

from tvm.target import Target

import lowbit.ir.ops  # noqa: F401  (registers torch.ops.lowbit before a graph is lowered)
from lowbit.backends.tvm.lowering import lower
from lowbit.backends.tvm.quiet import quiet_tvm
from lowbit.backends.tvm.runner import (
    LIBRARY_FILE,
    SIGNATURE_FILE,
    CPURunner,
    CUDARunner,
    Runner,
    read_signature,
    signature_dims,
    signature_interface,
)
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.toolchains import Toolchain, resolve_toolchain
from lowbit.backends.tvm.toolchains.cpu import ARM_CXX, ARM_CXX_PACKAGE
from lowbit.backends.tvm.tuning import Tuner, TuningOptions, default_cache_dir


class TVMBackend:
    """Compiles GraphModules with TVM for one target (a lowbit target name or a TVM target dict)."""

    name = "tvm"

    def __init__(self, target: str | Mapping[str, Any] | Target = "x86") -> None:
        self.target = resolve_target(target)
        self.toolchain: Toolchain = resolve_toolchain(self.target)

    def compile(
        self,
        gm: fx.GraphModule,
        example_inputs: tuple,
        *,
        cache_dir: Any = None,
        tune: Any = None,
        strict: bool = False,
    ) -> Runner:
        """Lower ``gm`` for the shapes of its inputs, build it, and return a runner.

        Inputs beyond ``example_inputs`` take their shapes from the graph's placeholder
        metadata (graphs traced with keyword inputs). Low-bit kernels take their knobs from
        the tuning database in ``cache_dir`` (default `tuning.default_cache_dir`) and the
        shipped one. ``tune``: None reads those records and measures nothing; False uses the
        hand schedules only; True, a mapping (``trials``, ``max_seconds``, ``database``,
        ``rpc``, ...) or `tuning.TuningOptions` also tunes the kernels that have no
        finished record (see `lowbit.backends.tvm.tuning`). Low-bit layers no kernel takes are announced
        before the build; ``strict`` turns them into `UnsupportedLayerError` (see `lowering.lower`).
        """
        tuner = self.tuner(cache_dir, tune)
        try:
            lowering = lower(gm.eval(), example_inputs, self.toolchain, tuner, strict)
        finally:
            if tuner is not None:
                tuner.close()
        with quiet_tvm():
            runner = self.toolchain.build(lowering, tuner.results if tuner else ())
        runner.dims = lowering.dims
        return runner

    def tuner(self, cache_dir: Any, tune: Any) -> Tuner | None:
        """The tuner ``compile`` chooses kernel knobs with (None for ``tune=False``: hand schedules); close it
        after use."""
        self.toolchain.check_tuning(tune)
        if tune is False:
            return None
        return Tuner(self.target, cache_dir if cache_dir is not None else default_cache_dir(), TuningOptions.of(tune))

    def save(self, runner: Runner, directory: Path) -> list[str]:
        """Write the shared library (weights embedded) and the input signature; returns the file names."""
        with quiet_tvm():
            return self.toolchain.save(runner, Path(directory))

    def load(self, directory: Path) -> Runner:
        """A runner for a saved library, after checking this machine can run it."""
        directory = Path(directory)
        signature = read_signature(directory)
        with quiet_tvm():
            runner = self.toolchain.load(directory, signature)
        runner.interface = signature_interface(signature)
        runner.dims = signature_dims(signature)
        return runner


__all__ = [
    "ARM_CXX",
    "ARM_CXX_PACKAGE",
    "LIBRARY_FILE",
    "SIGNATURE_FILE",
    "CPURunner",
    "CUDARunner",
    "Runner",
    "TVMBackend",
]
