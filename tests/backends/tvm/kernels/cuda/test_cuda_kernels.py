"""CUDA kernels without a GPU: their arithmetic on the CPU against the torch reference, their
generated CUDA source (thread bindings, shuffles, shared tiles, ``__dp4a``), PTX through nvcc,
the layouts they refuse, their knobs, and the check that every function is bound to threads."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, te

from lowbit.backends.tvm.convert import Lowering
from lowbit.backends.tvm.kernels.cuda import a8_linear as cuda_a8_linear
from lowbit.backends.tvm.kernels.cuda import linear as cuda_linear
from lowbit.backends.tvm.kernels.generic.activations import PlainArithmetic, fake_quant_compute
from lowbit.backends.tvm.kernels.spec import KernelPlan, PackedLinearSpec
from lowbit.backends.tvm.target import cuda_arch, resolve_target
from lowbit.backends.tvm.toolchains import cuda
from lowbit.errors import BackendError
from lowbit.ir import ops_a8, packing

TARGET = resolve_target("cuda")


def _layer(
    rows: int,
    n: int,
    k: int,
    bits: int,
    group: int,
    asymmetric: bool,
    seed: int,
    act_scale: torch.Tensor | None = None,
    a8: bool = True,
) -> tuple[PackedLinearSpec, dict, torch.Tensor]:
    """A random packed layer (non-power-of-two scales), its spec and an input."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) * 0.1 + 0.01
    zeros = torch.randint(0, 2**bits, (n, k // group), generator=gen).float() if asymmetric else None
    tensors = {
        "qweight": packing.pack(codes, bits),
        "scales": scales,
        "zeros": zeros,
        "g_idx": None,
        "bias": torch.randn(n, generator=gen),
        "act_scale": act_scale,
    }
    spec = PackedLinearSpec(
        rows, k, n, bits, group, asymmetric, True, act_bits=8 if a8 else None, act_dynamic=act_scale is None
    )
    return spec, tensors, torch.randn(rows, k, generator=gen) * 3


def _source(func: tvm.tirx.PrimFunc) -> str:
    built = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "kernel")}), target=TARGET)
    return built.mod.imports[0].inspect_source("cuda")


@pytest.mark.parametrize(
    ("bits", "group", "asymmetric", "static"),
    [
        (1, 128, False, False),
        (2, 64, False, False),
        (2, 64, True, True),
        (4, 32, True, False),
        (8, 64, False, True),
        (8, 256, True, False),
    ],
)
def test_a8_arithmetic_is_bit_exact_against_the_reference(
    bits: int, group: int, asymmetric: bool, static: bool
) -> None:
    """The dp4a kernel's computation, its CUDA intrinsics spelled as plain TIR, run on the CPU."""
    act_scale = torch.tensor(0.0371) if static else None
    spec, tensors, x = _layer(3, 16, 256, bits, group, asymmetric, seed=bits, act_scale=act_scale)
    planned = cuda_a8_linear.KERNEL.plan(spec, tensors, TARGET)
    assert isinstance(planned, KernelPlan)
    has_zz = len(planned.consts) == 4  # words, scales, zz, bias
    func = cuda_a8_linear.a8_linear_compute(
        spec, has_zz, float(act_scale) if static else None, parts=2, arith=PlainArithmetic()
    )
    module = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    out = tvm.runtime.tensor(np.zeros((3, 16), "float32"))
    module["main"](*[tvm.runtime.tensor(t.numpy()) for t in [x, *planned.consts]], out)
    expected = torch.ops.lowbit.linear_packed_a8(
        x, tensors["qweight"], tensors["scales"], tensors["zeros"], None, tensors["bias"], bits, group, 256, act_scale
    )
    assert torch.equal(torch.from_numpy(out.numpy()), expected)


@pytest.mark.parametrize("act_scale", [None, torch.tensor(0.0371)])
def test_fallback_fake_quantization_is_bit_exact(act_scale: torch.Tensor | None) -> None:
    """The input that A8 layers on the fallback path multiply: the reference's ``x̂`` exactly."""
    x = torch.randn(3, 200) * 3
    step = None if act_scale is None else float(act_scale)
    func = fake_quant_compute(3, 200, step, PlainArithmetic())
    out = tvm.runtime.tensor(np.zeros((3, 200), "float32"))
    tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"](tvm.runtime.tensor(x.numpy()), out)
    assert torch.equal(torch.from_numpy(out.numpy()), ops_a8.fake_quantize_activation(x, act_scale))
    assert "__fdiv_rn" in _source(cuda_a8_linear.fake_quant_func(3, 200, step))


def test_w4a16_gemv_source_has_warp_reduction_and_vector_loads() -> None:
    spec, tensors, _ = _layer(1, 64, 512, 4, 128, False, seed=0, a8=False)
    planned = cuda_linear.KERNEL.plan(spec, tensors, TARGET)
    src = _source(planned.func)
    for needle in ("blockIdx.x", "threadIdx.x", "threadIdx.y", "__shfl_down_sync", "*(int4*)", "__shared__"):
        assert needle in src, needle
    assert planned.consts[0].dtype == torch.int32 and planned.consts[0].shape == (64, 64)


def test_w4a16_gemm_tiles_rows_of_x_in_shared_memory() -> None:
    spec, tensors, _ = _layer(16, 64, 512, 4, 128, True, seed=1, a8=False)
    planned = cuda_linear.KERNEL.plan(spec, tensors, TARGET)
    assert planned.knobs["m_tile"] == 8
    src = _source(planned.func)
    assert "blockIdx.y" in src and "__syncthreads" in src and "x_shared" in src


def test_a8_source_uses_dp4a_and_rounded_intrinsics() -> None:
    spec, tensors, _ = _layer(4, 64, 512, 2, 64, True, seed=2)
    src = _source(cuda_a8_linear.KERNEL.plan(spec, tensors, TARGET).func)
    for needle in (
        "__dp4a",
        "__fmul_rn",
        "__fadd_rn",
        "__fdiv_rn",
        "__float2int_rn",
        "__shfl_down_sync",
        "threadIdx.y",
    ):
        assert needle in src, needle
    kernels = re.findall(r'^extern "C" __global__ .*\{$', src, flags=re.MULTILINE)
    assert len(kernels) == 4  # scale, codes, group sums, product


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_makes_ptx_with_dp4a(arch: str) -> None:
    spec, tensors, _ = _layer(1, 32, 256, 4, 128, False, seed=3)
    ptx = cuda.nvcc_compile(_source(cuda_a8_linear.KERNEL.plan(spec, tensors, TARGET).func), arch, "ptx").decode()
    assert f".target {arch}" in ptx and "dp4a.s32.s32" in ptx and ptx.count(".entry") == 3


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"bits": 3}, "straddle"),
        ({"has_g_idx": True}, "g_idx"),
        ({"group_size": 256}, "not a multiple"),
        ({"group_size": 4, "bits": 4}, "whole 32-bit words"),
    ],
)
def test_unsupported_layouts_name_their_reason(change: dict, reason: str) -> None:
    base = PackedLinearSpec(2, 384, 16, 4, 128, False, False)
    spec = PackedLinearSpec(**{**base.__dict__, **change})
    assert reason in cuda_linear.unsupported_reason(spec)
    assert reason in cuda_a8_linear.unsupported_reason(PackedLinearSpec(**{**spec.__dict__, "act_bits": 8}))


def test_a8_refuses_zero_points_that_are_not_half_integers() -> None:
    spec, tensors, _ = _layer(1, 16, 256, 4, 64, True, seed=4)
    tensors["zeros"] = tensors["zeros"] + 0.25
    assert "half-integers" in cuda_a8_linear.KERNEL.supports(spec, tensors, TARGET)


@pytest.mark.parametrize("kernel", [cuda_linear.KERNEL, cuda_a8_linear.KERNEL], ids=lambda kernel: kernel.name)
def test_knobs_hand_schedule_is_in_the_space_and_bad_knobs_are_named(kernel) -> None:
    spec, tensors, _ = _layer(4, 32, 256, 4, 64, False, seed=5, a8=kernel is cuda_a8_linear.KERNEL)
    default = kernel.default_knobs(spec, TARGET)
    assert all(value in kernel.knobs[name] for name, value in default.items())
    other = {name: values[0] for name, values in kernel.knobs.items()}
    assert kernel.plan(spec, tensors, TARGET, knobs=other).knobs == other
    with pytest.raises(BackendError, match="no knob 'tile'"):
        kernel.plan(spec, tensors, TARGET, knobs={"tile": 2})


@pytest.mark.parametrize(("k", "bits", "group", "parts"), [(4096, 4, 128, 1), (11008, 4, 128, 16), (4096, 8, 4096, 32)])
def test_a8_default_parts_fill_the_warp(k: int, bits: int, group: int, parts: int) -> None:
    """(group, part) pairs are dealt to 32 lanes: 86 groups need 16 parts, one per-channel group 32."""
    spec = PackedLinearSpec(1, k, 64, bits, group, False, False, act_bits=8)
    knobs = cuda_a8_linear.KERNEL.default_knobs(spec, TARGET)
    assert knobs["parts"] == parts and spec.groups * parts % knobs["threads"] == 0


def test_a_function_without_thread_bindings_is_an_error() -> None:
    """A TIR function no GPU rule schedules (here: already marked scheduled) must not reach the build."""
    a = te.placeholder((64,), "float32", name="a")
    func = te.create_prim_func([a, te.compute((64,), lambda i: a[i] * 2, name="double")])
    func = func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64,), "float32"))
    with bb.function("main", [x]):
        gvar = bb.add_func(func, "plain_loop")
        out = bb.emit(relax.call_tir(gvar, [x], out_ty=relax.TensorType((64,), "float32")))
        bb.emit_func_output(out)
    lowering = Lowering(bb.get(), TARGET, [])
    toolchain = cuda.CUDAToolchain(TARGET)
    assert cuda.unbound_functions(toolchain.schedule(lowering.mod)) == ["plain_loop"]
    with pytest.raises(BackendError, match="plain_loop"):
        toolchain.build(lowering)


def test_cuda_targets_take_the_users_arch_from_sm80_on() -> None:
    assert cuda_arch(resolve_target("cuda")) == "sm_80"
    target = resolve_target({"kind": "cuda", "arch": "sm_90a"})
    assert cuda_arch(target) == "sm_90a" and target.host.kind.name == "llvm"
    for arch, message in (("sm_75", "older than sm_80"), ("compute_90", "invalid CUDA arch")):
        with pytest.raises(BackendError, match=message):
            resolve_target({"kind": "cuda", "arch": arch})
