"""Measuring candidate kernels: built with `tvm.compile`, timed with ``time_evaluator`` (median of repeats).

`LocalRunner` times on this machine; `RPCRunner` builds each candidate here, exports it
(with the aarch64 cross compiler when the target is ARM), uploads it to a device reached
through a TVM RPC tracker (``key`` given) or a direct RPC server and times it there.
Every network step is bounded by ``timeout_s``: an unreachable tracker or server, a key
no server offers, or a device that dies or stops answering while it measures is a
`BackendError` within that time, never a hang. Each runner also returns the candidate's
output on fixed random inputs, computed where it was timed, so the tuner can check it
against the hand schedule's output from the same device.
"""

from __future__ import annotations

import gc
import logging
import socket
import statistics
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import tvm
from tvm import rpc, tirx
from tvm.target import Target

from lowbit.backends.tvm import stack
from lowbit.backends.tvm.target import host_arch, runs_on_host, target_arch
from lowbit.backends.tvm.toolchains.cpu import library_compiler
from lowbit.errors import BackendError

log = logging.getLogger(__name__)

#: The symbol a candidate is built under.
ENTRY = "lowbit_tuning_candidate"
T = TypeVar("T")


@dataclass(frozen=True)
class MeasureOptions:
    """``time_evaluator`` settings: ``repeat`` timed repeats (the median is kept), each at least ``min_repeat_ms``."""

    repeat: int = 5
    min_repeat_ms: int = 20


@dataclass(frozen=True)
class Measurement:
    """A candidate's median time in seconds and its output on the runner's fixed inputs."""

    seconds: float
    output: np.ndarray


@dataclass(frozen=True)
class RPCDevice:
    """A remote device: a tracker at ``host:port`` serving ``key``, or (``key`` None) an RPC server there.

    ``timeout_s`` bounds each step: reaching the device, uploading a candidate, and each
    remote run (a warm-up and the timed repeats); the default leaves room for emulated
    devices (qemu-user runs code 10-50x slower than the hardware).
    """

    host: str
    port: int
    key: str | None = None
    timeout_s: float = 60.0

    def __str__(self) -> str:
        if self.key:
            return f"tracker {self.host}:{self.port} key '{self.key}'"
        return f"RPC server {self.host}:{self.port}"


def build(func: tirx.PrimFunc, target: Target) -> tvm.runtime.Executable:
    """A candidate compiled for ``target`` under the symbol `ENTRY`, with the TIR pipeline of the model builds
    (`stack.PIPELINE` on CPUs)."""
    pipeline = stack.PIPELINE if target.kind.name == "llvm" else "default"
    return tvm.compile(func.with_attr("global_symbol", ENTRY), target=target, tir_pipeline=pipeline)


def example_arguments(func: tirx.PrimFunc, consts: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """``x`` (fixed random values), the plan's constants and a zeroed output, as numpy arrays.

    Raises `BackendError` when the function's parameters do not match ``x, *consts, y``.
    """
    params = [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in func.ty.params]
    if len(params) != len(consts) + 2:
        raise BackendError(
            f"a kernel plan with {len(consts)} constants must take x, the constants and y; "
            f"its function takes {len(params)} arguments"
        )
    rng = np.random.default_rng(0)
    (x_shape, x_dtype), (y_shape, y_dtype) = params[0], params[-1]
    if x_dtype.startswith("float"):
        x = rng.standard_normal(x_shape).astype(x_dtype)
    else:
        x = rng.integers(-100, 100, size=x_shape).astype(x_dtype)
    return [x, *(c.detach().cpu().contiguous().numpy() for c in consts), np.zeros(y_shape, y_dtype)]


class LocalRunner:
    """Times candidates on this machine (the target must run here)."""

    def __init__(self, target: Target, options: MeasureOptions = MeasureOptions()) -> None:
        if not runs_on_host(target):
            raise BackendError(
                f"kernels for {target_arch(target)} cannot be measured on this {host_arch()} "
                "machine: tune through an RPC device"
            )
        self.target = target
        self.options = options

    def measure(self, func: tirx.PrimFunc, consts: Sequence[torch.Tensor]) -> Measurement:
        module = build(func, self.target).jit()
        return _time(module, tvm.cpu(), example_arguments(func, consts), self.options)

    def output(self, func: tirx.PrimFunc, consts: Sequence[torch.Tensor]) -> np.ndarray:
        """The kernel's output on the fixed inputs, untimed (the reference a candidate is checked against)."""
        return _run(build(func, self.target).jit(), tvm.cpu(), example_arguments(func, consts))[1]

    def compare(self, kernels: Sequence[tuple[tirx.PrimFunc, Sequence[torch.Tensor]]], rounds: int) -> list[float]:
        """Median seconds of each kernel, built once and timed in turn for ``rounds`` rounds.

        Alternating makes the times comparable on a machine whose load drifts over minutes.
        """
        built = [(build(func, self.target).jit(), example_arguments(func, consts)) for func, consts in kernels]
        times: list[list[float]] = [[] for _ in built]
        for _ in range(rounds):
            for index, (module, arrays) in enumerate(built):
                times[index].append(_time(module, tvm.cpu(), arrays, self.options).seconds)
        return [statistics.median(t) for t in times]

    def close(self) -> None:
        """Nothing to release locally."""


class RPCRunner:
    """Times candidates on a remote device; the session opens on first use and is reused."""

    def __init__(self, target: Target, device: RPCDevice, options: MeasureOptions = MeasureOptions()) -> None:
        self.target = target
        self.device = device
        self.options = options
        self._session: Any = None
        self._uploads = 0

    def measure(self, func: tirx.PrimFunc, consts: Sequence[torch.Tensor]) -> Measurement:
        return self._timed(self._load(func, consts))

    def output(self, func: tirx.PrimFunc, consts: Sequence[torch.Tensor]) -> np.ndarray:
        """The kernel's output on the fixed inputs, untimed, computed on the device."""
        module, dev, arrays = self._load(func, consts)
        return self._on_device(lambda: _run(module, dev, arrays)[1], "running")

    def compare(self, kernels: Sequence[tuple[tirx.PrimFunc, Sequence[torch.Tensor]]], rounds: int) -> list[float]:
        """Median seconds of each kernel, uploaded once and timed on the device in turn for ``rounds`` rounds."""
        loaded = [self._load(func, consts) for func, consts in kernels]
        times: list[list[float]] = [[] for _ in kernels]
        for _ in range(rounds):
            for index, candidate in enumerate(loaded):
                times[index].append(self._timed(candidate).seconds)
        return [statistics.median(t) for t in times]

    def _load(self, func: tirx.PrimFunc, consts: Sequence[torch.Tensor]) -> tuple[Any, Any, list[np.ndarray]]:
        """Build ``func`` here, upload it and load it on the device: the remote module, device and arguments."""
        executable = build(func, self.target)
        arrays = example_arguments(func, consts)
        session = self._connect()
        self._uploads += 1
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"candidate{self._uploads}.so"  # a remote process cannot load one name twice
            executable.export_library(str(path), fcompile=_fcompile(self.target))
            self._on_device(lambda: session.upload(str(path)), "uploading")
        return self._on_device(lambda: session.load_module(path.name), "loading"), session.cpu(), arrays

    def _timed(self, loaded: tuple[Any, Any, list[np.ndarray]]) -> Measurement:
        """A loaded candidate's output and median time (`_time`), on the device."""
        module, dev, arrays = loaded
        return self._on_device(lambda: _time(module, dev, arrays, self.options), "running")

    def _on_device(self, call: Callable[[], T], step: str) -> T:
        """``call`` bounded by ``timeout_s``; on any failure the session is dropped (the device may be gone)
        and a later call connects again."""
        try:
            return _bounded(call, self.device.timeout_s, f"{step} a candidate on {self.device}")
        except BackendError:
            self.close()
            raise

    def close(self) -> None:
        """Drop the session; collected now, since a server serves one session at a time."""
        if self._session is not None:
            self._session = None
            gc.collect()

    def _connect(self) -> Any:
        if self._session is None:
            self._session = connect(self.device)
        return self._session


def connect(device: RPCDevice) -> Any:
    """An RPC session with ``device``; `BackendError` within about ``timeout_s`` if it cannot be had."""
    _probe(device)
    if device.key is None:
        return _bounded(lambda: rpc.connect(device.host, device.port), device.timeout_s, f"connecting to {device}")
    tracker = _bounded(
        lambda: rpc.connect_tracker(device.host, device.port), device.timeout_s, f"connecting to {device}"
    )
    keys = sorted(_bounded(tracker.summary, device.timeout_s, f"querying {device}").get("queue_info", {}))
    if device.key not in keys:
        raise BackendError(
            f"{device}: the tracker has no device with key '{device.key}' (keys it serves: {', '.join(keys) or 'none'})"
        )
    return _bounded(
        lambda: tracker.request(device.key, max_retry=1), device.timeout_s, f"requesting a device from {device}"
    )


def _probe(device: RPCDevice) -> None:
    """Fail fast when nothing listens at the address (TVM's own connect retries for a minute)."""
    try:
        socket.create_connection((device.host, device.port), timeout=device.timeout_s).close()
    except OSError as error:
        raise BackendError(f"cannot reach {device}: {error}") from error


def _bounded(call: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``call`` in a daemon thread; `BackendError` if it fails or takes longer than ``timeout_s``."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(call())
        except BaseException as error:  # handed to the caller's thread
            errors.append(error)

    thread = threading.Thread(target=target, name="lowbit-rpc", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():  # abandoned: a daemon thread blocked on a dead peer does not keep the process alive
        raise BackendError(f"{what}: no answer within {timeout_s:g} s")
    if errors:
        raise BackendError(f"{what} failed: {_last_line(errors[0])}") from errors[0]
    return result[0]


def _last_line(error: BaseException) -> str:
    """The last line of an error's text: TVM puts its message after a C++ traceback."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _run(module: Any, dev: Any, arrays: Sequence[np.ndarray]) -> tuple[list[Any], np.ndarray]:
    """The arguments on ``dev`` and the output of one run."""
    args = [tvm.runtime.tensor(array, device=dev) for array in arrays]
    module[ENTRY](*args)
    return args, args[-1].numpy()


def _time(module: Any, dev: Any, arrays: Sequence[np.ndarray], options: MeasureOptions) -> Measurement:
    """Run once (warm-up, output), then the median of ``options.repeat`` timed repeats."""
    args, output = _run(module, dev, arrays)
    timer = module.time_evaluator(ENTRY, dev, number=1, repeat=options.repeat, min_repeat_ms=options.min_repeat_ms)
    return Measurement(float(statistics.median(timer(*args).results)), output)


def _fcompile(target: Target) -> Any:
    """The cross compiler for a library of another architecture (None for this machine's)."""
    return library_compiler(target_arch(target), "remote tuning")


__all__ = [
    "ENTRY",
    "LocalRunner",
    "MeasureOptions",
    "Measurement",
    "RPCDevice",
    "RPCRunner",
    "build",
    "connect",
    "example_arguments",
]
