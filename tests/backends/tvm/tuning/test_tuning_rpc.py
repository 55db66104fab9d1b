"""Remote tuning over TVM RPC on loopback: a real tracker and servers as subprocesses, bounded failures.

The tests with tracker and server subprocesses are slow (each process imports TVM,
20 s on a shared machine); the failure tests need no subprocess and stay fast.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from tvm import rpc

from lowbit.backends.tvm.kernels.generic import packed_linear
from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.tuning import LocalRunner, MeasureOptions, RPCDevice, RPCRunner, Tuner, TuningOptions
from lowbit.cli import main
from lowbit.errors import BackendError

HOST = "127.0.0.1"
KEY = "loopback"
SPEC = PackedLinearSpec(
    batch=1, in_features=128, out_features=16, bits=4, group_size=64, asymmetric=False, has_bias=False
)
TENSORS = {
    "qweight": torch.randint(0, 256, (16, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)),
    "scales": torch.full((16, 2), 0.25),
    "zeros": None,
    "g_idx": None,
    "bias": None,
}
FAST = MeasureOptions(repeat=2, min_repeat_ms=1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _wait(ready, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except (OSError, RuntimeError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not come up within {timeout} s")


def _free_servers(port: int) -> int:
    with socket.create_connection((HOST, port), timeout=2):
        pass
    info = rpc.connect_tracker(HOST, port).summary()["queue_info"]
    return int(info.get(KEY, {}).get("free", 0))


@pytest.fixture(scope="module")
def tracker() -> Iterator[int]:
    """A tracker with one server registered under `KEY` and one direct server; yields (tracker port, server port)."""
    tracker_port, server_port, direct_port = _free_port(), _free_port(), _free_port()
    processes = [
        _start(
            "tvm.exec.rpc_tracker",
            "--host",
            HOST,
            "--port",
            str(tracker_port),
            "--port-end",
            str(tracker_port + 1),
            "--silent",
        )
    ]
    try:
        _wait(lambda: rpc.connect_tracker(HOST, tracker_port).summary() is not None, "the RPC tracker")
        processes.append(
            _start(
                "tvm.exec.rpc_server",
                "--host",
                HOST,
                "--port",
                str(server_port),
                "--port-end",
                str(server_port + 1),
                "--tracker",
                f"{HOST}:{tracker_port}",
                "--key",
                KEY,
                "--silent",
            )
        )
        processes.append(
            _start(
                "tvm.exec.rpc_server",
                "--host",
                HOST,
                "--port",
                str(direct_port),
                "--port-end",
                str(direct_port + 1),
                "--silent",
            )
        )
        _wait(lambda: _free_servers(tracker_port) > 0, "the RPC server")
        _wait(lambda: socket.create_connection((HOST, direct_port), timeout=2).close() is None, "the direct server")
        yield tracker_port, direct_port
    finally:
        for process in processes:
            _stop(process)


@pytest.mark.slow
def test_remote_measurement_through_a_tracker_matches_local(tracker):
    target = resolve_target("x86")
    planned = packed_linear.KERNEL.plan(SPEC, TENSORS, target)
    runner = RPCRunner(target, RPCDevice(HOST, tracker[0], KEY, timeout_s=20), FAST)
    remote = runner.measure(planned.func, planned.consts)
    local = LocalRunner(target, FAST).measure(planned.func, planned.consts)
    np.testing.assert_array_equal(remote.output, local.output)
    assert remote.seconds > 0


@pytest.mark.slow
def test_tuning_on_a_direct_rpc_server(tracker, tmp_path):
    target = resolve_target("x86")
    tuner = Tuner(
        target,
        tmp_path,
        TuningOptions(trials=2, rpc=RPCDevice(HOST, tracker[1], timeout_s=20), measure=FAST),
        shipped=(),
    )
    assert tuner.knobs(packed_linear.KERNEL, SPEC, TENSORS) is not None
    tuner.close()
    assert isinstance(tuner.runner, RPCRunner) and tuner.results[0].measured_now == 2


@pytest.mark.slow
def test_unknown_key_is_a_clear_error(tracker):
    start = time.monotonic()
    with pytest.raises(BackendError, match=f"no device with key 'phone'.*{KEY}"):
        RPCRunner(resolve_target("x86"), RPCDevice(HOST, tracker[0], "phone", timeout_s=5))._connect()
    assert time.monotonic() - start < 10


def test_unreachable_tracker_fails_fast():
    start = time.monotonic()
    with pytest.raises(BackendError, match="cannot reach tracker"):
        RPCRunner(resolve_target("x86"), RPCDevice(HOST, _free_port(), KEY, timeout_s=3))._connect()
    assert time.monotonic() - start < 5


def test_silent_peer_times_out_instead_of_hanging():
    with socket.socket() as silent:  # accepts connections, never answers the RPC handshake
        silent.bind((HOST, 0))
        silent.listen()
        start = time.monotonic()
        with pytest.raises(BackendError, match="no answer within 2 s"):
            RPCRunner(resolve_target("x86"), RPCDevice(HOST, silent.getsockname()[1], KEY, timeout_s=2))._connect()
        assert time.monotonic() - start < 8


MODEL = """
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 32)).eval(), (torch.randn(2, 128),)
"""


@pytest.fixture
def cli_model(tmp_path, monkeypatch) -> list[str]:
    (tmp_path / "tuning_rpc_model.py").write_text(MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    return [
        "compile",
        "tuning_rpc_model:build",
        "--pass",
        "rtn:bits=4,group_size=64",
        "--target",
        "x86",
        "--tune",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]


@pytest.mark.parametrize("flags", [["--tune-timeout", "5"], ["--tune-rpc", f"{HOST}:9", "--tune-timeout", "0"]])
def test_cli_tune_timeout_needs_a_device_and_a_positive_value(cli_model, capsys, flags):
    assert main(cli_model + flags) == 2
    assert "--tune-timeout S (S > 0) bounds each step on the device given by --tune-rpc" in capsys.readouterr().err


def test_cli_tune_timeout_bounds_a_silent_device(cli_model, capsys):
    with socket.socket() as silent:  # accepts connections, never answers the RPC handshake
        silent.bind((HOST, 0))
        silent.listen()
        start = time.monotonic()
        code = main(cli_model + ["--tune-rpc", f"{HOST}:{silent.getsockname()[1]}", "--tune-timeout", "2"])
        assert time.monotonic() - start < 15
    error = capsys.readouterr().err
    assert code == 2 and "stopped after 0 of" in error and "no answer within 2 s" in error
