"""The TVM backend: a lowbit GraphModule compiled to a Relax VM executable.

    from lowbit.backends.tvm import TVMBackend
    runner = TVMBackend("x86").compile(gm, example_inputs)
    y = runner(x)                      # torch tensors in, torch tensors out
    runner.fallbacks                   # packed layers running as dequantized fp32

Parts: `target` (lowbit target names → TVM targets), `kernels` (TIR generators),
`schedule` (default CPU schedules for fp32 operators), `lower` (GraphModule → Relax,
build). The module is specialized to the shapes of the example inputs. LLVM CPU
targets compile (``x86``; ``arm`` cross-compiles; or a TVM target dict) and modules
for this machine's architecture run in-process; CUDA is not lowered yet. TVM's thread
pool uses half the hardware threads unless ``TVM_NUM_THREADS`` is set.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import tvm
from tvm import relax
from tvm.target import Target

import lowbit.ir.ops  # noqa: F401  (registers torch.ops.lowbit before a graph is lowered)
from lowbit.backends.tvm.lower import LoweredLinear, Lowering, build, lower
from lowbit.backends.tvm.target import resolve_target, runs_on_host
from lowbit.errors import BackendError

log = logging.getLogger(__name__)


class TVMRunner:
    """Runs a compiled graph on the CPU through ``relax.VirtualMachine``.

    A module cross-compiled for another architecture (target ``"arm"`` on x86) is built
    and kept in ``executable`` but cannot be called here.
    """

    def __init__(self, executable: relax.VMExecutable, lowering: Lowering, dtypes: Sequence[torch.dtype]) -> None:
        self.executable = executable
        self.lowering = lowering
        self.input_shapes = list(lowering.input_shapes)
        self.input_dtypes = list(dtypes)
        self._main = None
        if runs_on_host(lowering.target):
            self._main = relax.VirtualMachine(executable, tvm.cpu())["main"]

    @property
    def fallbacks(self) -> list[LoweredLinear]:
        """Packed linears that run as dequantized fp32 dense kernels (with the reason)."""
        return self.lowering.fallbacks

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self._main is None:
            raise BackendError(
                f"this module is cross-compiled for {self.lowering.target.attrs.get('mtriple')} and cannot run "
                "on this machine; run it on the device (export and RPC are not part of this backend yet)"
            )
        self._check(inputs)
        args = [tvm.runtime.from_dlpack(t.detach().cpu().contiguous()) for t in inputs]
        return _to_torch(self._main(*args))

    def _check(self, inputs: Sequence[torch.Tensor]) -> None:
        got = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]
        expected = list(zip(self.input_shapes, self.input_dtypes))
        if got != expected:
            raise BackendError(f"this module was compiled for inputs {expected}, got {got}; compile it again for new shapes")


class TVMBackend:
    """Compiles GraphModules with TVM for one target (a lowbit target name or a TVM target dict)."""

    name = "tvm"

    def __init__(self, target: str | Mapping[str, Any] | Target = "x86") -> None:
        self.target = resolve_target(target)

    def compile(self, gm: fx.GraphModule, example_inputs: tuple, *, cache_dir: Any = None,
                tune: Any = None) -> TVMRunner:
        """Lower ``gm`` for the shapes of ``example_inputs``, build it, and return a runner.

        ``tune`` (MetaSchedule tuning) is not available yet and raises; ``cache_dir`` is
        where tuning records will live, so without tuning it is not used.
        """
        if tune:
            raise BackendError("tuning is not implemented in the TVM backend yet; compile with tune=None")
        if cache_dir is not None:
            log.debug("cache_dir %s unused: it holds tuning records and tuning is off", cache_dir)
        lowering = lower(gm.eval(), example_inputs, self.target)
        with torch.no_grad():
            executable = build(lowering)
        for linear in lowering.fallbacks:
            log.warning("%s runs as a dequantized fp32 dense kernel: %s", linear.node, linear.reason)
        return TVMRunner(executable, lowering, [t.dtype for t in example_inputs])


def _to_torch(value: Any) -> Any:
    """VM results (a tensor or nested tuples of them) as torch tensors."""
    if isinstance(value, tvm.runtime.Tensor):
        return torch.from_dlpack(value)
    return tuple(_to_torch(item) for item in value)


__all__ = ["TVMBackend", "TVMRunner"]
