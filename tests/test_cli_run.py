"""``lowbit run ARTIFACT``: local runs with the TVM runtime, inputs from .npz, and clear errors for devices."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.backends.tvm import rpc
from lowbit.cli import main


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh()).eval()
    x = torch.randn(2, 16)
    compiled = lowbit.compile(model, (x,), target="x86")
    return compiled.export(tmp_path_factory.mktemp("cli") / "x86"), model, x


def test_run_random_inputs_prints_outputs_and_latency(artifact, capsys) -> None:
    path, _, _ = artifact
    assert main(["-q", "run", str(path), "--random", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "output 0: float32[2, 8] mean" in out
    assert "latency:" in out and "(median of 3) on local cpu" in out


@pytest.mark.parametrize("by_name", [True, False])
def test_run_inputs_from_npz(artifact, tmp_path, capsys, by_name) -> None:
    path, model, x = artifact
    file = tmp_path / "inputs.npz"
    np.savez(file, **{"input": x.numpy()}) if by_name else np.savez(file, x.numpy())
    assert main(["-q", "run", str(path), "--input", str(file), "--repeats", "1"]) == 0
    with torch.no_grad():
        expected = model(x).numpy()
    assert f"max {expected.max():.6g}" in capsys.readouterr().out


def test_unreachable_device_exits_2_within_the_timeout(artifact, capsys) -> None:
    path, _, _ = artifact
    port = rpc.free_port()
    start = time.monotonic()
    assert main(["-q", "run", str(path), "--rpc", f"127.0.0.1:{port}", "--timeout", "3"]) == 2
    assert time.monotonic() - start < 10
    assert f"cannot reach RPC server 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--key", "arm"], "--key names a device at an RPC tracker"),
        (["--rpc", "nohost"], "HOST:PORT"),
        (["--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_options_exit_2(artifact, capsys, extra, message) -> None:
    path, _, _ = artifact
    assert main(["-q", "run", str(path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_wrong_inputs_and_missing_artifact_exit_2(artifact, tmp_path, capsys) -> None:
    path, _, _ = artifact
    file = tmp_path / "bad.npz"
    np.savez(file, np.zeros((3, 16), np.float32))
    assert main(["-q", "run", str(path), "--input", str(file)]) == 2
    assert "must be float32 of shape (2, 16)" in capsys.readouterr().err
    assert main(["-q", "run", str(tmp_path / "nothing")]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_arm_artifact_here_points_at_rpc(tmp_path, capsys) -> None:
    compiled = lowbit.compile(nn.Linear(8, 4), (torch.randn(1, 8),), target="arm")
    path = compiled.export(tmp_path / "arm")
    assert main(["-q", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "library for aarch64" in err and "--rpc HOST:PORT" in err


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


def test_run_random_token_ids_stay_in_the_vocabulary_and_bad_ones_exit_2(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    compiled = lowbit.compile(_TokenModel().eval(), (torch.randint(0, 10, (2, 6)),), target="x86")
    path = compiled.export(tmp_path / "tokens")
    assert main(["-q", "run", str(path), "--random", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "output 0: float32[2, 6, 4] mean" in out and "nan" not in out
    file = tmp_path / "ids.npz"
    np.savez(file, ids=np.full((2, 6), 5000, dtype=np.int64))
    assert main(["-q", "run", str(path), "--input", str(file), "--repeats", "1"]) == 2
    assert "input 'ids' holds 5000, outside [0, 10)" in capsys.readouterr().err
