"""The x86 AMX int8 GEMM against the torch reference op ``lowbit.linear_packed_a8``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import tvm
from tvm.target import Target
from x86_a8_layers import layer, layer_spec, reference, run, symbolic_rows_are_exact

from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.kernels.x86 import a8_amx, a8_gemm, a8_linear
from lowbit.backends.tvm.target import has_features, x86_host_target
from lowbit.backends.tvm.toolchains.cpu import CPUToolchain
from lowbit.backends.tvm.tuning.database import Trial
from lowbit.backends.tvm.tuning.search import propose
from lowbit.errors import BackendError

#: A target with AMX-INT8: the kernel compiles for it on any host and runs where the host has AMX.
AMX_TARGET = Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
HOST_HAS_AMX = has_features(Target(x86_host_target()), "amx-int8", "amx-tile")


#: (rows, in, out, group, asymmetric, bias, static step): the demo's W8A8 shapes at 256 rows, 32 rows, groups
#: of 64 and 128 with zero points, no bias, static activation steps.
CASES = [
    (256, 384, 384, 384, False, True, None),
    (256, 1536, 384, 1536, False, True, None),
    (256, 384, 1536, 384, False, True, None),
    (32, 384, 64, 128, True, False, None),
    (64, 1536, 384, 64, True, True, 2.0**-5),
    (96, 256, 96, 256, False, False, 2.0**-6),
]


def test_amx_gemm_is_bit_exact_with_the_reference_op() -> None:
    """Power-of-two scales make every float step exact, so the outputs must equal the reference's bit for bit."""
    plans = {}
    for index, (rows, k_in, n_out, group, asym, bias, step) in enumerate(CASES):
        weight = layer(n_out, k_in, 8, group, asym, bias, seed=index)
        if step is not None:
            weight["act_scale"] = torch.tensor(step)
        spec = layer_spec(rows, k_in, n_out, 8, group, weight)
        assert a8_amx.KERNEL.supports(spec, weight, AMX_TARGET) is None
        plans[f"case{index}"] = weight, spec, a8_amx.KERNEL.plan(spec, weight, AMX_TARGET)
    lib = tvm.compile(
        tvm.IRModule({name: plan.func.with_attr("global_symbol", name) for name, (_, _, plan) in plans.items()}),
        target=AMX_TARGET,
    )
    assert "tdpbsud" in lib.mod.inspect_source("asm")
    if not HOST_HAS_AMX:
        pytest.skip("this host has no AMX-INT8: compiled only")
    for name, (weight, spec, plan) in plans.items():
        x = torch.randn(spec.batch, spec.in_features, generator=torch.Generator().manual_seed(spec.batch)) * 3
        x[0, :4] = torch.tensor([127.0, -127.0, 0.5, -0.5]) / 127 * x[0].abs().max()
        if weight["act_scale"] is not None:  # exact ties of a static step round half to even
            x[1, :6] = torch.tensor([0.5, 1.5, 2.5, -2.5, -0.5, 300.0]) * weight["act_scale"]
        got = run(lib, name, plan, x, spec.out_features)
        ref = reference(x, weight, 8, spec.group_size, spec.in_features)
        assert torch.equal(got, ref), f"{name} {spec}: max diff {(got - ref).abs().max()}"


def test_amx_gemm_on_a_symbolic_number_of_row_blocks_is_bit_exact() -> None:
    symbolic_rows_are_exact(a8_amx.KERNEL, AMX_TARGET, HOST_HAS_AMX)


def test_the_lowering_takes_amx_for_whole_blocks_of_8_bit_rows() -> None:
    weight = layer(384, 384, 8, 384, False, True, seed=0)
    toolchain = CPUToolchain(AMX_TARGET)

    def chosen(rows: int, bits: int = 8) -> str:
        spec = layer_spec(rows, 384, 384, bits, 384, weight)
        return next(k.name for k in toolchain.kernels(spec) if k.supports(spec, weight, AMX_TARGET) is None)

    assert chosen(256) == chosen(32) == a8_amx.KERNEL_NAME
    assert chosen(48) == chosen(256, bits=4) == a8_gemm.KERNEL_NAME
    assert chosen(1) == a8_linear.KERNEL_NAME
    symbolic = dataclasses.replace(layer_spec(16, 384, 384, 8, 384, weight), row_blocks=True)
    assert a8_amx.KERNEL.symbolic_rows and a8_amx.KERNEL.supports(symbolic, weight, AMX_TARGET) is None


@pytest.mark.parametrize(
    ("changes", "target", "reason"),
    [
        ({"batch": 16}, AMX_TARGET, "multiple of 32 rows"),
        ({"batch": 80}, AMX_TARGET, "multiple of 32 rows"),
        ({}, Target({"kind": "llvm", "mcpu": "znver4"}), "AMX-INT8"),
        ({"bits": 4}, AMX_TARGET, "8-bit codes"),
        ({"out_features": 48}, AMX_TARGET, "not a multiple of 32"),
        ({"group_size": 32}, AMX_TARGET, "not a multiple of 64"),
        ({"act_bits": None}, AMX_TARGET, "8-bit activations"),
    ],
)
def test_layers_and_targets_the_amx_gemm_refuses(changes: dict, target: Target, reason: str) -> None:
    base = {"batch": 64, "in_features": 256, "out_features": 64, "bits": 8, "group_size": 128, "act_bits": 8}
    spec = PackedLinearSpec(**{**base, **changes}, asymmetric=False, has_bias=False)
    assert reason in a8_amx.KERNEL.supports(spec, {}, target)
    with pytest.raises(BackendError, match="cannot take"):
        a8_amx.KERNEL.plan(spec, {}, target)


def test_the_amx_kernel_has_no_knobs_and_the_tuner_tries_only_its_hand_schedule() -> None:
    weight = layer(64, 256, 8, 128, False, True, seed=1)
    spec = layer_spec(64, 256, 64, 8, 128, weight)
    plan = a8_amx.KERNEL.plan(spec, weight, AMX_TARGET)
    assert plan.name == a8_amx.KERNEL_NAME and plan.knobs == a8_amx.KERNEL.default_knobs(spec, AMX_TARGET) == {}
    assert propose(a8_amx.KERNEL.knobs, {}, [], "amx") == {}
    assert propose(a8_amx.KERNEL.knobs, {}, [Trial({}, "measured", 1e-4)], "amx") is None
