"""Int8 convolutions on x86 (and ARM, under qemu): ``conv_packed_a8`` layers run the int8 GEMM over their NHWC
patches (depthwise ones a direct int8 kernel), bit for bit the torch target's values, with the model kept NHWC
between them; other grouped ones stay fp32 with their reason. The bias and activation after a layer run in its
kernel's output stage, a SiLU within a few ulps of torch's (its exponential) and bit for bit the unfused
compile's."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import tvm
from tvm import relax

import lowbit
from lowbit.backends.tvm import convert_conv, lowering, qemu, rpc
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec, patch_weight
from lowbit.backends.tvm.kernels.x86 import a8_depthwise, a8_gemm, a8_linear
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.toolchains.cpu import CPUToolchain
from lowbit.backends.tvm.tuning import TuningDatabase, measure
from lowbit.ir import ops_conv, packing
from lowbit.passes.quant import RTN, QuantizeActivations


class ConvReLU(nn.Module):
    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.conv, self.relu = conv, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(y) if self.relu else y


#: (input channels, size, convolution, ReLU after it)
CASES = {
    "1x1": (32, 9, nn.Conv2d(32, 16, 1), False),
    "3x3-padded-relu": (16, 10, nn.Conv2d(16, 32, 3, padding=1), True),
    "3x3-stride2-no-bias": (16, 11, nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), False),
    "1x1-stride2": (16, 10, nn.Conv2d(16, 32, 1, stride=2), True),
    "stem-7x7-three-channels": (3, 20, nn.Conv2d(3, 16, 7, stride=2, padding=3), True),
    "1x3-dilated": (8, 9, nn.Conv2d(8, 16, (1, 3), padding=(0, 2), dilation=(1, 2)), False),
    "depthwise-relu": (32, 10, nn.Conv2d(32, 32, 3, padding=1, groups=32), True),
    "depthwise-stride2-no-bias": (48, 11, nn.Conv2d(48, 48, 3, stride=2, padding=1, groups=48, bias=False), False),
    # Channel counts that are not a multiple of 16 (MobileNetV3-Small's): vectors of 8 lanes.
    "depthwise-72-stride2": (72, 9, nn.Conv2d(72, 72, 3, stride=2, padding=1, groups=72), True),
    "depthwise-88": (88, 6, nn.Conv2d(88, 88, 3, padding=1, groups=88), False),
    "depthwise-120-5x5": (120, 7, nn.Conv2d(120, 120, 5, padding=2, groups=120), True),
    # Output channels that are not a multiple of 16 (EfficientNet-Lite0's and MobileNetV3-Small's projections):
    # weight rows padded to whole tiles, only the layer's outputs stored (`a8_gemm.padded_outputs`).
    "1x1-24-outputs": (32, 9, nn.Conv2d(32, 24, 1), False),
    "3x3-40-outputs-relu": (16, 8, nn.Conv2d(16, 40, 3, padding=1), True),
    "1x1-88-outputs-stride2": (16, 10, nn.Conv2d(16, 88, 1, stride=2), False),
    # A padded copy over 1 MiB as float32: its codes stored as int8 (`a8_depthwise.code_dtype`).
    "depthwise-int8-copy": (64, 66, nn.Conv2d(64, 64, 3, padding=1, groups=64), True),
}


def compiled_pair(
    net: nn.Module, x: torch.Tensor, passes=None, recipe: str | None = None, target: str = "x86"
) -> tuple:
    """The torch target and the ``target`` compile of ``net`` with ``passes`` (a factory) or a ``recipe``."""
    net = net.eval()
    calibration = [(x,), (torch.randn_like(x),)]
    options = {"passes": passes()} if passes is not None else {"recipe": recipe}
    reference = lowbit.compile(net, (x,), **options, calibration=calibration, target="torch")
    options = {"passes": passes()} if passes is not None else {"recipe": recipe}
    compiled = lowbit.compile(net, (x,), **options, calibration=calibration, target=target, tune=False)
    return reference, compiled


def int8_passes(bits: int = 8, group_size: int = -1, symmetric: bool = True):
    return lambda: [RTN(bits=bits, group_size=group_size, symmetric=symmetric), QuantizeActivations(dynamic=False)]


@pytest.mark.parametrize("name", list(CASES))
def test_int8_convolutions_are_bit_exact(name: str) -> None:
    channels, size, conv, relu = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(1, channels, size, size)
    reference, compiled = compiled_pair(ConvReLU(conv, relu), x, int8_passes())
    y = torch.randn(1, channels, size, size) * 1.5
    assert torch.equal(compiled(y), reference(y))
    assert compiled.report.fallbacks == []


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric", "channels"),
    [(4, 16, True, 16), (8, -1, False, 3)],
    ids=["w4-groups", "asymmetric-padded-patch"],
)
def test_grouped_and_asymmetric_weights_are_bit_exact(
    bits: int, group_size: int, symmetric: bool, channels: int
) -> None:
    """Weight groups within a patch row keep torch's (channel, kh, kw) column order (the groups' integer sums are
    exact); asymmetric rows pad the patch (27 columns) to whole words with their zero point."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(2, channels, 8, 8)
    reference, compiled = compiled_pair(net, x, int8_passes(bits, group_size, symmetric))
    if group_size == -1:
        assert torch.equal(compiled(x), reference(x))
    else:  # several groups per row: their float32 sum rounds within an ulp of torch's, as the int8 linears do
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
    assert [linear.kernel for linear in compiled.runner.linears] == [a8_gemm.KERNEL_NAME] * 2


class Block(nn.Module):
    """A ResNet basic block after a stem, a depthwise and a grouped convolution, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.grouped = nn.Conv2d(32, 32, 1, groups=4)
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.conv2(self.conv1(x)) + x)
        x = torch.relu(self.grouped(torch.relu(self.depthwise(x))))
        return self.fc(x.mean((2, 3)))


def test_padded_output_tiles_take_asymmetric_low_bit_weights() -> None:
    """4-bit asymmetric weights on 40 output channels: the padded weight rows (zero codes, zero scales and zero
    points) change no stored output."""
    torch.manual_seed(2)
    x = torch.randn(1, 32, 9, 9)
    reference, compiled = compiled_pair(ConvReLU(nn.Conv2d(32, 40, 1), True), x, int8_passes(4, -1, False))
    y = torch.randn_like(x) * 1.5
    assert torch.equal(compiled(y), reference(y))
    assert [linear.kernel for linear in compiled.runner.linears] == [a8_gemm.KERNEL_NAME]


def test_a_w8a8_cnn_has_only_its_grouped_convolution_on_fp32() -> None:
    torch.manual_seed(2)
    net = Block().eval()
    calibration = [(torch.randn(1, 3, 16, 16),) for _ in range(2)]
    x = calibration[0][0]
    reference = lowbit.compile(net, (x,), recipe="w8a8-x86", calibration=calibration, target="torch")
    compiled = lowbit.compile(net, (x,), recipe="w8a8-x86", calibration=calibration, target="x86", tune=False)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)
    fallbacks = compiled.report.fallbacks
    assert [item.split(" ")[0] for item in fallbacks] == ["grouped"]
    assert "grouped int8 convolution (4 groups)" in fallbacks[0]
    kernels = {linear.node: linear.kernel for linear in compiled.runner.linears}
    assert {kernels[f"{name}_packed_a8"] for name in ("stem_0", "conv1_0", "conv2_0")} == {a8_gemm.KERNEL_NAME}
    assert kernels["depthwise_packed_a8"] == a8_depthwise.KERNEL_NAME


def test_int8_convolutions_keep_the_block_channels_last() -> None:
    """One permutation, the input's: the int8 kernels take and give NHWC; their bias, batch norm, the residual add,
    ReLU, the fp32 grouped convolution and the mean run on NHWC."""
    torch.manual_seed(3)
    net = Block().eval()
    calibration = [(torch.randn(1, 3, 16, 16),) for _ in range(2)]
    x = calibration[0][0]
    graph = lowbit.compile(net, (x,), recipe="w8a8-x86", calibration=calibration, target="torch").graph
    toolchain = CPUToolchain(resolve_target("x86"))
    mod = toolchain.schedule(lowering.lower(graph, (x,), toolchain).mod)
    names = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            names.append(e.args[0].name_hint)
            if isinstance(e, relax.Call) and e.op == tvm.ir.Op.get("relax.call_tir")
            else None
        ),
    )
    assert sum(name.startswith("lowbit_conv_") for name in names) == 4
    assert len([name for name in names if "transpose" in name]) == 1  # the input's


class HardSwishOps(nn.Module):
    """``x · (clamp(x + 3, 0, 6) / 6)`` in torch operators: the float32 steps of Relax's ``hardswish``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (torch.clamp(x + 3, 0, 6) / 6)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, -0.5, 0.75)


#: Activations after a convolution that its kernel applies in its output stage (None: the bias alone).
EPILOGUES = {"bias": None, "relu": nn.ReLU, "relu6": nn.ReLU6, "clamp": Clamp, "hardswish": HardSwishOps}
#: (input channels, convolution) for each int8 kernel: the GEMM, the AVX2 kernel (24 outputs), depthwise.
EPILOGUE_CONVS = {
    "gemm-3x3": (16, lambda: nn.Conv2d(16, 32, 3, padding=1)),
    "linear-1x1": (32, lambda: nn.Conv2d(32, 24, 1)),
    "depthwise-72": (72, lambda: nn.Conv2d(72, 72, 3, padding=1, groups=72)),
}


def fused_calls(net: nn.Module, x: torch.Tensor, target: str = "x86") -> list[str]:
    """The names of the kernels a compiled ``net`` calls (the ``target``'s w8a8 recipe)."""
    calibration = [(x,), (torch.randn_like(x),)]
    graph = lowbit.compile(net, (x,), recipe=f"w8a8-{target}", calibration=calibration, target="torch").graph
    toolchain = CPUToolchain(resolve_target(target))
    mod = toolchain.schedule(lowering.lower(graph, (x,), toolchain).mod)
    names: list[str] = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            names.append(e.args[0].name_hint)
            if isinstance(e, relax.Call) and e.op == tvm.ir.Op.get("relax.call_tir")
            else None
        ),
    )
    return names


@pytest.mark.parametrize("activation", list(EPILOGUES))
@pytest.mark.parametrize("conv", list(EPILOGUE_CONVS))
def test_fused_bias_and_activation_are_bit_exact(conv: str, activation: str) -> None:
    """The kernel planned with its layer's bias and the activation after it replaces the three operators, and
    computes the graph's float32 values bit for bit."""
    channels, make = EPILOGUE_CONVS[conv]
    torch.manual_seed(7)
    act = EPILOGUES[activation]
    net = nn.Sequential(make(), *([act()] if act is not None else [])).eval()
    x = torch.randn(1, channels, 9, 9)
    reference, compiled = compiled_pair(net, x, int8_passes())
    y = torch.randn(1, channels, 9, 9) * 1.5
    assert torch.equal(compiled(y), reference(y))
    assert compiled.report.fallbacks == []
    names = fused_calls(net, x)
    assert len([name for name in names if name.startswith("lowbit_conv_") and name.endswith("_fused")]) == 1
    assert not [name for name in names if "add" in name or "maximum" in name or "minimum" in name or "relu" in name]


def test_an_output_read_twice_keeps_its_activation_outside_the_kernel() -> None:
    """A ReLU6 whose input a residual also reads stays an operator: only the bias is fused."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return torch.nn.functional.relu6(y) + y

    torch.manual_seed(8)
    net = Residual().eval()
    x = torch.randn(1, 16, 8, 8)
    reference, compiled = compiled_pair(net, x, int8_passes())
    assert torch.equal(compiled(x), reference(x))
    names = fused_calls(net, x)
    assert [name for name in names if name.startswith("lowbit_conv_")] == [f"lowbit_conv_{a8_gemm.KERNEL_NAME}_fused"]
    assert any("minimum" in name for name in names)


#: How far a fused SiLU may be from torch's ``F.silu``, relative: 5 float32 ulps of the result, the bound of the
#: compiled graph's ``fast_silu`` (`fastmath`; docs/methods.md), which the kernel computes value for value.
SILU_RTOL = 5 * 2.0**-23


def fused_and_unfused(net: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch, recipe: dict) -> tuple:
    """The torch target, the compile (x86 unless ``recipe`` names a target) with SiLU fused into the convolutions
    and the one without (the same calibration and quantization)."""
    activation = convert_conv._Chains._activation

    def without_silu(chains: convert_conv._Chains, var: relax.Var) -> tuple:
        steps, last = activation(chains, var)
        return ((), var) if ("silu", 0.0) in steps else (steps, last)

    torch.manual_seed(10)
    reference, fused = compiled_pair(net, x, **recipe)
    with monkeypatch.context() as patch:
        patch.setattr(convert_conv._Chains, "_activation", without_silu)
        torch.manual_seed(10)
        _, unfused = compiled_pair(net, x, **recipe)
    return reference, fused, unfused


class SigmoidProduct(nn.Module):
    """SiLU written with torch's sigmoid, ``x · sigmoid(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


@pytest.mark.parametrize("silu", [nn.SiLU, SigmoidProduct], ids=["silu", "x-sigmoid"])
@pytest.mark.parametrize("conv", list(EPILOGUE_CONVS))
def test_fused_silu_is_the_unfused_graph_bit_for_bit(conv: str, silu: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SiLU after the convolution joins its kernel's output stage like the other activations, with the operations
    of the graph's ``fast_silu``: the unfused compile's values bit for bit, within `SILU_RTOL` of torch's."""
    channels, make = EPILOGUE_CONVS[conv]
    torch.manual_seed(9)
    net = nn.Sequential(make(), silu()).eval()
    x = torch.randn(1, channels, 9, 9)
    reference, fused, unfused = fused_and_unfused(net, x, monkeypatch, {"passes": int8_passes()})
    y = torch.randn(1, channels, 9, 9) * 4
    assert torch.equal(fused(y), unfused(y))
    torch.testing.assert_close(fused(y), reference(y), rtol=SILU_RTOL, atol=0.0)
    names = fused_calls(net, x)
    assert len([name for name in names if name.startswith("lowbit_conv_") and name.endswith("_fused")]) == 1
    assert not [name for name in names if "add" in name or "silu" in name or "sigmoid" in name]


@pytest.mark.slow
def test_efficientnet_b0_with_fused_silu_is_the_unfused_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's EfficientNet-B0 (random weights, batch-norm statistics of random images so that every SiLU
    sees values of order one), w8a8-x86: the SiLU after each int8 convolution is fused (those after the squeeze
    fallbacks stay operators) and the logits are the unfused compile's bit for bit."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.efficientnet_b0(weights=None, num_classes=16)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over the batches below
    with torch.no_grad():
        net.train()(torch.randn(8, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    reference, fused, unfused = fused_and_unfused(net.eval(), x, monkeypatch, {"recipe": "w8a8-x86"})
    assert torch.equal(fused(x), unfused(x))
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-3, atol=1e-3 * float(reference(x).abs().max()))
    fallbacks = fused.report.fallbacks
    assert fallbacks and all(".fc1 " in item for item in fallbacks)  # squeeze-excite reductions to 4 to 28 channels
    assert len([name for name in fused_calls(net, x) if "silu" in name]) == len(fallbacks)


@pytest.mark.parametrize("knobs", [{"row_tile": 2, "row_vectors": 1}, {"row_tile": 8, "out_tile": 32}])
@pytest.mark.parametrize("kernel", [a8_gemm.KERNEL, a8_linear.KERNEL], ids=["gemm", "avx2"])
def test_every_knob_setting_computes_the_reference(kernel, knobs) -> None:
    """The tuner's candidates for a convolution: any knobs, the same values as ``conv_packed_a8``."""
    torch.manual_seed(4)
    channels, size, out = 16, 7, 32
    codes = torch.randint(0, 256, (out, channels * 9), dtype=torch.uint8)
    qweight, scales, step = packing.pack(codes, 8), torch.rand(out, 1) / 100, torch.tensor(0.02)
    x = torch.randn(1, channels, size, size)
    expected = ops_conv.conv_packed_a8(
        x, qweight, scales, None, None, None, 8, 144, 144, [3, 3], [1, 1], [1, 1], [1, 1], 1, step
    )
    spec = ConvSpec(
        batch=size * size, in_features=144, out_features=out, bits=8, group_size=144, asymmetric=False,
        has_bias=False, act_bits=8, act_dynamic=False, image=(1, size, size, channels), out_size=(size, size),
        kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
    )  # fmt: skip
    tensors = {
        "qweight": patch_weight(qweight, None, 8, channels, (3, 3), 144, True),
        "scales": scales, "zeros": None, "g_idx": None, "bias": None, "act_scale": step,
    }  # fmt: skip
    target = resolve_target("x86")
    reason = kernel.supports(spec, tensors, target)
    if reason is not None:
        pytest.skip(reason)
    plan = kernel.plan(spec, tensors, target, knobs)
    module = tvm.compile(plan.func.with_attr("global_symbol", "main"), target=target).jit()
    image = x.permute(0, 2, 3, 1).reshape(1, size, size * channels).contiguous()
    args = [tvm.runtime.tensor(t.contiguous().numpy()) for t in (image, *plan.consts)]
    y = tvm.runtime.tensor(torch.zeros(size * size, out).numpy())
    module["main"](*args, y)
    got = torch.from_numpy(y.numpy()).view(1, size, size, out).permute(0, 3, 1, 2)
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_int8_convolutions_are_bit_exact_on_arm(arm_emulator, tmp_path) -> None:
    """The ARM sdot kernel over the patches, under qemu: a padded 3x3 (27 columns, padded to whole words), a
    strided 3x3 and a 1x1, bit for bit the torch target's values."""
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Conv2d(16, 8, 1)
    ).eval()
    x = torch.randn(1, 3, 10, 10)
    calibration = [(x,), (torch.randn_like(x),)]
    reference = lowbit.compile(net, (x,), passes=int8_passes()(), calibration=calibration, target="torch")
    compiled = lowbit.compile(net, (x,), passes=int8_passes()(), calibration=calibration, target="arm", tune=False)
    assert [linear.kernel for linear in compiled.runner.linears] == ["a8_linear_arm"] * 3
    path = compiled.export(tmp_path / "convnet")
    with qemu.emulated_server() as server:
        result = rpc.run_artifact(path, [x.numpy()], rpc=str(server.address), timeout=120, repeats=1)
    assert torch.equal(torch.from_numpy(result.outputs[0]), reference(x))


class Branches(nn.Module):
    """Each branch (a convolution and its activation) on the same input, concatenated along channels."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


#: A convolution of a 24-channel input for each ARM int8 kernel: the sdot GEMM over 3x3 and 1x1 patches (20
#: outputs), depthwise.
ARM_EPILOGUE_CONVS = {
    "gemm-3x3": lambda: nn.Conv2d(24, 32, 3, padding=1),
    "gemm-1x1": lambda: nn.Conv2d(24, 20, 1),
    "depthwise-24": lambda: nn.Conv2d(24, 24, 3, padding=1, groups=24),
}


def on_arm(compiled, x: torch.Tensor, path) -> torch.Tensor:
    """``compiled`` (an ARM compile) run on ``x`` under qemu."""
    result = qemu.run_artifact(compiled.export(path), [x.numpy()], timeout=120)
    return torch.from_numpy(result.outputs[0])


def arm_kernel_calls(names: list[str]) -> list[str]:
    return [name for name in names if name.startswith("lowbit_conv_")]


@pytest.mark.slow
def test_fused_bias_and_activation_are_bit_exact_on_arm(arm_emulator, tmp_path) -> None:
    """Each ARM int8 kernel (the sdot GEMM over 3x3 and 1x1 patches, depthwise) with each activation of
    `EPILOGUES`, under qemu: every kernel planned with its bias and activation replaces the three operators, and the
    model computes the torch target's values bit for bit."""
    torch.manual_seed(11)
    branches = [
        nn.Sequential(make(), *([act()] if act is not None else []))
        for act in EPILOGUES.values()
        for make in ARM_EPILOGUE_CONVS.values()
    ]
    net = Branches(branches).eval()
    x = torch.randn(1, 24, 9, 9)
    reference, compiled = compiled_pair(net, x, int8_passes(), target="arm")
    assert compiled.report.fallbacks == []
    y = torch.randn(1, 24, 9, 9) * 1.5
    assert torch.equal(on_arm(compiled, y, tmp_path / "fused"), reference(y))
    names = fused_calls(net, x, "arm")
    calls = arm_kernel_calls(names)
    assert len(calls) == len(branches) and all(name.endswith("_fused") for name in calls), calls
    assert not [name for name in names if "add" in name or "maximum" in name or "minimum" in name or "relu" in name]


@pytest.mark.slow
def test_fused_silu_on_arm_is_the_unfused_graph_bit_for_bit(arm_emulator, tmp_path, monkeypatch) -> None:
    """SiLU (and ``x · sigmoid(x)``) after each ARM int8 kernel, under qemu: fused, the unfused compile's values bit
    for bit, within `SILU_RTOL` of torch's."""
    torch.manual_seed(12)
    branches = [
        nn.Sequential(make(), silu()) for silu in (nn.SiLU, SigmoidProduct) for make in ARM_EPILOGUE_CONVS.values()
    ]
    net = Branches(branches).eval()
    x = torch.randn(1, 24, 9, 9)
    reference, fused, unfused = fused_and_unfused(net, x, monkeypatch, {"passes": int8_passes(), "target": "arm"})
    y = torch.randn(1, 24, 9, 9) * 4
    got = on_arm(fused, y, tmp_path / "fused")
    assert torch.equal(got, on_arm(unfused, y, tmp_path / "unfused"))
    torch.testing.assert_close(got, reference(y), rtol=SILU_RTOL, atol=0.0)
    names = fused_calls(net, x, "arm")
    calls = arm_kernel_calls(names)
    assert len(calls) == len(branches) and all(name.endswith("_fused") for name in calls), calls
    assert not [name for name in names if "add" in name or "silu" in name or "sigmoid" in name]


def test_the_tuner_searches_an_int8_convolution_kernel(tmp_path) -> None:
    """A convolution's record is keyed by its geometry (`ConvSpec`), and the tuned kernel stays bit-exact."""
    torch.manual_seed(6)
    net = ConvReLU(nn.Conv2d(16, 32, 3, padding=1), True).eval()
    x = torch.randn(1, 16, 8, 8)
    calibration = [(x,)]
    tune = {"trials": 2, "measure": measure.MeasureOptions(repeat=2, min_repeat_ms=1)}
    reference = lowbit.compile(net, (x,), passes=int8_passes()(), calibration=calibration, target="torch")
    compiled = lowbit.compile(
        net, (x,), passes=int8_passes()(), calibration=calibration, target="x86", tune=tune, cache_dir=tmp_path
    )
    (result,) = compiled.report.tuning
    assert result.measured_now == 2
    (record,) = TuningDatabase(resolve_target("x86"), tmp_path, shipped=()).records()
    assert record.spec["kernel_size"] == [3, 3] and record.spec["image"] == [1, 8, 8, 16]
    assert torch.equal(compiled(x), reference(x))
