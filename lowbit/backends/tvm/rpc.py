"""TVM RPC: trackers and servers as subprocesses, bounded connections, remote runs of artifacts.

    with Tracker() as tracker, Server(tracker=tracker.address, key="arm"):
        session = connect(tracker.address, key="arm", timeout=30)   # tvm.rpc.RPCSession
    result = run_artifact("model-arm/", rpc="10.0.0.7:9090")         # outputs + median latency

`Tracker` and `Server` run ``tvm.exec.rpc_tracker`` and a TVM RPC server in their own
process groups on free ports, and stop them (the whole group) on exit. A server serves
one session at a time; others wait for it. A server can
run under another Python, e.g. an emulated aarch64 one (`lowbit.backends.tvm.qemu`).
`connect` reaches a server directly (``HOST:PORT``) or through a
tracker (``HOST:PORT`` of the tracker plus a device ``key``) and gives up with
`RPCError` after ``timeout`` seconds instead of hanging: TVM's own calls retry or block
without limit, so they run on a worker thread that is abandoned on timeout.
`run_artifact` runs an exported artifact (`lowbit.artifact`) with the TVM runtime
alone, in this process or on a remote device: it uploads the library, drives the Relax
VM through ``set_input`` / ``invoke_stateful`` / ``get_outputs`` (the calls that return
tuples over RPC) and times the model with the runtime's time evaluator.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lowbit.errors import ArtifactError, BackendError

log = logging.getLogger(__name__)

#: Seconds to wait for a device, a tracker or a server before giving up.
DEFAULT_TIMEOUT = 60.0
LOCALHOST = "127.0.0.1"
#: Trackers and servers need only TVM's runtime library, which loads faster than the compiler.
RUNTIME_ONLY = {"TVM_USE_RUNTIME_LIB": "1"}
#: The line a server prints once it listens (followed by its port).
READY = "lowbit-rpc-ready"
#: A TVM RPC server in the device's Python (possibly TVM's runtime-only build under qemu). It runs
#: TVM's own accept loop (``tvm.rpc.server._listen_loop``, one forked process per session) in
#: this process: ``rpc.Server`` would start it in a re-launched ``sys.executable``, which costs a
#: second TVM import (seconds under emulation). It binds a free port itself and prints it.
_SERVER_MAIN = f"""
import socket, sys
host, key, tracker, load_library = sys.argv[1:5]
from tvm.rpc import server
tracker_addr = (tracker.rsplit(":", 1)[0], int(tracker.rsplit(":", 1)[1])) if tracker else None
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((host, 0))
sock.listen(1)
port = sock.getsockname()[1]
print("{READY}", port, flush=True)
server._listen_loop(sock, port, key, tracker_addr, load_library or None, None)
"""

T = TypeVar("T")


class RPCError(BackendError):
    """A remote device, tracker or server could not be reached, or a remote run failed."""


@dataclass(frozen=True)
class Address:
    """``HOST:PORT`` of a tracker or server."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, sep, port = str(text).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RPCError(f"an RPC address is HOST:PORT (e.g. 127.0.0.1:9190), got {text!r}")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class RunResult:
    """Outputs of one run of an artifact, the median latency of the timed runs, and where it ran."""

    outputs: list[np.ndarray]
    latency_s: float
    device: str


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class _Process:
    """A subprocess in its own process group, stopped with the whole group.

    Its output goes to a temporary file, never to a pipe: a long-lived server writes a
    warning per loaded module, and a full pipe nobody reads would block it.
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None, what: str) -> None:
        self.what = what
        handle, self._log = tempfile.mkstemp(prefix="lowbit-rpc-", suffix=".log")
        os.close(handle)
        log.debug("starting %s: %s (output in %s)", what, " ".join(command), self._log)
        with open(self._log, "ab") as output:  # append mode: the child writes at the end whatever we read
            self.process = subprocess.Popen(
                list(command),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )

    def output(self) -> str:
        """Everything the process printed so far."""
        with open(self._log, errors="replace") as output:
            return output.read()

    def failure(self) -> str:
        """What the process said before it exited (its last lines)."""
        return " | ".join(self.output().strip().splitlines()[-5:]) or f"exit status {self.process.poll()}"

    def stop(self) -> None:
        if self.process.poll() is None:
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._log)
        log.debug("stopped %s", self.what)


class Tracker:
    """An RPC tracker (``python -m tvm.exec.rpc_tracker``) on a free local port; a context manager."""

    def __init__(self, host: str = LOCALHOST, port: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = Address(host, port or free_port(host))
        command = [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            host,
            "--port",
            str(self.address.port),
            "--port-end",
            str(self.address.port + 1),
            "--silent",
        ]
        self._process = _Process(command, RUNTIME_ONLY, f"RPC tracker {self.address}")
        try:
            _wait_until(
                lambda: self._ready(), timeout, f"the RPC tracker at {self.address} did not start", self._process
            )
        except BaseException:
            self.stop()
            raise
        log.info("RPC tracker listening at %s", self.address)

    def _ready(self) -> bool:
        try:  # probe first: TVM's tracker client retries a refused connection every 5 s
            socket.create_connection((self.address.host, self.address.port), timeout=1.0).close()
            self.summary()
        except (OSError, RuntimeError):
            return False
        return True

    def summary(self) -> dict[str, Any]:
        """The tracker's view of its servers and queues (``TrackerSession.summary``)."""
        return tracker_summary(self.address)

    def stop(self) -> None:
        self._process.stop()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Server:
    """A TVM RPC server on a free local port, optionally registered at a tracker; a context manager.

    ``python`` is the device's Python (default: this one; e.g. a wrapper script that
    runs an emulated one) and ``env`` extra environment for it; ``load_library`` a
    shared library the server loads into each session (e.g. ``libtvm_runtime_extra.so``
    for MetaSchedule's runner). Registered servers count as ready once the tracker lists
    them as free.
    """

    def __init__(
        self,
        tracker: Address | str | None = None,
        key: str = "",
        host: str = LOCALHOST,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        load_library: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if tracker is not None and not key:
            raise RPCError("a server registered at a tracker needs a key naming its kind of device")
        tracker_text = str(Address.parse(str(tracker))) if tracker is not None else ""
        command = [python or sys.executable, "-c", _SERVER_MAIN, host, key, tracker_text, load_library or ""]
        self._process = _Process(command, {**RUNTIME_ONLY, **(env or {})}, f"RPC server ({command[0]})")
        try:
            self.address = Address(host, self._wait_ready(timeout))
            if tracker is not None:
                _wait_until(
                    lambda: _registered(Address.parse(tracker_text), key),
                    timeout,
                    f"the RPC server did not register at the tracker {tracker_text} as '{key}'",
                    self._process,
                )
        except BaseException:
            self.stop()
            raise
        log.info("RPC server listening at %s%s", self.address, f" (key '{key}' at {tracker_text})" if tracker else "")

    def _wait_ready(self, timeout: float) -> int:
        """The port from the server's ready line, printed within ``timeout`` seconds."""
        ready: list[int] = []

        def printed() -> bool:
            complete = self._process.output().rpartition("\n")[0]  # a line still being written has no port yet
            ready.extend(int(found.group(1)) for found in re.finditer(rf"^{READY} (\d+)$", complete, re.MULTILINE))
            return bool(ready)

        _wait_until(printed, timeout, "the RPC server did not start", self._process)
        return ready[0]

    @property
    def pid(self) -> int:
        """The server's process id; also its process group, which holds its session processes."""
        return self._process.process.pid

    def stop(self) -> None:
        self._process.stop()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tracker_summary(address: Address) -> dict[str, Any]:
    """A tracker's view of its servers and queues (``TrackerSession.summary``); OSError while it is down."""
    from tvm import rpc

    session = rpc.connect_tracker(address.host, address.port)
    try:
        return session.summary()
    finally:
        session.close()


def free_servers(address: Address, key: str) -> int:
    """How many servers registered under ``key`` at the tracker ``address`` are free now."""
    return int(tracker_summary(address).get("queue_info", {}).get(key, {}).get("free", 0))


def _registered(tracker: Address, key: str) -> bool:
    try:
        return free_servers(tracker, key) > 0
    except (OSError, RuntimeError):  # the tracker is not answering (yet)
        return False


def connect(rpc: str, key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """A ``tvm.rpc.RPCSession`` on a device within ``timeout`` seconds, or `RPCError`.

    Without ``key``, ``rpc`` is the ``HOST:PORT`` of a server; with one, of a tracker,
    which hands out a free server registered under that key.
    """
    from tvm import rpc as tvm_rpc

    address = Address.parse(rpc)
    if not key:
        return _bounded(lambda: tvm_rpc.connect(address.host, address.port), timeout, f"RPC server {address}")
    tracker = _bounded(lambda: tvm_rpc.connect_tracker(address.host, address.port), timeout, f"RPC tracker {address}")
    try:
        return _bounded(
            lambda: tracker.request(key, max_retry=1),
            timeout,
            f"a device with key '{key}' at the RPC tracker {address}",
        )
    finally:
        tracker.close()


def run_artifact(
    path: str | Path,
    inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray] | None = None,
    *,
    rpc: str | None = None,
    key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    repeats: int = 10,
    seed: int = 0,
) -> RunResult:
    """Run the exported artifact at ``path`` with the TVM runtime, here or on the device at ``rpc``.

    ``inputs`` are arrays in the model's input order or by input name; None draws
    valid inputs of the compiled shapes (``seed``, `bind_inputs`). Inputs are checked like a
    compiled model's calls (`lowbit.interface`). The artifact's checksums are verified first;
    locally its architecture must be this machine's.
    """
    from lowbit import artifact
    from lowbit.backends.tvm.quiet import quiet_tvm
    from lowbit.backends.tvm.runner import LIBRARY_FILE, SIGNATURE_FILE
    from lowbit.backends.tvm.target import host_arch

    path = Path(path)
    manifest = artifact.read_manifest(path)
    if not (path / LIBRARY_FILE).is_file() or not (path / SIGNATURE_FILE).is_file():
        raise ArtifactError(
            f"{path} was built for target {manifest.get('target')!r}; the TVM runtime runs "
            "artifacts of the TVM targets (x86, arm)"
        )
    signature = json.loads((path / SIGNATURE_FILE).read_text())
    arrays = bind_inputs(signature["inputs"], inputs, seed, signature.get("interface"))
    if rpc is None:
        if signature["arch"] != host_arch():
            raise RPCError(
                f"{path} holds a library for {signature['arch']}; this machine is {host_arch()}. "
                "Run it on a device with --rpc HOST:PORT"
            )
        import tvm

        with quiet_tvm():
            module = tvm.runtime.load_module(str(path / LIBRARY_FILE))
        return _run(module, tvm.cpu(), arrays, repeats, "local cpu")
    device = f"{rpc} (key '{key}')" if key else rpc
    try:
        return _run_remote(connect(rpc, key, timeout), path / LIBRARY_FILE, arrays, repeats, device, signature["arch"])
    finally:
        # TVM's VM and RPC objects hold reference cycles, so the session would stay open until the
        # next garbage collection, and a server serves one session at a time: close it now.
        gc.collect()


def _run_remote(
    session: Any, library: Path, arrays: Sequence[np.ndarray], repeats: int, device: str, arch: str
) -> RunResult:
    try:
        session.upload(str(library))
        module = session.load_module(library.name)
    except Exception as error:  # TVM raises its own error types for remote failures
        raise RPCError(f"{device} could not load {library} (built for {arch}): {_message(error)}") from error
    return _run(module, session.cpu(), arrays, repeats, device)


def bind_inputs(
    specs: Sequence[Mapping[str, Any]],
    inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray] | None,
    seed: int = 0,
    interface: Mapping[str, Any] | None = None,
) -> list[np.ndarray]:
    """Arrays for the compiled inputs ``specs`` (name, shape, dtype), checked against the shapes, dtypes and the saved
    ``interface`` (`lowbit.interface.Interface.as_dict`). Random ones when ``inputs`` is None: integers uniform in
    their recorded index range (else 0 or 1), booleans True, floats standard normal."""
    import torch

    from lowbit.interface import Interface

    names = [spec["name"] for spec in specs]
    contract = Interface.from_dict(interface)
    if inputs is None:
        generator = np.random.default_rng(seed)
        return [_random_input(generator, spec, contract.ranges.get(spec["name"], (0, 2))) for spec in specs]
    if isinstance(inputs, Mapping):
        missing = [name for name in names if name not in inputs]
        unknown = sorted(set(inputs) - set(names))
        if missing or unknown:
            raise RPCError(f"the model takes inputs {names}; missing {missing}, unknown {unknown}")
        inputs = [inputs[name] for name in names]
    if len(inputs) != len(names):
        raise RPCError(f"the model takes {len(names)} inputs {names}, got {len(inputs)}")
    arrays = []
    for spec, value in zip(specs, inputs):
        value = np.asarray(value)
        if tuple(value.shape) != tuple(spec["shape"]) or str(value.dtype) != spec["dtype"]:
            raise RPCError(
                f"input '{spec['name']}' must be {spec['dtype']} of shape {tuple(spec['shape'])}, "
                f"got {value.dtype} of shape {tuple(value.shape)}"
            )
        arrays.append(np.ascontiguousarray(value))
    contract.check([torch.from_numpy(array) for array in arrays], {})
    return arrays


def _random_input(generator: np.random.Generator, spec: Mapping[str, Any], index_range: tuple[int, int]) -> np.ndarray:
    """A random input for ``spec`` that a compiled model accepts (see `bind_inputs`)."""
    shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    if dtype == np.bool_:
        return np.ones(shape, dtype=dtype)
    if np.issubdtype(dtype, np.integer):
        return generator.integers(*index_range, size=shape).astype(dtype)
    return generator.standard_normal(shape).astype(dtype)


def _run(module: Any, device: Any, arrays: Sequence[np.ndarray], repeats: int, where: str) -> RunResult:
    """One run for the outputs, then ``repeats`` timed runs; the VM's stateful calls work over RPC."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    try:
        vm = VirtualMachine(module, device)
        vm.set_input("main", *[tvm.runtime.tensor(array, device) for array in arrays])
        vm.invoke_stateful("main")
        outputs = [tensor.numpy() for tensor in _flatten(vm.get_outputs("main"))]
        timer = vm.time_evaluator("invoke_stateful", device, number=1, repeat=max(1, repeats))
        latency = float(np.median(timer("main").results))
    except Exception as error:  # TVM raises its own error types for remote failures
        if isinstance(error, BackendError):
            raise
        raise RPCError(f"running the model on {where} failed: {_message(error)}") from error
    log.info("ran on %s: %d output(s), median %.3f ms", where, len(outputs), latency * 1e3)
    return RunResult(outputs, latency, where)


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _bounded(call: Callable[[], T], timeout: float, what: str) -> T:
    """``call()`` on a worker thread; `RPCError` if it fails or has not returned after ``timeout`` seconds."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            result.append(call())
        except BaseException as error:  # handed to the caller's thread
            errors.append(error)

    worker = threading.Thread(target=work, daemon=True, name=f"lowbit-rpc-connect {what}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RPCError(f"cannot reach {what}: no answer within {timeout:g} s")
    if errors:
        raise RPCError(f"cannot reach {what}: {_message(errors[0])}") from errors[0]
    return result[0]


def _wait_until(ready: Callable[[], bool], timeout: float, message: str, process: _Process) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.process.poll() is not None:
            raise RPCError(f"{message}: {process.failure()}")
        if time.monotonic() > deadline:
            raise RPCError(f"{message} within {timeout:g} s")
        time.sleep(0.2)


def _message(error: BaseException) -> str:
    """The last line of an error's text: TVM puts its message after a C++ traceback."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


__all__ = [
    "Address",
    "DEFAULT_TIMEOUT",
    "RPCError",
    "RunResult",
    "Server",
    "Tracker",
    "bind_inputs",
    "connect",
    "free_port",
    "free_servers",
    "run_artifact",
    "tracker_summary",
]
