"""MobileNetV3-Small (torchvision, random weights) with w8a8 for ARM: it compiles in under two minutes, as every vision
model should, with every quantized layer on an int8 kernel (depthwise ones included), and its exported library runs on
an emulated Cortex-A76 with the torch target's values."""

from __future__ import annotations

import time

import pytest
import torch

import lowbit
from lowbit import zoo
from lowbit.backends.tvm import qemu

#: Seconds a vision model may take to compile (quantization passes included; no tuning).
COMPILE_SECONDS = 120


@pytest.mark.slow
def test_w8a8_arm_compiles_in_two_minutes_and_runs_on_a_cortex_a76(arm_emulator, tmp_path) -> None:
    entry = zoo.build("mobilenet_v3_small")
    model, x = entry.model.eval(), entry.example_inputs[0]
    generator = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(x.shape, generator=generator),) for _ in range(2)]
    reference = lowbit.compile(model, (x,), recipe="w8a8-arm", calibration=calibration, target="torch")
    start = time.perf_counter()
    compiled = lowbit.compile(model, (x,), recipe="w8a8-arm", calibration=calibration)
    seconds = time.perf_counter() - start
    assert seconds < COMPILE_SECONDS, f"compiling took {seconds:.0f} s"
    assert compiled.report.fallbacks == []
    result = qemu.run_artifact(compiled.export(tmp_path / "mobilenet"), [x.numpy()], cpu="cortex-a76", timeout=120)
    assert torch.equal(torch.from_numpy(result.outputs[0]), reference(x))
