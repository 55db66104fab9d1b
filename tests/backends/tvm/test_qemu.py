"""ARM artifacts cross-compiled here run under qemu-user (an RPC server in an emulated aarch64 Python).

These need qemu-aarch64, the aarch64 cross g++ and the emulated runtime root of
``scripts/setup_arm.sh`` (CI's ``scripts/setup.sh`` runs it); without them they skip
and say which one is missing.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.backends.tvm import qemu, rpc

from helpers import norm_mlp


@pytest.mark.usefixtures("arm_emulator")
def test_fp32_w4a16_and_w4a8_artifacts_run_under_qemu(tmp_path) -> None:
    model, x = norm_mlp(), torch.randn(4, 128)
    fp32 = lowbit.compile(model, (x,), target="arm")
    w4 = lowbit.compile(model, (x,), recipe="w4a16-arm")
    assert [linear.kernel for linear in w4._runner.linears] == ["packed_gemm", "packed_gemm"]
    # One int8-activation layer (a second one would quantize the first one's float output,
    # where a last-bit difference may move an activation code across a rounding boundary).
    a8_model = nn.Sequential(nn.Linear(128, 64), nn.GELU()).eval()
    w4a8 = lowbit.compile(
        a8_model,
        (x,),
        target="arm",
        passes=[lowbit.passes.get("rtn", bits=4, group_size=64), lowbit.passes.get("quantize_activations")],
    )
    assert [linear.kernel for linear in w4a8._runner.linears] == ["a8_linear_arm"]
    paths = fp32.export(tmp_path / "fp32"), w4.export(tmp_path / "w4a16"), w4a8.export(tmp_path / "w4a8")
    with qemu.emulated_server() as server:
        results = [
            rpc.run_artifact(path, [x.numpy()], rpc=str(server.address), timeout=120, repeats=1) for path in paths
        ]
    with torch.no_grad():  # the quantized graphs' custom ops are the torch references
        expected = [model(x).numpy(), w4.graph(x).numpy(), w4a8.graph(x).numpy()]
    for result, reference in zip(results, expected):
        np.testing.assert_allclose(result.outputs[0], reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_missing_root_names_the_setup_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LOWBIT_ARM_ROOT", str(tmp_path / "nothing"))
    with pytest.raises(qemu.EmulatorUnavailable, match="bash scripts/setup_arm.sh"):
        qemu.find_root()


def test_missing_qemu_names_the_package(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(qemu.EmulatorUnavailable, match="qemu-user"):
        qemu.qemu_binary()


def test_unavailable_reason_names_what_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LOWBIT_ARM_ROOT", str(tmp_path / "nothing"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "aarch64-linux-gnu-g++" in qemu.unavailable_reason()
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert "bash scripts/setup_arm.sh" in qemu.unavailable_reason()


@pytest.mark.slow
@pytest.mark.usefixtures("arm_emulator")
def test_transformer_w4a16_runs_under_qemu(tmp_path) -> None:
    """A small llama (attention, RMSNorm, SwiGLU) at W4A16 through the plain emulated run."""
    from lowbit import zoo

    built = zoo.build("llama-tiny")
    compiled = lowbit.compile(
        built.model, built.example_inputs, example_kwargs=built.example_kwargs, recipe="w4a16-arm"
    )
    path = compiled.export(tmp_path / "llama")
    inputs = [t.numpy() for t in built.example_inputs] + [v.numpy() for v in built.example_kwargs.values()]
    result = qemu.run_artifact(path, inputs)
    with torch.no_grad():
        expected = compiled.graph(*built.example_inputs, **built.example_kwargs)
    expected = torch.utils._pytree.tree_leaves(expected)[0]  # the logits
    np.testing.assert_allclose(result.outputs[0], expected.numpy(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.slow
@pytest.mark.usefixtures("arm_emulator")
def test_cli_runs_an_arm_artifact_on_an_emulated_device_behind_a_tracker(tmp_path, capsys) -> None:
    """The deployment path: tracker, an aarch64 device registered under a key, ``lowbit run --rpc --key``."""
    from lowbit.cli import main

    model, x = norm_mlp(), torch.randn(4, 128)
    path = lowbit.compile(model, (x,), recipe="w4a16-arm").export(tmp_path / "w4a16")
    np.savez(tmp_path / "x.npz", x.numpy())
    with rpc.Tracker() as tracker, qemu.emulated_server(tracker=tracker.address, key="a76"):
        code = main(
            [
                "-q",
                "run",
                str(path),
                "--input",
                str(tmp_path / "x.npz"),
                "--rpc",
                str(tracker.address),
                "--key",
                "a76",
                "--timeout",
                "120",
                "--repeats",
                "1",
            ]
        )
    out = capsys.readouterr().out
    assert code == 0 and "output 0: float32[4, 32]" in out and "(key 'a76')" in out


@pytest.mark.slow
@pytest.mark.usefixtures("arm_emulator")
def test_every_int8_arm_recipe_runs_its_kernel_under_qemu(tmp_path) -> None:
    """W1.58A8, W2A8, W4A8 and W8A8 recipes: each quantized linear on the sdot kernel, outputs as the torch reference
    (the ternary recipe keeps the last linear, a classifier, in floating point)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    x = torch.randn(8, 256)
    calibration = [(torch.randn(8, 256),) for _ in range(4)]
    compiled = {
        recipe: lowbit.compile(model, (x,), recipe=recipe, calibration=calibration)
        for recipe in ("w1.58a8-arm", "w2a8-arm", "w4a8-arm", "w8a8-arm")
    }
    paths = []
    for recipe, model_a8 in compiled.items():
        quantized = 1 if recipe.startswith("w1.58") else 2
        assert [linear.kernel for linear in model_a8._runner.linears] == ["a8_linear_arm"] * quantized, recipe
        paths.append(model_a8.export(tmp_path / recipe))
    with qemu.emulated_server() as server:
        results = [
            rpc.run_artifact(path, [x.numpy()], rpc=str(server.address), timeout=120, repeats=1) for path in paths
        ]
    for (recipe, model_a8), result in zip(compiled.items(), results):
        with torch.no_grad():
            reference = model_a8.graph(x).numpy()
        np.testing.assert_allclose(
            result.outputs[0], reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max(), err_msg=recipe
        )
