"""CUDA int8 convolutions without a GPU: the lowering picks the dp4a patch kernel (the depthwise kernel for depthwise
layers), their computation spelled in plain TIR runs on the CPU bit for bit against ``conv_packed_a8``, their CUDA
source has ``__dp4a`` in every patch kernel, nvcc compiles it, and the int8 recipes compile whole CNNs with no
convolution on the fallback."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import tvm
from cuda_conv_layers import CASES, FORMAT_CASES, FORMATS, FUSED_ACTIVATIONS, ConvReLU
from tvm import relax

import lowbit
from lowbit import zoo
from lowbit.backends.tvm import lowering
from lowbit.backends.tvm.convert import packed_constant
from lowbit.backends.tvm.convert_conv import CONSTS_ATTR, WEIGHT_ATTR
from lowbit.backends.tvm.kernels.cuda import a8_conv
from lowbit.backends.tvm.kernels.generic.activations import PlainArithmetic
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec
from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.toolchains import cuda
from lowbit.errors import BackendError
from lowbit.ir import ops_conv
from lowbit.passes.quant import RTN, QuantizeActivations

TARGET = resolve_target("cuda")


def _reference_graph(case: str, weights: str = "w8") -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """The case quantized for the torch target (int8 input step from two calibration batches), and an input."""
    channels, size, conv, relu = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(1, channels, size, size)
    bits, group_size, symmetric = FORMATS[weights]
    passes = [RTN(bits=bits, group_size=group_size, symmetric=symmetric), QuantizeActivations(dynamic=False)]
    calibration = [(x,), (torch.randn_like(x),)]
    net = ConvReLU(conv, relu).eval()
    return lowbit.compile(net, (x,), passes=passes, calibration=calibration, target="torch").graph, x


def _lowered_conv(graph: torch.fx.GraphModule, x: torch.Tensor) -> tuple:
    """The layer's spec, kernel name and constants as the CUDA lowering planned them, and its node."""
    lowered = lowering.lower(graph, (x,), cuda.CUDAToolchain(TARGET))
    (layer,) = lowered.linears
    (consts,) = [
        [c.value.numpy() for c in func.attrs[CONSTS_ATTR]]
        for func in lowered.mod.functions.values()
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs and WEIGHT_ATTR in func.attrs
    ]
    (node,) = [n for n in graph.graph.nodes if n.target is ops_conv.conv_packed_a8]
    return layer.spec, layer.kernel, consts, node


def _reference_without_bias(graph: torch.fx.GraphModule, node: torch.fx.Node, x: torch.Tensor) -> torch.Tensor:
    """``conv_packed_a8`` of the node without its bias (the kernels leave it to the following ``add``), as the
    kernels' ``(B·OH·OW, C_out)`` rows."""
    tensors = [packed_constant(graph, node, arg) for arg in node.args[1:5]]
    y = torch.ops.lowbit.conv_packed_a8(
        x, *tensors, None, *node.args[6:-1], packed_constant(graph, node, node.args[-1])
    )
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _run_on_cpu(spec: ConvSpec, kernel: str, consts: list[np.ndarray], step: float, x: torch.Tensor) -> torch.Tensor:
    """The kernel's computation in plain TIR (`PlainArithmetic`) on the CPU, on the NHWC image."""
    if kernel == a8_conv.DEPTHWISE_KERNEL_NAME:
        func = a8_conv.depthwise_compute(spec, step, PlainArithmetic())
    else:
        func = a8_conv.a8_conv_compute(spec, len(consts) == 3 + spec.has_bias, step, arith=PlainArithmetic())
    batch, channels, height, width = x.shape
    image = x.permute(0, 2, 3, 1).reshape(batch, height, width * channels).contiguous()
    out = tvm.runtime.tensor(np.zeros((spec.batch, spec.out_features), "float32"))
    module = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    module["main"](*[tvm.runtime.tensor(t) for t in [image.numpy(), *consts]], out)
    return torch.from_numpy(out.numpy())


@pytest.mark.parametrize("case", list(CASES))
def test_the_lowering_picks_the_conv_kernels_and_their_arithmetic_is_bit_exact(case: str) -> None:
    graph, x = _reference_graph(case)
    spec, kernel, consts, node = _lowered_conv(graph, x)
    depthwise = CASES[case][2].groups > 1
    assert isinstance(spec, ConvSpec)
    assert kernel == (a8_conv.DEPTHWISE_KERNEL_NAME if depthwise else a8_conv.CONV_KERNEL_NAME)
    y = torch.randn_like(x) * 1.5
    step = float(packed_constant(graph, node, node.args[-1]))
    assert torch.equal(_run_on_cpu(spec, kernel, consts, step, y), _reference_without_bias(graph, node, y))


@pytest.mark.parametrize(("case", "weights"), FORMAT_CASES)
def test_other_weight_formats_are_bit_exact(case: str, weights: str) -> None:
    """Off-centre zero points (activation sums, which the padded patch columns of the stem must not reach), groups
    within a patch row (torch's column order), low-bit codes."""
    graph, x = _reference_graph(case, weights)
    spec, kernel, consts, node = _lowered_conv(graph, x)
    y = torch.randn_like(x) * 1.5
    step = float(packed_constant(graph, node, node.args[-1]))
    assert torch.equal(_run_on_cpu(spec, kernel, consts, step, y), _reference_without_bias(graph, node, y))


def _fused_call(mod: tvm.IRModule) -> relax.Call:
    """The one call of a kernel planned with its layer's bias and activation in a scheduled module."""
    calls: list[relax.Call] = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: calls.append(e) if isinstance(e, relax.Call) and e.op == tvm.ir.Op.get("relax.call_tir") else None,
    )
    (call,) = [call for call in calls if call.args[0].name_hint.endswith("_fused")]
    return call


@pytest.mark.parametrize("activation", list(FUSED_ACTIVATIONS))
@pytest.mark.parametrize("case", ["3x3-padded-relu", "depthwise-relu"])
def test_fused_bias_and_activation_are_bit_exact(case: str, activation: str) -> None:
    """The CUDA build replaces the kernel, the bias ``add`` and the activation after it (ReLU6, hardswish) by the
    kernel planned with them; its computation in plain TIR on the CPU is the torch target's bit for bit."""
    channels, size, conv, _ = CASES[case]
    act, steps = FUSED_ACTIVATIONS[activation]
    torch.manual_seed(0)
    x = torch.randn(1, channels, size, size)
    passes = [RTN(bits=8, group_size=-1, symmetric=True), QuantizeActivations(dynamic=False)]
    net = torch.nn.Sequential(conv, act()).eval()
    reference = lowbit.compile(net, (x,), passes=passes, calibration=[(x,), (torch.randn_like(x),)], target="torch")
    toolchain = cuda.CUDAToolchain(TARGET)
    lowered = lowering.lower(reference.graph, (x,), toolchain)
    (layer,) = lowered.linears
    call = _fused_call(toolchain.schedule(lowered.mod))
    consts = [const.value.numpy() for const in call.args[1].fields[1:]]
    spec = ConvSpec(**{**vars(layer.spec), "has_bias": True, "epilogue": steps})
    (node,) = [n for n in reference.graph.graph.nodes if n.target is ops_conv.conv_packed_a8]
    step = float(packed_constant(reference.graph, node, node.args[-1]))
    y = torch.randn_like(x) * 1.5
    expected = reference(y)
    got = _run_on_cpu(spec, layer.kernel, consts, step, y)
    assert torch.equal(got, expected.permute(0, 2, 3, 1).reshape(-1, expected.shape[1]))


def _kernels(source: str) -> dict[str, str]:
    """Each ``__global__`` function of the CUDA source by name, with its body."""
    starts = list(re.finditer(r'^extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source, re.M))
    ends = [match.start() for match in starts[1:]] + [len(source)]
    return {match.group(1): source[match.start() : end] for match, end in zip(starts, ends, strict=True)}


def _compiled_block() -> lowbit.CompiledModel:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1),
    ).eval()
    calibration = [(torch.randn(1, 3, 16, 16),) for _ in range(2)]
    return lowbit.compile(net, calibration[0], recipe="w8a8-cuda", calibration=calibration)


def test_a_cnn_builds_for_cuda_with_dp4a_in_its_conv_kernels() -> None:
    compiled = _compiled_block()
    runner = compiled.runner
    assert [linear.kernel for linear in runner.linears] == [
        a8_conv.CONV_KERNEL_NAME,
        a8_conv.DEPTHWISE_KERNEL_NAME,
        a8_conv.CONV_KERNEL_NAME,
    ]
    assert compiled.report.fallbacks == []
    kernels = _kernels(runner.source)
    patch = [body for name, body in kernels.items() if a8_conv.CONV_KERNEL_NAME in name]
    assert sum("__dp4a" in body for body in patch) == 2  # the product of each patch GEMM
    assert sum("__float2int_rn" in body for body in patch) == 2  # the patch codes, quantized from the image
    depthwise = [body for name, body in kernels.items() if a8_conv.DEPTHWISE_KERNEL_NAME in name]
    assert len(depthwise) == 1 and "__fmul_rn" in depthwise[0] and "__dp4a" not in depthwise[0]
    assert not any("add" in name or "relu" in name for name in kernels)  # bias and ReLU: in the kernels' output
    assert not any("conv2d" in name for name in kernels)  # no fp32 convolution left


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_nvcc_compiles_the_conv_kernels_to_dp4a() -> None:
    ptx = cuda.nvcc_compile(_compiled_block().runner.source, "sm_80", "ptx").decode()
    assert "dp4a.s32.s32" in ptx


@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenet_v3_small", marks=pytest.mark.slow)])
def test_w8a8_cuda_compiles_cnns_with_no_convolution_on_the_fallback(name: str, tmp_path) -> None:
    entry = zoo.build(name)
    x = entry.example_inputs[0]
    generator = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(x.shape, generator=generator),) for _ in range(2)]
    compiled = lowbit.compile(entry.model.eval(), (x,), recipe="w8a8-cuda", calibration=calibration)
    assert compiled.report.fallbacks == []
    kernels = Counter(linear.kernel for linear in compiled.runner.linears)
    expected = {
        "resnet18": {a8_conv.CONV_KERNEL_NAME: 20, "cuda_a8_linear": 1},
        "mobilenet_v3_small": {a8_conv.CONV_KERNEL_NAME: 41, a8_conv.DEPTHWISE_KERNEL_NAME: 11, "cuda_a8_linear": 2},
    }
    assert kernels == expected[name]
    if shutil.which("nvcc") is not None:  # the artifact: every kernel compiled by nvcc into the library
        path = compiled.export(tmp_path / name)
        assert len(cuda.embedded_fatbin(path / "model.so")) > 0


def test_knobs_and_refusals_are_named() -> None:
    graph, x = _reference_graph("depthwise-relu")
    spec, _, _, node = _lowered_conv(graph, x)
    names = ("qweight", "scales", "zeros", "g_idx")
    tensors = {
        **{name: packed_constant(graph, node, arg) for name, arg in zip(names, node.args[1:5], strict=True)},
        "bias": None,
        "act_scale": packed_constant(graph, node, node.args[-1]),
    }
    kernel = a8_conv.DEPTHWISE_KERNEL
    assert all(value in kernel.knobs[name] for name, value in kernel.default_knobs(spec, TARGET).items())
    assert kernel.plan(spec, tensors, TARGET, knobs={"threads": 64}).knobs == {"threads": 64}
    with pytest.raises(BackendError, match="no knob 'tile'"):
        kernel.plan(spec, tensors, TARGET, knobs={"tile": 2})
    assert "ungrouped" in a8_conv.CONV_KERNEL.supports(spec, tensors, TARGET)
    linear = PackedLinearSpec(4, 64, 16, 8, 64, False, False, act_bits=8, act_dynamic=False)
    assert "ungrouped 2-D convolutions" in a8_conv.CONV_KERNEL.supports(linear, tensors, TARGET)
    assert "depthwise convolutions only" in kernel.supports(linear, tensors, TARGET)
    quarter = {**tensors, "zeros": torch.full_like(tensors["scales"], 128.25)}
    assert "half-integers" in kernel.supports(spec, quarter, TARGET)
    silu = {"has_bias": True, "epilogue": (("silu", 0.0),)}
    assert "expf" in kernel.supports(ConvSpec(**{**vars(spec), **silu}), tensors, TARGET)
    ungrouped = ConvSpec(**{**vars(spec), "conv_groups": 1, **silu})
    assert "expf" in a8_conv.CONV_KERNEL.supports(ungrouped, tensors, TARGET)


def test_many_output_pixels_take_larger_pixel_blocks_within_the_grid() -> None:
    """The product's pixel blocks span ``gridDim.y`` (at most 65535): a large batch of images takes larger blocks,
    and a layer no block size fits is refused with its reason."""
    graph, x = _reference_graph("1x1")
    spec, _, _, node = _lowered_conv(graph, x)
    names = ("qweight", "scales", "zeros", "g_idx")
    tensors = {
        **{name: packed_constant(graph, node, arg) for name, arg in zip(names, node.args[1:5], strict=True)},
        "bias": None,
        "act_scale": packed_constant(graph, node, node.args[-1]),
    }
    kernel = a8_conv.CONV_KERNEL
    assert kernel.default_knobs(spec, TARGET)["m_tile"] == 8
    many = dataclasses.replace(spec, batch=8192 * 81, image=(8192, *spec.image[1:]))  # 663552 pixels
    assert kernel.default_knobs(many, TARGET)["m_tile"] == 16
    with pytest.raises(BackendError, match="m_tile=8 leaves more than 65535 blocks"):
        kernel.plan(many, tensors, TARGET, knobs={"m_tile": 8})
    too_many = dataclasses.replace(many, batch=16 * 81 * 1024, image=(16 * 1024, *spec.image[1:]))
    assert "more than 65535 blocks" in kernel.supports(too_many, tensors, TARGET)
