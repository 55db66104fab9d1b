"""The x86 AVX-512 VNNI int8 GEMM against the torch reference op ``lowbit.linear_packed_a8``."""

from __future__ import annotations

import pytest
import torch
import tvm
from tvm.target import Target
from x86_a8_layers import layer, layer_spec, reference, run, symbolic_rows_are_exact

from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.kernels.x86 import a8_gemm, a8_linear
from lowbit.backends.tvm.target import has_features, x86_host_target
from lowbit.backends.tvm.toolchains.cpu import CPUToolchain
from lowbit.errors import BackendError

#: A target with AVX-512 VNNI: the GEMM compiles for it on any host and runs where the host has the feature.
VNNI_TARGET = Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
HOST_HAS_VNNI = has_features(Target(x86_host_target()), "avx512vnni", "avx512bw")


#: (rows, in, out, bits, group, asymmetric, bias, static step): the demo's W8A8 shapes at 256 rows, odd row
#: counts, 4- and 2-bit codes with zero points, no bias, a static activation step.
CASES = [
    (256, 384, 384, 8, 384, False, True, None),
    (256, 1536, 384, 8, 1536, False, True, None),
    (256, 384, 1536, 8, 384, False, True, None),
    (16, 384, 384, 8, 128, True, False, None),
    (37, 1536, 384, 8, 1536, False, True, 2.0**-5),
    (37, 384, 1536, 4, 128, True, True, None),
    (16, 384, 384, 2, 64, True, True, 2.0**-4),
    (256, 384, 384, 4, 64, False, False, 2.0**-6),
]


def test_gemm_is_bit_exact_with_the_reference_op() -> None:
    """Power-of-two scales make every float step exact, so the outputs must equal the reference's bit for bit."""
    plans = {}
    for index, (rows, k_in, n_out, bits, group, asym, bias, step) in enumerate(CASES):
        weight = layer(n_out, k_in, bits, group, asym, bias, seed=index)
        if step is not None:
            weight["act_scale"] = torch.tensor(step)
        spec = layer_spec(rows, k_in, n_out, bits, group, weight)
        assert a8_gemm.KERNEL.supports(spec, weight, VNNI_TARGET) is None
        plans[f"case{index}"] = weight, spec, a8_gemm.KERNEL.plan(spec, weight, VNNI_TARGET)
    lib = tvm.compile(
        tvm.IRModule({name: plan.func.with_attr("global_symbol", name) for name, (_, _, plan) in plans.items()}),
        target=VNNI_TARGET,
    )
    assert "vpdpbusd" in lib.mod.inspect_source("asm") and "zmm" in lib.mod.inspect_source("asm")
    if not HOST_HAS_VNNI:
        pytest.skip("this host has no AVX-512 VNNI: compiled only")
    for name, (weight, spec, plan) in plans.items():
        x = torch.randn(spec.batch, spec.in_features, generator=torch.Generator().manual_seed(spec.batch)) * 3
        x[0, :4] = torch.tensor([127.0, -127.0, 0.5, -0.5]) / 127 * x[0].abs().max()  # ties at the rounding boundary
        if weight["act_scale"] is not None:  # exact ties of a static step round half to even
            x[1, :6] = torch.tensor([0.5, 1.5, 2.5, -2.5, -0.5, 300.0]) * weight["act_scale"]
        got = run(lib, name, plan, x, spec.out_features)
        ref = reference(x, weight, spec.bits, spec.group_size, spec.in_features)
        assert torch.equal(got, ref), f"{name} {spec}: max diff {(got - ref).abs().max()}"


def test_gemm_on_a_symbolic_number_of_row_blocks_is_bit_exact() -> None:
    symbolic_rows_are_exact(a8_gemm.KERNEL, VNNI_TARGET, HOST_HAS_VNNI)


def test_knobs_span_the_space_and_every_choice_is_exact() -> None:
    weight = layer(384, 384, 8, 384, False, True, seed=5)
    spec = layer_spec(48, 384, 384, 8, 384, weight)
    defaults = a8_gemm.KERNEL.default_knobs(spec, VNNI_TARGET)
    assert all(defaults[key] in values for key, values in a8_gemm.KNOBS.items())
    choices = [
        {"row_tile": 2, "out_tile": 32, "row_vectors": 1},
        {"row_tile": 6, "out_tile": 192, "row_vectors": 3},
        {"row_tile": 8, "out_tile": 128, "row_vectors": 2},
    ]
    plans = {f"k{i}": a8_gemm.KERNEL.plan(spec, weight, VNNI_TARGET, knobs=knobs) for i, knobs in enumerate(choices)}
    assert [plan.knobs for plan in plans.values()] == choices
    with pytest.raises(BackendError, match="does not tile out_features"):
        a8_gemm.KERNEL.plan(spec, weight, VNNI_TARGET, knobs={"out_tile": 256})
    if not HOST_HAS_VNNI:
        pytest.skip("this host has no AVX-512 VNNI")
    lib = tvm.compile(
        tvm.IRModule({name: plan.func.with_attr("global_symbol", name) for name, plan in plans.items()}),
        target=VNNI_TARGET,
    )
    x = torch.randn(48, 384, generator=torch.Generator().manual_seed(5)) * 3
    for name, plan in plans.items():
        assert torch.equal(run(lib, name, plan, x, 384), reference(x, weight, 8, 384, 384)), plan.knobs


def test_the_lowering_takes_the_gemm_for_many_rows_and_the_gemv_kernel_for_few() -> None:
    weight = layer(384, 384, 8, 384, False, True, seed=0)
    toolchain = CPUToolchain(VNNI_TARGET)

    def chosen(rows: int) -> str:
        spec = layer_spec(rows, 384, 384, 8, 384, weight)
        return next(k.name for k in toolchain.kernels(spec) if k.supports(spec, weight, VNNI_TARGET) is None)

    assert chosen(256) == a8_gemm.KERNEL_NAME
    assert chosen(a8_gemm.MIN_ROWS) == a8_gemm.KERNEL_NAME
    assert chosen(1) == chosen(a8_gemm.MIN_ROWS - 1) == a8_linear.KERNEL_NAME
    avx2 = CPUToolchain(Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2}))
    spec = layer_spec(256, 384, 384, 8, 384, weight)
    assert next(k.name for k in avx2.kernels(spec) if k.supports(spec, weight, avx2.target) is None) == (
        a8_linear.KERNEL_NAME
    )


@pytest.mark.parametrize(
    ("changes", "target", "reason"),
    [
        ({"batch": 4}, VNNI_TARGET, "below the GEMM's 16 rows"),
        ({}, Target({"kind": "llvm", "mcpu": "znver3"}), "AVX-512 VNNI"),
        ({}, Target({"kind": "llvm", "mcpu": "x86-64"}), "AVX-512 VNNI"),
        ({"out_features": 40}, VNNI_TARGET, "not a multiple of 16"),
        ({"bits": 3}, VNNI_TARGET, "3-bit codes"),
        ({"has_g_idx": True}, VNNI_TARGET, "g_idx"),
        ({"act_bits": None}, VNNI_TARGET, "8-bit activations"),
    ],
)
def test_layers_and_targets_the_gemm_refuses(changes: dict, target: Target, reason: str) -> None:
    base = {"batch": 64, "in_features": 256, "out_features": 64, "bits": 8, "group_size": 128, "act_bits": 8}
    spec = PackedLinearSpec(**{**base, **changes}, asymmetric=False, has_bias=False)
    assert reason in a8_gemm.KERNEL.supports(spec, {}, target)
    with pytest.raises(BackendError, match="cannot take"):
        a8_gemm.KERNEL.plan(spec, {}, target)


def test_fractional_zero_points_are_refused() -> None:
    weight = layer(64, 256, 4, 64, True, False, seed=0)
    weight["zeros"] = weight["zeros"] + 0.5
    assert "fractional zero points" in a8_gemm.KERNEL.supports(
        layer_spec(64, 256, 64, 4, 64, weight), weight, VNNI_TARGET
    )


def test_the_x86_kernel_list_has_the_gemms_only_from_min_rows_on() -> None:
    toolchain = CPUToolchain(VNNI_TARGET)

    def names(rows: int) -> list[str]:
        spec = PackedLinearSpec(rows, 384, 384, 8, 384, False, True, act_bits=8)
        return [kernel.name for kernel in toolchain.kernels(spec)]

    assert names(a8_gemm.MIN_ROWS - 1) == [a8_linear.KERNEL_NAME]
    assert names(a8_gemm.MIN_ROWS) == names(256) == ["a8_amx_x86", a8_gemm.KERNEL_NAME, a8_linear.KERNEL_NAME]
