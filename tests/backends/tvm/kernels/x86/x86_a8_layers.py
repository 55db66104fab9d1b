"""Layers the x86 int8 GEMM tests share: random packed weights with exact float parts, their spec, a run."""

from __future__ import annotations

import numpy as np
import torch
import tvm

from lowbit.backends.tvm.kernels.spec import KernelPlan, PackedLinearSpec
from lowbit.ir import packing


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


def run(lib: tvm.runtime.Module, name: str, plan: KernelPlan, x: torch.Tensor, n_out: int) -> torch.Tensor:
    """The compiled kernel ``name`` of ``lib`` on ``x`` with the plan's constants."""
    args = [tvm.runtime.tensor(t.numpy()) for t in [x, *plan.consts]]
    out = tvm.runtime.tensor(np.zeros((x.shape[0], n_out), dtype="float32"))
    lib[name](*args, out)
    return torch.from_numpy(out.numpy())
