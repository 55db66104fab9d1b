"""The aarch64 int8 depthwise kernel (NEON ``smlal``): bit-exact against ``conv_packed_a8`` under qemu, picked for
depthwise layers, and a w8a8-arm CNN compiled with no depthwise fallback.

The layers are cross-compiled into one library and run on an emulated Cortex-A76; without qemu, the cross g++ or
the emulated root of ``scripts/setup_arm.sh`` those tests skip.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import tvm
from tvm.support import cc

import lowbit
from lowbit.backends.tvm import ARM_CXX, qemu, rpc
from lowbit.backends.tvm.kernels.arm import a8_depthwise, a8_linear
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec
from lowbit.backends.tvm.kernels.spec import KernelPlan
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.toolchains.cpu import CPUToolchain
from lowbit.errors import BackendError
from lowbit.ir import ops_conv, packing

ARM = resolve_target("arm")


def _layer(
    channels: int,
    kernel: int,
    stride: int,
    padding: int,
    size: int = 9,
    bits: int = 8,
    asymmetric: bool = False,
    batch: int = 1,
    dilation: int = 1,
    seed: int = 0,
) -> tuple[ConvSpec, dict[str, Any], torch.Tensor]:
    """A random depthwise layer (NCHW input), its tensors as the lowering hands them over, and its spec."""
    gen = torch.Generator().manual_seed(seed)
    taps = kernel * kernel
    codes = torch.randint(0, 1 << bits, (channels, taps), generator=gen).to(torch.uint8)
    tensors = {
        "qweight": packing.pack(codes, bits),
        "scales": torch.rand(channels, 1, generator=gen) / 50,
        "zeros": torch.randint(0, 1 << bits, (channels, 1), generator=gen).float() if asymmetric else None,
        "g_idx": None,
        "bias": None,
        "act_scale": torch.tensor(0.03),
    }
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    spec = ConvSpec(
        batch=batch * out * out, in_features=taps, out_features=channels, bits=bits, group_size=taps,
        asymmetric=asymmetric, has_bias=False, act_bits=8, act_dynamic=False, image=(batch, size, size, channels),
        out_size=(out, out), kernel_size=(kernel, kernel), stride=(stride, stride), padding=(padding, padding),
        dilation=(dilation, dilation), conv_groups=channels,
    )  # fmt: skip
    return spec, tensors, torch.randn(batch, channels, size, size, generator=gen) * 2


def _reference(spec: ConvSpec, tensors: dict[str, Any], x: torch.Tensor) -> np.ndarray:
    t = tensors
    y = ops_conv.conv_packed_a8(
        x, t["qweight"], t["scales"], t["zeros"], None, None, spec.bits, spec.group_size, spec.in_features,
        list(spec.kernel_size), list(spec.stride), list(spec.padding), list(spec.dilation), spec.conv_groups,
        t["act_scale"],
    )  # fmt: skip
    return y.permute(0, 2, 3, 1).reshape(spec.batch, spec.out_features).numpy()


def _run_under_qemu(
    layers: list[tuple[ConvSpec, dict[str, Any], torch.Tensor]], tmp_path, knobs: list[dict[str, int] | None]
) -> list[np.ndarray]:
    """Plan, cross-compile all layers into one library, and run each on the emulated Cortex-A76."""
    if (reason := qemu.unavailable_reason()) is not None:
        pytest.skip(reason)
    plans = [a8_depthwise.KERNEL.plan(spec, tensors, ARM, k) for (spec, tensors, _), k in zip(layers, knobs)]
    assert all(isinstance(planned, KernelPlan) for planned in plans), plans
    mod = tvm.IRModule({f"layer{i}": p.func.with_attr("global_symbol", f"layer{i}") for i, p in enumerate(plans)})
    library = tmp_path / "depthwise.so"
    tvm.compile(mod, target=ARM).export_library(str(library), fcompile=cc.cross_compiler(ARM_CXX))
    outputs = []
    with qemu.emulated_server() as server:
        session = rpc.connect(str(server.address), timeout=120)
        session.upload(str(library))
        module, device = session.load_module(library.name), session.cpu()
        for index, ((spec, _, x), planned) in enumerate(zip(layers, plans)):
            image = x.permute(0, 2, 3, 1).reshape(*spec.image[:2], -1).contiguous()
            args = [tvm.runtime.tensor(a.numpy(), device) for a in [image, *planned.consts]]
            y = tvm.runtime.tensor(np.zeros((spec.batch, spec.out_features), np.float32), device)
            module[f"layer{index}"](*args, y)
            outputs.append(y.numpy())
    return outputs


def test_depthwise_layers_are_bit_exact_under_qemu(tmp_path) -> None:
    """3x3 and 5x5, stride 1 and 2, padded or not, symmetric 8-bit and asymmetric 8- and 4-bit weights, channel
    counts that fill the vectors (16, 24, 32) and ones the kernel pads (13, 20), two images, several tiles."""
    cases = [
        (dict(channels=16, kernel=3, stride=1, padding=1), None),
        (dict(channels=24, kernel=5, stride=2, padding=2, size=11, asymmetric=True), None),
        (dict(channels=13, kernel=3, stride=2, padding=1, bits=4, asymmetric=True, batch=2), None),
        (dict(channels=32, kernel=5, stride=1, padding=2, size=7), {"col_tile": 7, "channel_tile": 32}),
        (dict(channels=20, kernel=3, stride=1, padding=0, dilation=2), {"col_tile": 1, "channel_tile": 8}),
        (dict(channels=16, kernel=3, stride=2, padding=0, size=10, asymmetric=True), {"col_tile": 8}),
    ]
    layers = [_layer(**shape, seed=seed) for seed, (shape, _) in enumerate(cases)]
    outputs = _run_under_qemu(layers, tmp_path, [knobs for _, knobs in cases])
    for (spec, tensors, x), got in zip(layers, outputs):
        np.testing.assert_array_equal(got, _reference(spec, tensors, x), err_msg=str(spec))


def test_the_kernel_multiplies_with_widening_neon_instructions() -> None:
    spec, tensors, _ = _layer(24, 3, 1, 1)
    planned = a8_depthwise.KERNEL.plan(spec, tensors, ARM)
    assembly = tvm.compile(
        tvm.IRModule({"k": planned.func.with_attr("global_symbol", "k")}), target=ARM
    ).mod.inspect_source("asm")
    assert "smlal\tv" in assembly and "smlal2\tv" in assembly


def test_the_arm_toolchain_tries_it_first_for_depthwise_layers_only() -> None:
    toolchain = CPUToolchain(ARM)
    spec, _, _ = _layer(16, 3, 1, 1)
    assert toolchain.kernels(spec)[0] is a8_depthwise.KERNEL
    ungrouped = ConvSpec(**{**vars(spec), "conv_groups": 1})
    assert a8_depthwise.KERNEL not in toolchain.kernels(ungrouped)
    assert a8_linear.KERNEL in toolchain.kernels(ungrouped)


def test_layers_and_targets_it_refuses_get_a_reason() -> None:
    spec, tensors, _ = _layer(16, 3, 1, 1, asymmetric=True)
    assert a8_depthwise.KERNEL.supports(spec, tensors, ARM) is None
    refusals = [
        ({"conv_groups": 1}, "depthwise convolutions only"),
        ({"conv_groups": 4}, "not one channel each"),
        ({"act_dynamic": True}, "static int8 input step"),
    ]
    for change, reason in refusals:
        assert reason in a8_depthwise.KERNEL.supports(ConvSpec(**{**vars(spec), **change}), tensors, ARM)
    assert "aarch64 LLVM target" in a8_depthwise.KERNEL.supports(spec, tensors, resolve_target("x86"))
    no_dotprod = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    assert a8_depthwise.KERNEL.supports(spec, tensors, no_dotprod) is None  # smlal is base NEON
    assert "fractional zero points" in a8_depthwise.KERNEL.supports(
        spec, {**tensors, "zeros": tensors["zeros"] + 0.5}, ARM
    )
    for zero, fits in ((32768, True), (32769, False), (255 - 32767, True), (255 - 32768, False)):
        reason = a8_depthwise.KERNEL.supports(spec, {**tensors, "zeros": torch.full((16, 1), float(zero))}, ARM)
        assert (reason is None) == fits and (fits or "fit int16" in reason), (zero, reason)
    with pytest.raises(BackendError, match="channel_tile=12 is not a multiple of 8"):
        a8_depthwise.KERNEL.plan(spec, tensors, ARM, {"channel_tile": 12})
    for name, values in a8_depthwise.KERNEL.knobs.items():  # the hand schedule lies inside the tuning space
        assert a8_depthwise.KERNEL.default_knobs(spec, ARM)[name] in values


class DepthwiseNet(nn.Module):
    """A stem, depthwise-separable blocks (3x3 and strided 5x5 depthwise convolutions, 24 and 20 channels), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 20, 1), nn.BatchNorm2d(20), nn.ReLU(),
            nn.Conv2d(20, 20, 5, stride=2, padding=2, groups=20), nn.BatchNorm2d(20), nn.ReLU(),
            nn.Conv2d(20, 32, 1),
        )  # fmt: skip
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def depthwise_net() -> tuple[Any, Any, torch.Tensor]:
    """`DepthwiseNet` with w8a8-arm: the torch target's model, the ARM one (compiled once), an input."""
    torch.manual_seed(0)
    net = DepthwiseNet().eval()
    calibration = [(torch.randn(1, 3, 16, 16),) for _ in range(2)]
    x = calibration[0][0]
    reference = lowbit.compile(net, (x,), recipe="w8a8-arm", calibration=calibration, target="torch")
    compiled = lowbit.compile(net, (x,), recipe="w8a8-arm", calibration=calibration, target="arm", tune=False)
    return reference, compiled, x


def test_a_w8a8_arm_cnn_has_no_depthwise_fallback(depthwise_net) -> None:
    _, compiled, _ = depthwise_net
    assert compiled.report.fallbacks == []
    kernels = [linear.kernel for linear in compiled.runner.linears]
    assert kernels.count(a8_depthwise.KERNEL_NAME) == 2


def test_the_w8a8_arm_cnn_runs_the_reference_values_under_qemu(depthwise_net, arm_emulator, tmp_path) -> None:
    reference, compiled, x = depthwise_net
    result = qemu.run_artifact(compiled.export(tmp_path / "depthwise"), [x.numpy()], cpu="cortex-a76", timeout=120)
    assert torch.equal(torch.from_numpy(result.outputs[0]), reference(x))
