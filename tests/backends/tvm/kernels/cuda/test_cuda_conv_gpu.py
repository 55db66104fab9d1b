"""CUDA int8 convolutions run on a GPU (skipped where there is no CUDA device): each layer kind bit for bit the torch
target's ``conv_packed_a8`` (bias and ReLU included, and the other activations the kernels apply in their output
stage), and the w8a8 CNNs close to it."""

from __future__ import annotations

import pytest
import torch
from cuda_conv_layers import CASES, FORMAT_CASES, FORMATS, FUSED_ACTIVATIONS, ConvReLU

import lowbit
from lowbit import zoo
from lowbit.backends.tvm.kernels.cuda import a8_conv
from lowbit.backends.tvm.runner import cuda_available
from lowbit.passes.quant import RTN, QuantizeActivations

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and TVM's CUDA runtime"),
]


def _compiled_pair(case: str, weights: str) -> tuple:
    channels, size, conv, relu = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(2, channels, size, size)
    bits, group_size, symmetric = FORMATS[weights]
    net = ConvReLU(conv, relu).eval()

    def compile_for(target: str) -> lowbit.CompiledModel:
        passes = [RTN(bits=bits, group_size=group_size, symmetric=symmetric), QuantizeActivations(dynamic=False)]
        return lowbit.compile(net, (x,), passes=passes, calibration=[(x,), (torch.randn_like(x),)], target=target)

    return compile_for("torch"), compile_for("cuda"), x


@pytest.mark.parametrize("case", list(CASES))
def test_int8_convolutions_are_bit_exact(case: str) -> None:
    reference, compiled, x = _compiled_pair(case, "w8")
    depthwise = CASES[case][2].groups > 1
    kernel = a8_conv.DEPTHWISE_KERNEL_NAME if depthwise else a8_conv.CONV_KERNEL_NAME
    assert [linear.kernel for linear in compiled.runner.linears] == [kernel]
    y = torch.randn_like(x) * 1.5
    assert torch.equal(compiled(y), reference(y))


@pytest.mark.parametrize(("case", "weights"), FORMAT_CASES)
def test_other_weight_formats_are_bit_exact(case: str, weights: str) -> None:
    reference, compiled, x = _compiled_pair(case, weights)
    assert compiled.report.fallbacks == []
    y = torch.randn_like(x) * 1.5
    assert torch.equal(compiled(y), reference(y))


@pytest.mark.parametrize("activation", list(FUSED_ACTIVATIONS))
@pytest.mark.parametrize("case", ["3x3-padded-relu", "depthwise-relu"])
def test_fused_activations_are_bit_exact(case: str, activation: str) -> None:
    channels, size, conv, _ = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(2, channels, size, size)
    net = torch.nn.Sequential(conv, FUSED_ACTIVATIONS[activation][0]()).eval()
    calibration = [(x,), (torch.randn_like(x),)]

    def compile_for(target: str) -> lowbit.CompiledModel:
        passes = [RTN(bits=8, group_size=-1, symmetric=True), QuantizeActivations(dynamic=False)]
        return lowbit.compile(net, (x,), passes=passes, calibration=calibration, target=target)

    reference, compiled = compile_for("torch"), compile_for("cuda")
    assert compiled.report.fallbacks == []
    y = torch.randn_like(x) * 1.5
    assert torch.equal(compiled(y), reference(y))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_w8a8_cnns_match_the_torch_target(name: str) -> None:
    """The convolutions are exact; pooling and the fp32 operators between them round like torch's within an ulp,
    which can move an int8 code by one: the outputs agree to 1e-3 of their norm."""
    entry = zoo.build(name)
    x = entry.example_inputs[0]
    generator = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(x.shape, generator=generator),) for _ in range(2)]
    model = entry.model.eval()
    reference = lowbit.compile(model, (x,), recipe="w8a8-cuda", calibration=calibration, target="torch")
    compiled = lowbit.compile(model, (x,), recipe="w8a8-cuda", calibration=calibration)
    assert compiled.report.fallbacks == []
    expected = reference(x)
    assert float((compiled(x) - expected).norm() / expected.norm()) < 1e-3
