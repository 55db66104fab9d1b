"""TVM RPC on loopback: a tracker and servers as real subprocesses, remote runs of an artifact, bounded failures."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.backends.tvm import rpc
from lowbit.errors import ArtifactError, BackendError

KEY = "loopback"


@pytest.fixture(scope="module")
def x86_artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = torch.randn(3, 32)
    compiled = lowbit.compile(model, (x,), target="x86")
    return compiled.export(tmp_path_factory.mktemp("rpc") / "x86"), model, x


@pytest.fixture(scope="module")
def tracker():
    with rpc.Tracker() as running, rpc.Server(tracker=running.address, key=KEY):
        yield running


def test_run_through_tracker_matches_local_run(x86_artifact, tracker) -> None:
    path, model, x = x86_artifact
    local = rpc.run_artifact(path, [x.numpy()], repeats=2)
    remote = rpc.run_artifact(path, [x.numpy()], rpc=str(tracker.address), key=KEY, timeout=30, repeats=2)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(local.outputs[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(remote.outputs[0], local.outputs[0])
    assert remote.latency_s > 0 and KEY in remote.device and local.device == "local cpu"


def test_direct_server_session(x86_artifact) -> None:
    path, _, x = x86_artifact
    with rpc.Server() as server:
        session = rpc.connect(str(server.address), timeout=30)
        assert session.cpu().exist
        del session  # a server serves one session at a time
        # run_artifact closes its session, so the next run gets the server at once
        results = [rpc.run_artifact(path, None, rpc=str(server.address), timeout=10, repeats=1) for _ in range(2)]
    assert results[0].outputs[0].shape == (3, 8)
    np.testing.assert_array_equal(results[0].outputs[0], results[1].outputs[0])


def test_unreachable_server_fails_fast_with_a_clear_error() -> None:
    port = rpc.free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(rpc.RPCError, match=f"cannot reach RPC server 127.0.0.1:{port}"):
        rpc.connect(f"127.0.0.1:{port}", timeout=5)
    assert time.monotonic() - start < 5


def test_silent_peer_times_out_instead_of_hanging() -> None:
    with socket.socket() as listener:  # accepts connections but never answers the RPC handshake
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        start = time.monotonic()
        with pytest.raises(rpc.RPCError, match="no answer within 1 s"):
            rpc.connect(f"127.0.0.1:{listener.getsockname()[1]}", timeout=1)
        assert time.monotonic() - start < 3


def test_unknown_key_at_tracker_times_out(tracker) -> None:
    with pytest.raises(rpc.RPCError, match="key 'no-such-device'.*no answer within 2 s"):
        rpc.connect(str(tracker.address), key="no-such-device", timeout=2)


@pytest.mark.parametrize("text", ["localhost", "host:", ":9090", "host:99999", "host:port"])
def test_bad_address_is_named(text) -> None:
    with pytest.raises(rpc.RPCError, match="HOST:PORT"):
        rpc.Address.parse(text)


def test_server_at_tracker_needs_a_key(tracker) -> None:
    with pytest.raises(rpc.RPCError, match="needs a key"):
        rpc.Server(tracker=tracker.address)


def test_inputs_are_checked_against_the_compiled_signature(x86_artifact) -> None:
    path, _, _ = x86_artifact
    with pytest.raises(rpc.RPCError, match=r"must be float32 of shape \(3, 32\)"):
        rpc.run_artifact(path, [np.zeros((2, 32), np.float32)])
    with pytest.raises(rpc.RPCError, match="takes 1 inputs"):
        rpc.run_artifact(path, [])
    with pytest.raises(rpc.RPCError, match="missing"):
        rpc.run_artifact(path, {"wrong": np.zeros((3, 32), np.float32)})


def test_torch_artifact_is_not_a_tvm_artifact(tmp_path) -> None:
    compiled = lowbit.compile(nn.Linear(4, 2), (torch.randn(1, 4),), target="torch")
    with pytest.raises((ArtifactError, BackendError), match="TVM targets"):
        rpc.run_artifact(compiled.export(tmp_path / "torch"))


def test_cli_runs_on_the_device_behind_the_tracker(x86_artifact, tracker, capsys) -> None:
    from lowbit.cli import main

    path, _, _ = x86_artifact
    assert (
        main(["-q", "run", str(path), "--rpc", str(tracker.address), "--key", KEY, "--timeout", "30", "--repeats", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "output 0: float32[3, 8]" in out and f"on {tracker.address} (key '{KEY}')" in out


def test_server_that_cannot_start_reports_what_it_said(tmp_path) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no TVM on this device' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(rpc.RPCError, match="did not start: no TVM on this device"):
        rpc.Server(python=str(broken), timeout=10)
