"""Layers the x86 int8 GEMM tests share: random packed weights with exact float parts, their spec, a run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import tvm
from tvm.target import Target

from lowbit.backends.tvm.kernels.spec import KernelPlan, LinearKernel, PackedLinearSpec
from lowbit.ir import ops_a8, packing


def layer(n_out: int, k_in: int, bits: int, group: int, asym: bool, bias: bool, seed: int) -> dict:
    """Random codes, power-of-two scales (the float epilogue is exact), [zero points], [a bias in quarters]."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n_out, k_in), generator=gen, dtype=torch.uint8)
    groups = k_in // group
    return {
        "qweight": packing.pack(codes, bits),
        "scales": 2.0 ** -torch.randint(0, 5, (n_out, groups), generator=gen).float(),
        "zeros": torch.randint(0, 2**bits, (n_out, groups), generator=gen).float() if asym else None,
        "g_idx": None,
        "bias": torch.randint(-8, 9, (n_out,), generator=gen).float() / 4 if bias else None,
        "act_scale": None,
    }


def layer_spec(rows: int, k_in: int, n_out: int, bits: int, group: int, weight: dict) -> PackedLinearSpec:
    return PackedLinearSpec(
        rows,
        k_in,
        n_out,
        bits,
        group,
        weight["zeros"] is not None,
        weight["bias"] is not None,
        act_bits=8,
        act_dynamic=weight["act_scale"] is None,
    )


def reference(x: torch.Tensor, weight: dict, bits: int, group: int, k_in: int) -> torch.Tensor:
    """The torch reference op's output for ``weight`` (a `layer`) on ``x``."""
    return ops_a8.linear_packed_a8(
        x,
        weight["qweight"],
        weight["scales"],
        weight["zeros"],
        None,
        weight["bias"],
        bits,
        group,
        k_in,
        weight.get("act_scale"),
    )


def run(
    lib: tvm.runtime.Module, name: str, plan: KernelPlan, x: torch.Tensor, n_out: int, blocks: int | None = None
) -> torch.Tensor:
    """The compiled kernel ``name`` of ``lib`` on ``x`` with the plan's constants (and the count of row ``blocks`` of
    a kernel built for a symbolic row count)."""
    args = [tvm.runtime.tensor(t.numpy()) for t in [x, *plan.consts]] + ([blocks] if blocks is not None else [])
    out = tvm.runtime.tensor(np.zeros((x.shape[0], n_out), dtype="float32"))
    lib[name](*args, out)
    return torch.from_numpy(out.numpy())


def symbolic_rows_are_exact(kernel: LinearKernel, target: Target, host_runs: bool) -> None:
    """``kernel`` built once for a symbolic number of 16-row blocks equals the reference op bit for bit at 1, 3, 4
    and 16 blocks (an odd count leaves half a 32-row block), for dynamic and static activation scales; a kernel that
    takes any row count (`LinearKernel.tail_rows`) also at row counts that are not whole blocks (1, 15, 17, 33)."""
    cases = {}
    for index, (group, asym, step) in enumerate([(384, False, None), (128, True, 2.0**-5)]):
        weight = layer(64, 384, 8, group, asym, True, seed=index)
        if step is not None:
            weight["act_scale"] = torch.tensor(step)
        spec = dataclasses.replace(layer_spec(16, 384, 64, 8, group, weight), row_blocks=True)
        assert kernel.supports(spec, weight, target) is None
        cases[f"case{index}"] = weight, spec, kernel.plan(spec, weight, target)
    mod = {name: plan.func.with_attr("global_symbol", name) for name, (_, _, plan) in cases.items()}
    lib = tvm.compile(tvm.IRModule(mod), target=target)
    if not host_runs:
        pytest.skip("this host lacks the kernel's instructions: compiled only")
    counts = [16 * blocks for blocks in (1, 3, 4, 16)] + ([1, 15, 17, 33] if kernel.tail_rows else [])
    for name, (weight, spec, plan) in cases.items():
        for rows in counts:
            x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows)) * 3
            got = run(lib, name, plan, x, spec.out_features, None if kernel.tail_rows else rows // 16)
            ref = reference(x, weight, 8, spec.group_size, 384)
            assert torch.equal(got, ref), f"{name}, {rows} rows: max diff {(got - ref).abs().max()}"
