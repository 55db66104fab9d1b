"""The aarch64 int8-activation kernel (NEON sdot): bit-exact against ``linear_packed_a8`` under qemu.

Scales and the static activation step are powers of two, so every float32 step of the
reference is exact and the kernel must reproduce it bit for bit. The kernels are
cross-compiled here and run on an emulated Cortex-A76 (dot-product extension), the
i8mm variant on qemu's ``max`` CPU (qemu 7.2 has no Neoverse-N2); without qemu, the
cross g++ or the emulated root of ``scripts/setup_arm.sh`` those tests skip.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import tvm
from tvm.support import cc

import lowbit.ir.ops_a8  # noqa: F401  (registers linear_packed_a8)
from lowbit.backends.tvm import ARM_CXX, qemu, rpc
from lowbit.backends.tvm.kernels.arm import a8_linear as a8_linear_arm
from lowbit.backends.tvm.kernels.spec import KernelPlan, PackedLinearSpec
from lowbit.backends.tvm.target import resolve_target
from lowbit.errors import BackendError
from lowbit.ir import packing

ARM = resolve_target("arm")
ARM_I8MM = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]})


def _layer(
    bits: int,
    rows: int,
    k_in: int,
    n_out: int,
    group: int,
    asymmetric: bool,
    bias: bool,
    dynamic: bool,
    ternary: bool = False,
    seed: int = 0,
) -> tuple[PackedLinearSpec, dict[str, Any], torch.Tensor]:
    """A random packed layer with power-of-two scales, its input, and its spec."""
    gen = torch.Generator().manual_seed(seed)
    low, high = (1, 3) if ternary else (0, (1 << bits) - 1)
    codes = torch.randint(low, high + 1, (n_out, k_in), generator=gen).to(torch.uint8)
    tensors = {
        "qweight": packing.pack(codes, bits),
        "scales": 2.0 ** torch.randint(-8, -3, (n_out, k_in // group), generator=gen).float(),
        "zeros": torch.randint(0, 1 << bits, (n_out, k_in // group), generator=gen).float() if asymmetric else None,
        "g_idx": None,
        "bias": torch.randn(n_out, generator=gen) if bias else None,
        "act_scale": None if dynamic else torch.tensor(2.0**-5),
    }
    spec = PackedLinearSpec(rows, k_in, n_out, bits, group, asymmetric, bias, act_bits=8, act_dynamic=dynamic)
    return spec, tensors, torch.randn(rows, k_in, generator=gen) * 3


def _reference(spec: PackedLinearSpec, tensors: dict[str, Any], x: torch.Tensor) -> np.ndarray:
    t = tensors
    return torch.ops.lowbit.linear_packed_a8(
        x,
        t["qweight"],
        t["scales"],
        t["zeros"],
        None,
        t["bias"],
        spec.bits,
        spec.group_size,
        spec.in_features,
        t["act_scale"],
    ).numpy()


def _run_under_qemu(
    layers: list[tuple[PackedLinearSpec, dict[str, Any], torch.Tensor]],
    tmp_path,
    knobs: list[dict[str, int] | None] | None = None,
    target: Any = ARM,
    cpu: str = qemu.DEFAULT_CPU,
) -> list[np.ndarray]:
    """Plan, cross-compile all layers into one library, and run each on an emulated ``cpu``."""
    if (reason := qemu.unavailable_reason()) is not None:
        pytest.skip(reason)
    plans = []
    for index, (spec, tensors, _) in enumerate(layers):
        planned = a8_linear_arm.KERNEL.plan(spec, tensors, target, (knobs or [None] * len(layers))[index])
        assert isinstance(planned, KernelPlan), planned
        plans.append(planned)
    mod = tvm.IRModule({f"layer{i}": p.func.with_attr("global_symbol", f"layer{i}") for i, p in enumerate(plans)})
    library = tmp_path / "kernels.so"
    tvm.compile(mod, target=target).export_library(str(library), fcompile=cc.cross_compiler(ARM_CXX))
    outputs = []
    with qemu.emulated_server(cpu) as server:
        session = rpc.connect(str(server.address), timeout=120)
        session.upload(str(library))
        module, device = session.load_module(library.name), session.cpu()
        for index, ((spec, _, x), planned) in enumerate(zip(layers, plans)):
            args = [tvm.runtime.tensor(a.numpy(), device) for a in [x, *planned.consts]]
            y = tvm.runtime.tensor(np.zeros((spec.batch, spec.out_features), np.float32), device)
            module[f"layer{index}"](*args, y)
            outputs.append(y.numpy())
    return outputs


def test_w4a8_w2a8_w8a8_are_bit_exact_under_qemu(tmp_path) -> None:
    layers = [
        _layer(4, 3, 256, 32, 64, asymmetric=True, bias=True, dynamic=True),  # W4A8 GEMM, zeros
        _layer(2, 1, 256, 48, 128, asymmetric=False, bias=False, dynamic=False, ternary=True),  # W1.58A8 GEMV, static
        _layer(8, 2, 128, 16, 32, asymmetric=False, bias=True, dynamic=True),  # W8A8 (codes − 128)
    ]
    for (spec, tensors, x), got in zip(layers, _run_under_qemu(layers, tmp_path)):
        np.testing.assert_array_equal(got, _reference(spec, tensors, x), err_msg=str(spec))


@pytest.mark.slow
def test_every_format_and_schedule_is_bit_exact_under_qemu(tmp_path) -> None:
    layers, knobs = [], []
    for bits in (2, 4, 8):
        for rows in (1, 5):
            for asymmetric, dynamic in ((False, True), (True, False)):
                layers.append(
                    _layer(bits, rows, 512, 64, 128, asymmetric, bias=asymmetric, dynamic=dynamic, seed=len(layers))
                )
                knobs.append(None)
    for choice in ({"row_tile": 8, "out_tile": 64, "row_vectors": 8}, {"row_tile": 1, "out_tile": 4, "row_vectors": 1}):
        layers.append(_layer(4, 8, 256, 64, 64, True, True, True, seed=len(layers)))
        knobs.append(choice)
    for (spec, tensors, x), got in zip(layers, _run_under_qemu(layers, tmp_path, knobs)):
        np.testing.assert_array_equal(got, _reference(spec, tensors, x), err_msg=str(spec))


@pytest.mark.slow
def test_i8mm_variant_is_bit_exact_under_qemu(tmp_path) -> None:
    layers, knobs = [], []
    for bits in (2, 4, 8):
        for asymmetric, dynamic in ((False, True), (True, False)):
            layers.append(_layer(bits, 6, 256, 32, 64, asymmetric, bias=asymmetric, dynamic=dynamic, seed=len(layers)))
            knobs.append(None)
    layers.append(_layer(4, 8, 256, 64, 128, True, True, True, seed=99))
    knobs.append({"row_tile": 8, "out_tile": 64, "row_vectors": 8})
    layers.append(_layer(2, 2, 128, 16, 64, False, False, True, ternary=True, seed=7))
    knobs.append({"row_tile": 1, "out_tile": 4, "row_vectors": 1})  # row tile rounds up to one pair
    for (spec, tensors, x), got in zip(layers, _run_under_qemu(layers, tmp_path, knobs, ARM_I8MM, cpu="max")):
        np.testing.assert_array_equal(got, _reference(spec, tensors, x), err_msg=str(spec))


def test_float_scales_step_and_bias_round_as_the_reference_under_qemu(tmp_path) -> None:
    """Random float scales, a static step that is no power of two and a bias of magnitude about 100: a fused
    multiply-add in the groups' accumulation or before the bias would round differently; sdot and i8mm stay exact."""
    layers = []
    for asymmetric, dynamic in ((False, False), (True, False), (True, True)):
        spec, tensors, x = _layer(4, 6, 256, 32, 64, asymmetric, bias=True, dynamic=dynamic, seed=len(layers))
        gen = torch.Generator().manual_seed(len(layers))
        tensors["scales"] = torch.rand(tensors["scales"].shape, generator=gen) * 0.1 + 0.01
        tensors["bias"] = torch.randn(spec.out_features, generator=gen) * 100
        tensors["act_scale"] = None if dynamic else torch.tensor(0.0371)
        layers.append((spec, tensors, x))
    for target, cpu in ((ARM, qemu.DEFAULT_CPU), (ARM_I8MM, "max")):
        for (spec, tensors, x), got in zip(layers, _run_under_qemu(layers, tmp_path, target=target, cpu=cpu)):
            np.testing.assert_array_equal(got, _reference(spec, tensors, x), err_msg=f"{target}: {spec}")


@pytest.mark.parametrize(
    ("target", "rows", "instruction"),
    [
        (ARM, 1, "sdot\tv"),
        (ARM, 4, "sdot\tv"),
        (ARM_I8MM, 1, "sdot\tv"),
        (ARM_I8MM, 4, "smmla\tv"),
    ],
)
def test_the_target_picks_the_instruction(target, rows, instruction) -> None:
    spec, tensors, _ = _layer(2, rows, 128, 16, 64, False, False, True)
    planned = a8_linear_arm.KERNEL.plan(spec, tensors, target)
    assert planned.knobs["i8mm"] == (instruction == "smmla\tv")
    assembly = tvm.compile(
        tvm.IRModule({"k": planned.func.with_attr("global_symbol", "k")}), target=target
    ).mod.inspect_source("asm")
    assert instruction in assembly


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"bits": 3}, "3-bit codes"),
        ({"bits": 1}, "1-bit codes"),
        ({"has_g_idx": True}, "g_idx"),
        ({"out_features": 18}, "multiple of 4"),
        ({"group_size": 96}, "not a multiple of group_size=96"),
        ({"group_size": 8}, "not a multiple of 16"),
        ({"act_bits": None}, "8-bit activations"),
    ],
)
def test_unsupported_layouts_get_a_reason(change, reason) -> None:
    spec, tensors, _ = _layer(2, 1, 128, 16, 64, False, False, True)
    fields = {**spec.__dict__, **change}
    assert reason in a8_linear_arm.KERNEL.supports(PackedLinearSpec(**fields), tensors, ARM)


def test_targets_and_zero_points_the_kernel_cannot_take() -> None:
    spec, tensors, _ = _layer(4, 1, 128, 16, 64, True, False, True)
    no_dotprod = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    assert "dot-product extension" in a8_linear_arm.KERNEL.supports(spec, tensors, no_dotprod)
    assert "aarch64 LLVM target" in a8_linear_arm.KERNEL.supports(spec, tensors, resolve_target("x86"))
    with pytest.raises(BackendError, match=r"'\+i8mm'"):
        a8_linear_arm.KERNEL.plan(spec, tensors, ARM, {"i8mm": 1})
    odd = PackedLinearSpec(**{**spec.__dict__, "batch": 3})
    with pytest.raises(BackendError, match="batch=3 is odd"):
        a8_linear_arm.KERNEL.plan(odd, tensors, ARM_I8MM, {"i8mm": 1})
    tensors["zeros"] = tensors["zeros"] + 0.5
    assert "fractional zero points" in a8_linear_arm.KERNEL.supports(spec, tensors, ARM)


def test_knobs_are_checked() -> None:
    spec, tensors, _ = _layer(4, 1, 128, 16, 64, False, False, True)
    assert a8_linear_arm.KERNEL.default_knobs(spec, ARM) == {"row_tile": 1, "out_tile": 16, "row_vectors": 4, "i8mm": 0}
    with pytest.raises(BackendError, match=r"knob i8mm is 0 \(sdot\) or 1 \(smmla\)"):
        a8_linear_arm.KERNEL.plan(spec, tensors, ARM, {"i8mm": 2})
    with pytest.raises(BackendError, match="does not tile out_features=16"):
        a8_linear_arm.KERNEL.plan(spec, tensors, ARM, {"out_tile": 32})
    with pytest.raises(BackendError, match="no knob 'unroll'"):
        a8_linear_arm.KERNEL.plan(spec, tensors, ARM, {"unroll": 2})
    for name, values in a8_linear_arm.KERNEL.knobs.items():  # the hand schedule lies inside the tuning space
        assert a8_linear_arm.KERNEL.default_knobs(spec, ARM)[name] in values
    # ... and the tuner can pass it back explicitly: i8mm=0 is a value of the space, not a bad knob
    default = a8_linear_arm.KERNEL.default_knobs(spec, ARM)
    assert isinstance(a8_linear_arm.KERNEL.plan(spec, tensors, ARM, default), KernelPlan)
    with pytest.raises(BackendError, match="'row_tile' must be a positive int"):
        a8_linear_arm.KERNEL.plan(spec, tensors, ARM, {"row_tile": 0})
