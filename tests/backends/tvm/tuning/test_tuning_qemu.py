"""Tuning ARM kernels on an emulated aarch64 device: candidates cross-compiled here, measured under qemu-user.

The device is a TVM RPC server in the emulated aarch64 Python of ``scripts/setup_arm.sh``
on a Cortex-A76 (NEON dot-product), reached directly or through a tracker with a key.
Nothing here can run aarch64 code, so every measurement and every output check of a
candidate happened on the emulated device. Emulated times are meaningless; the tests
check the path: records keyed by the ARM target, checked outputs, no re-measuring with a
warm database, clear errors when the device dies or hangs, and resuming afterwards.
Without qemu-aarch64, the aarch64 cross g++ or the emulated root they skip and say which.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.backends.tvm import qemu, rpc
from lowbit.backends.tvm.kernels.arm import a8_linear as a8_linear_arm
from lowbit.backends.tvm.kernels.generic import packed_linear
from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.tuning import MeasureOptions, RPCDevice, RPCRunner, Tuner, TuningOptions
from lowbit.backends.tvm.tuning.database import SUBDIR, canonical_target, read_database
from lowbit.backends.tvm.tuning.measure import example_arguments
from lowbit.errors import BackendError
from lowbit.ir import ops, packing

from helpers import seeded_mlp

KEY = "a76"
FAST = MeasureOptions(repeat=2, min_repeat_ms=1)
#: Seconds each remote step may take: leaves room for emulation on a loaded machine.
TIMEOUT = 60.0
SPEC = PackedLinearSpec(
    batch=2, in_features=128, out_features=32, bits=4, group_size=64, asymmetric=False, has_bias=False
)


def _tensors() -> dict[str, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (SPEC.out_features, SPEC.in_features), dtype=torch.uint8, generator=generator)
    scales = torch.rand(SPEC.out_features, SPEC.in_features // SPEC.group_size, generator=generator) * 0.1 + 0.01
    return {"qweight": packing.pack(codes, SPEC.bits), "scales": scales, "zeros": None, "g_idx": None, "bias": None}


def _model() -> nn.Module:
    """Two linears with an exact activation between them: the second int8-activation layer quantizes the
    first one's output, where a last-bit difference (GELU here and on the device) could move an activation code."""
    return seeded_mlp(128, 64, 32).eval()


def _calibration() -> list[tuple[torch.Tensor]]:
    """Input batches for the GPTQ recipes (w4a8-arm, w2a8-arm)."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 128, generator=generator),) for _ in range(4)]


def _database(cache: Path) -> dict[str, Any]:
    """The one tuning database file under ``cache``, parsed and checked against the ARM target."""
    files = sorted((cache / SUBDIR).glob("*.json"))
    assert len(files) == 1, files
    arm = canonical_target(resolve_target("arm"))
    assert arm["mtriple"].startswith("aarch64") and "+dotprod" in arm["mattr"]
    data = json.loads(files[0].read_text())
    assert data["target"] == arm
    return read_database(files[0], arm)


def _join_abandoned_rpc_calls() -> None:
    """Wait for worker threads of timed-out RPC calls: they return once their device is gone."""
    for thread in threading.enumerate():
        if thread.name == "lowbit-rpc":
            thread.join(30)


@pytest.fixture(scope="module")
def devices(arm_emulator: None) -> Iterator[tuple[rpc.Tracker, rpc.Server]]:
    """A tracker with an emulated Cortex-A76 registered under `KEY`, and a second one reached directly."""
    with (
        rpc.Tracker() as tracker,
        qemu.emulated_server(tracker=tracker.address, key=KEY),
        qemu.emulated_server() as direct,
    ):
        yield tracker, direct


@pytest.mark.usefixtures("arm_emulator")
def test_arm_candidate_is_measured_on_an_emulated_a76_and_matches_the_torch_reference() -> None:
    """One W4A16 kernel: built here for aarch64, exported with the cross g++, uploaded and timed under qemu."""
    target = resolve_target("arm")
    tensors = _tensors()
    planned = packed_linear.KERNEL.plan(SPEC, tensors, target)
    with qemu.emulated_server() as server:
        runner = RPCRunner(target, RPCDevice(server.address.host, server.address.port, timeout_s=TIMEOUT), FAST)
        measured = runner.measure(planned.func, planned.consts)
        runner.close()
    x = torch.from_numpy(example_arguments(planned.func, planned.consts)[0])
    expected = ops.linear_packed(
        x, tensors["qweight"], tensors["scales"], None, None, None, SPEC.bits, SPEC.group_size, SPEC.in_features
    ).numpy()
    assert measured.seconds > 0
    np.testing.assert_allclose(measured.output, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


#: The ARM recipes tuned below and the kernel of their linears: W4A16 on ``packed_linear``; the int8-activation
#: recipes on ``a8_linear_arm``, whose Cortex-A76 hand schedule is its ``sdot`` variant (``i8mm=0``).
RECIPES = {"w4a16-arm": "packed_linear", "w4a8-arm": "a8_linear_arm", "w2a8-arm": "a8_linear_arm"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_tuned_through_a_tracker_on_an_emulated_a76(devices, tmp_path, recipe, caplog) -> None:
    """Every candidate measured and checked on the device (none exhausted unmeasured); the tuned artifact runs
    there correctly; a second compile with the same cache measures nothing (its device is not even needed)."""
    tracker, _ = devices
    kernel = RECIPES[recipe]
    model, x = _model(), torch.randn(2, 128)
    device = RPCDevice(tracker.address.host, tracker.address.port, KEY, timeout_s=TIMEOUT)
    tune = {"trials": 3, "rpc": device, "measure": FAST}
    with caplog.at_level(logging.INFO, logger="lowbit.backends.tvm.tuning"):
        compiled = lowbit.compile(
            model, (x,), recipe=recipe, tune=tune, calibration=_calibration(), cache_dir=tmp_path / "cache"
        )
    # one progress line per counted trial: refused knobs (i8mm on this CPU) are logged at debug level only
    trial_lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and ": trial " in r.getMessage()]
    assert len(trial_lines) == 6 and not any("invalid" in line for line in trial_lines), trial_lines
    assert [linear.kernel for linear in compiled._runner.linears] == [kernel, kernel]
    assert [(result.kernel, result.measured_now) for result in compiled.report.tuning] == [(kernel, 3)] * 2
    records = _database(tmp_path / "cache")
    assert len(records) == 2
    for record in records.values():
        assert record.kernel == kernel and record.confirmed and not record.exhausted
        measured = [t for t in record.trials if t.counted]
        assert [t.outcome for t in measured] == ["measured"] * 3  # each agreed with the hand schedule's output
        assert record.best is not None and record.best.outcome == "measured"
        if kernel == "a8_linear_arm":  # sdot only: the emulated Cortex-A76 (target without +i8mm) has no smmla
            assert all(t.knobs["i8mm"] == 0 for t in measured)
            assert all(t.outcome == "invalid" and "+i8mm" in t.error for t in record.trials if t.knobs["i8mm"])

    path = compiled.export(tmp_path / "tuned")
    result = rpc.run_artifact(path, [x.numpy()], rpc=str(tracker.address), key=KEY, timeout=TIMEOUT, repeats=1)
    with torch.no_grad():
        reference = compiled.graph(x).numpy()
    np.testing.assert_allclose(result.outputs[0], reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())

    unreachable = RPCDevice(tracker.address.host, rpc.free_port(), KEY, timeout_s=2)
    again = lowbit.compile(
        model,
        (x,),
        recipe=recipe,
        tune={**tune, "rpc": unreachable},
        calibration=_calibration(),
        cache_dir=tmp_path / "cache",
    )
    assert [result.measured_now for result in again.report.tuning] == [0, 0]
    assert [r.knobs for r in again.report.tuning] == [r.knobs for r in compiled.report.tuning]


@pytest.mark.slow
def test_kernel_tuned_directly_against_an_emulated_server(devices, tmp_path) -> None:
    """Each candidate is uploaded once: the finalists too, though each is timed in several rounds."""
    _, direct = devices
    target = resolve_target("arm")
    device = RPCDevice(direct.address.host, direct.address.port, timeout_s=TIMEOUT)
    runner = _Counting(target, device, FAST)
    tuner = Tuner(target, tmp_path, TuningOptions(trials=4, rpc=device, measure=FAST), runner=runner, shipped=())
    knobs = tuner.knobs(packed_linear.KERNEL, SPEC, _tensors())
    tuner.close()
    assert tuner.results[0].measured_now == 4
    (record,) = _database(tmp_path).values()
    assert record.confirmed and record.best is not None and record.best.knobs == knobs
    assert [t.outcome for t in record.trials if t.counted] == ["measured"] * 4
    finalists = sum(t.confirmed for t in record.trials if t.counted)
    assert finalists >= 3 and runner.outputs == 0  # the hand schedule came first: its output is the reference
    assert runner.loads == 4 + finalists


class _Counting(RPCRunner):
    """An RPC runner that counts untimed output runs (the hand schedule's reference for the check) and uploads."""

    outputs = loads = 0

    def output(self, func: Any, consts: Any) -> np.ndarray:
        self.outputs += 1
        return super().output(func, consts)

    def _load(self, func: Any, consts: Any) -> Any:
        self.loads += 1
        return super()._load(func, consts)


class _Failing(RPCRunner):
    """An RPC runner whose device is killed or frozen (SIGSTOP) right before its ``fail_at``-th measurement."""

    def __init__(self, *args: Any, server: rpc.Server, fail_at: int, how: signal.Signals) -> None:
        super().__init__(*args)
        self.server, self.fail_at, self.how, self.calls = server, fail_at, how, 0

    def measure(self, func: Any, consts: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            os.killpg(self.server.pid, self.how)
        return super().measure(func, consts)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
@pytest.mark.usefixtures("arm_emulator")
def test_emulated_device_lost_mid_tuning_is_a_clear_error_and_tuning_again_resumes(tmp_path, how) -> None:
    target = resolve_target("arm")
    timeout = 10.0
    options = TuningOptions(trials=5, measure=FAST)
    server = qemu.emulated_server()
    try:
        device = RPCDevice(server.address.host, server.address.port, timeout_s=timeout)
        runner = _Failing(target, device, FAST, server=server, fail_at=3, how=how)
        tuner = Tuner(target, tmp_path, options, runner=runner, shipped=())
        start = time.monotonic()
        with pytest.raises(BackendError, match=r"stopped after 2 of 5 trial\(s\).*resumes.*RPC server") as error:
            tuner.knobs(packed_linear.KERNEL, SPEC, _tensors())
        assert time.monotonic() - start < timeout + 10
        if how == signal.SIGSTOP:
            assert f"no answer within {timeout:g} s" in str(error.value)
    finally:
        if how == signal.SIGSTOP:
            os.killpg(server.pid, signal.SIGCONT)
        server.stop()
        _join_abandoned_rpc_calls()
    (record,) = _database(tmp_path).values()
    assert record.counted == 2 and not record.confirmed
    kept = [trial.knobs for trial in record.trials]

    with qemu.emulated_server() as again:
        device = RPCDevice(again.address.host, again.address.port, timeout_s=TIMEOUT)
        runner = _Counting(target, device, FAST)
        resumed = Tuner(target, tmp_path, options, runner=runner, shipped=())
        resumed.knobs(packed_linear.KERNEL, SPEC, _tensors())
        resumed.close()
    assert resumed.results[0].measured_now == 3
    assert runner.outputs == 1  # the hand schedule's output, for checking the new candidates, came from the device
    (record,) = _database(tmp_path).values()
    assert record.counted == 5 and record.confirmed and [t.knobs for t in record.trials[: len(kept)]] == kept


@pytest.mark.slow
@pytest.mark.usefixtures("arm_emulator")
def test_int8_activation_kernel_tuned_on_an_emulated_cpu_with_i8mm(tmp_path) -> None:
    """The A8 kernel's smmla variant: an aarch64 target with +i8mm, measured on qemu's ``max`` CPU."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(128, 64)).eval(), torch.randn(2, 128)
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]}
    passes = [lowbit.passes.get("rtn", bits=4, group_size=64), lowbit.passes.get("quantize_activations")]
    with qemu.emulated_server(cpu="max") as server:
        device = RPCDevice(server.address.host, server.address.port, timeout_s=TIMEOUT)
        compiled = lowbit.compile(
            model,
            (x,),
            target=target,
            passes=passes,
            cache_dir=tmp_path,
            tune={"trials": 3, "rpc": device, "measure": FAST},
        )
        result = rpc.run_artifact(
            compiled.export(tmp_path / "a8"), [x.numpy()], rpc=str(server.address), timeout=TIMEOUT, repeats=1
        )
    assert [linear.kernel for linear in compiled._runner.linears] == ["a8_linear_arm"]
    (tuning,) = compiled.report.tuning
    assert tuning.kernel == "a8_linear_arm" and tuning.measured_now == 3
    (record,) = read_database(
        next((tmp_path / SUBDIR).glob("*.json")), canonical_target(resolve_target(target))
    ).values()
    # the hand schedule (smmla) first, then its sdot neighbour: both measured, the sdot output checked against
    # the smmla one on the device; which is faster under emulation says nothing, so either may be chosen
    assert [(t.knobs["i8mm"], t.outcome) for t in record.trials[:2]] == [(1, "measured"), (0, "measured")]
    assert record.confirmed and tuning.knobs == record.best.knobs
    with torch.no_grad():
        reference = compiled.graph(x).numpy()
    np.testing.assert_allclose(result.outputs[0], reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("bits, group_size", [(2, 16), (4, 8)])
def test_hand_schedule_on_an_i8mm_target_is_sdot_where_smmla_words_do_not_fit_the_groups(bits, group_size) -> None:
    """The tuner checks every candidate against the hand schedule, and lowering uses the int8 kernel only when
    the hand schedule plans: groups narrower than an smmla word (8 columns × 8 // bits codes) take sdot."""
    target = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]})
    spec = PackedLinearSpec(
        batch=2,
        in_features=64,
        out_features=8,
        bits=bits,
        group_size=group_size,
        asymmetric=False,
        has_bias=False,
        act_bits=8,
        act_dynamic=True,
    )
    codes = torch.randint(0, 2**bits, (8, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tensors = {
        "qweight": packing.pack(codes, bits),
        "scales": torch.full((8, 64 // group_size), 0.1),
        "zeros": None,
        "g_idx": None,
        "bias": None,
        "act_scale": None,
    }
    planned = a8_linear_arm.KERNEL.plan(spec, tensors, target)
    assert not isinstance(planned, str), planned
    assert planned.knobs["i8mm"] == 0
    with pytest.raises(BackendError, match="an i8mm word"):
        a8_linear_arm.KERNEL.plan(spec, tensors, target, {**planned.knobs, "i8mm": 1})
    wide = dataclasses.replace(spec, group_size=64)
    # where the words fit, the hand schedule is smmla
    assert a8_linear_arm.KERNEL.default_knobs(wide, target)["i8mm"] == 1


@pytest.mark.slow
@pytest.mark.usefixtures("arm_emulator")
def test_cli_tunes_on_an_emulated_device_behind_a_tracker_and_runs_the_artifact_there(tmp_path, capsys) -> None:
    """``lowbit compile llama-tiny --recipe w4a8-arm --calibration --tune --tune-rpc --tune-key`` then
    ``lowbit run`` on it: GPTQ weights, int8 activations, every linear's ``sdot`` kernel tuned on the device."""
    from lowbit import zoo
    from lowbit.cli import main

    built = zoo.build("llama-tiny")
    assert not built.example_inputs and list(built.example_kwargs) == ["input_ids", "attention_mask"]
    np.savez(tmp_path / "inputs.npz", *[v.numpy() for v in built.example_kwargs.values()])
    length = built.example_kwargs["input_ids"].shape[1]
    tokens = torch.randint(0, 1000, (8, length), generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "calibration.npz", input_ids=tokens.numpy(), attention_mask=np.ones((8, length), np.int64))
    cache, artifact = tmp_path / "cache", tmp_path / "llama"
    with rpc.Tracker() as tracker, qemu.emulated_server(tracker=tracker.address, key=KEY):
        compile_args = [
            "-q",
            "compile",
            "llama-tiny",
            "--recipe",
            "w4a8-arm",
            "--calibration",
            str(tmp_path / "calibration.npz"),
            "--tune",
            "--tune-trials",
            "2",
            "--tune-rpc",
            str(tracker.address),
            "--tune-key",
            KEY,
            "--tune-timeout",
            str(TIMEOUT),
            "--cache-dir",
            str(cache),
        ]
        assert main([*compile_args, "--export", str(artifact)]) == 0
        first = capsys.readouterr().out
        assert (
            main(
                [
                    "-q",
                    "run",
                    str(artifact),
                    "--input",
                    str(tmp_path / "inputs.npz"),
                    "--rpc",
                    str(tracker.address),
                    "--key",
                    KEY,
                    "--timeout",
                    str(TIMEOUT),
                    "--repeats",
                    "1",
                ]
            )
            == 0
        )
        ran = capsys.readouterr().out
    assert "candidate(s) measured by this compile" in first and " 0 candidate(s) measured" not in first
    assert "output 0: float32[2, 12, 1000]" in ran and f"(key '{KEY}')" in ran
    records = _database(cache).values()
    assert len(records) == 4  # q/o, k/v, gate/up and down projections (lm_head stays float)
    for record in records:
        assert record.kernel == "a8_linear_arm" and record.confirmed
        assert [(t.outcome, t.knobs["i8mm"]) for t in record.trials if t.counted] == [("measured", 0)] * 2
    assert main([*compile_args]) == 0  # the device is gone: the warm database needs none
    assert " 0 candidate(s) measured by this compile" in capsys.readouterr().out
