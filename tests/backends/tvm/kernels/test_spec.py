"""Every low-bit kernel satisfies the `LinearKernel` contract the lowering and the tuner rely on."""

from __future__ import annotations

import pytest
import torch

from lowbit.backends.tvm.kernels.arm import a8_linear as arm_a8_linear
from lowbit.backends.tvm.kernels.cuda import a8_linear as cuda_a8_linear
from lowbit.backends.tvm.kernels.cuda import linear as cuda_linear
from lowbit.backends.tvm.kernels.generic import packed_gemm, packed_linear
from lowbit.backends.tvm.kernels.spec import LinearKernel, PackedLinearSpec
from lowbit.backends.tvm.kernels.x86 import a8_linear as x86_a8_linear
from lowbit.backends.tvm.target import resolve_target
from lowbit.errors import BackendError
from lowbit.ir import packing

#: Each kernel with a target it runs on; the names key the shipped tuning records and must not change.
KERNELS = {
    "packed_linear": (packed_linear.KERNEL, "x86"),
    "packed_gemm": (packed_gemm.KERNEL, "x86"),
    "a8_linear_x86": (x86_a8_linear.KERNEL, "x86"),
    "a8_linear_arm": (arm_a8_linear.KERNEL, "arm"),
    "cuda_linear": (cuda_linear.KERNEL, "cuda"),
    "cuda_a8_linear": (cuda_a8_linear.KERNEL, "cuda"),
}


def _layer(kernel: LinearKernel, rows: int) -> tuple[PackedLinearSpec, dict]:
    a8 = "a8" in kernel.name
    gen = torch.Generator().manual_seed(0)
    n, k, group = 32, 128, 64
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    tensors = {
        "qweight": packing.pack(codes, 4),
        "scales": torch.rand(n, k // group, generator=gen) + 0.1,
        "zeros": None,
        "g_idx": None,
        "bias": torch.randn(n, generator=gen),
        "act_scale": None,
    }
    return PackedLinearSpec(rows, k, n, 4, group, False, True, act_bits=8 if a8 else None), tensors


def test_names_are_unique_and_unchanged() -> None:
    assert [kernel.name for kernel, _ in KERNELS.values()] == list(KERNELS)
    assert all(isinstance(kernel, LinearKernel) for kernel, _ in KERNELS.values())


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("rows", [1, 8])
def test_kernel_supports_plans_and_declares_its_hand_schedule(name: str, rows: int) -> None:
    kernel, target_name = KERNELS[name]
    target = resolve_target(target_name)
    spec, tensors = _layer(kernel, rows)
    assert kernel.supports(spec, tensors, target) is None
    default = kernel.default_knobs(spec, target)
    assert set(default) == set(kernel.knobs) and all(default[key] in kernel.knobs[key] for key in default)
    planned = kernel.plan(spec, tensors, target)
    assert planned.name == kernel.name and planned.knobs == default


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_an_unsupported_layer_gives_a_reason_and_plan_refuses_it(name: str) -> None:
    kernel, target_name = KERNELS[name]
    target = resolve_target(target_name)
    spec, tensors = _layer(kernel, 1)
    three_bit = PackedLinearSpec(**{**spec.__dict__, "bits": 3})
    reason = kernel.supports(three_bit, tensors, target)
    assert isinstance(reason, str) and "3-bit" in reason
    with pytest.raises(BackendError, match="3-bit"):
        kernel.plan(three_bit, tensors, target)
