"""The packed-weight TIR kernels (GEMV and panel GEMM) against the torch reference op ``lowbit.linear_packed``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from lowbit.backends.tvm.kernels.generic import packed_gemm, packed_linear
from lowbit.backends.tvm.kernels.generic.packed_linear import packed_linear_func, unsupported_reason
from lowbit.backends.tvm.kernels.spec import KernelPlan, PackedLinearSpec
from lowbit.backends.tvm.target import resolve_target
from lowbit.errors import BackendError
from lowbit.ir import ops, packing

K, N, GROUP = 256, 64, 64


def _packed_weight(bits: int, asymmetric: bool, exact: bool, seed: int) -> dict[str, torch.Tensor | None]:
    """Random codes, scales, zeros and bias; with ``exact`` every value is a small multiple of a power of two."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (N, K), generator=gen, dtype=torch.uint8)
    groups = K // GROUP
    if exact:
        scales = 2.0 ** -torch.randint(0, 5, (N, groups), generator=gen).float()
        bias = torch.randint(-8, 9, (N,), generator=gen).float() / 4
    else:
        scales = torch.rand(N, groups, generator=gen) * 0.1 + 0.01
        bias = torch.randn(N, generator=gen)
    zeros = torch.randint(0, 2**bits, (N, groups), generator=gen).float() if asymmetric else None
    return {"qweight": packing.pack(codes, bits), "scales": scales, "zeros": zeros, "bias": bias}


def _compile(kernel, rows: int, bits: int, asymmetric: bool) -> tvm.runtime.Module:
    spec = PackedLinearSpec(rows, K, N, bits, GROUP, asymmetric, True)
    target = resolve_target("x86")
    planned = kernel.plan(spec, _packed_weight(bits, asymmetric, exact=True, seed=0), target)
    assert isinstance(planned, KernelPlan), planned
    return tvm.compile(tvm.IRModule({"kernel": planned.func.with_attr("global_symbol", "kernel")}), target=target)


def _consts(kernel, rows: int, bits: int, asymmetric: bool, weight: dict) -> list[torch.Tensor]:
    """The constants ``kernel`` passes for ``weight``, in its own layout."""
    spec = PackedLinearSpec(rows, K, N, bits, GROUP, asymmetric, True)
    return kernel.plan(spec, weight, resolve_target("x86")).consts


def _run(lib: tvm.runtime.Module, x: torch.Tensor, consts: list) -> torch.Tensor:
    args = [tvm.runtime.tensor(t.contiguous().numpy()) for t in [x, *consts]]
    out = tvm.runtime.tensor(np.zeros((x.shape[0], N), dtype="float32"))
    lib["kernel"](*args, out)
    return torch.from_numpy(out.numpy())


def _reference(x: torch.Tensor, weight: dict, bits: int) -> torch.Tensor:
    return ops.linear_packed(
        x, weight["qweight"], weight["scales"], weight["zeros"], None, weight["bias"], bits, GROUP, K
    )


@pytest.mark.parametrize(
    ("kernel", "rows"),
    [
        (packed_linear.KERNEL, 1),
        (packed_linear.KERNEL, 8),
        (packed_linear.KERNEL, 32),
        (packed_gemm.KERNEL, 4),
        (packed_gemm.KERNEL, 40),
        (packed_gemm.KERNEL, 7),
    ],
    ids=lambda value: getattr(value, "name", value),
)
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kernel_matches_reference_op(kernel, bits: int, asymmetric: bool, rows: int) -> None:
    """Bit-exact when every value is exact in fp32; within 1e-5 relative on random values. The GEMM's rows
    include a row block (32) that does not divide the batch (40) and a prime batch (7); the GEMV's 32 rows run the
    panel GEMM on its packed rows."""
    lib = _compile(kernel, rows, bits, asymmetric)
    gen = torch.Generator().manual_seed(rows)

    exact = _packed_weight(bits, asymmetric, exact=True, seed=bits * 10 + rows)
    x = torch.randint(-2, 3, (rows, K), generator=gen).float()
    assert torch.equal(_run(lib, x, _consts(kernel, rows, bits, asymmetric, exact)), _reference(x, exact, bits))

    random = _packed_weight(bits, asymmetric, exact=False, seed=bits + rows)
    x = torch.randn(rows, K, generator=gen)
    ref = _reference(x, random, bits)
    assert (_run(lib, x, _consts(kernel, rows, bits, asymmetric, random)) - ref).abs().max() / ref.abs().max() < 1e-5


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"bits": 3}, "straddle bytes"),
        ({"has_g_idx": True}, "g_idx"),
        ({"group_size": 48}, "not a multiple of group_size"),
        ({"bits": 2, "group_size": 2, "in_features": 8}, "whole bytes"),
    ],
)
def test_layouts_the_kernel_does_not_cover(changes: dict, reason: str) -> None:
    base = {
        "batch": 1,
        "in_features": K,
        "out_features": N,
        "bits": 4,
        "group_size": GROUP,
        "asymmetric": False,
        "has_bias": False,
    }
    spec = PackedLinearSpec(**{**base, **changes})
    assert reason in unsupported_reason(spec)
    with pytest.raises(ValueError, match=reason):
        packed_linear_func(spec, 8)


def test_plan_builds_the_knobs_it_is_given() -> None:
    """The default knobs lie in the tuning space; other knobs build a kernel that still matches the reference."""
    target = resolve_target("x86")
    spec = PackedLinearSpec(3, K, N, 4, GROUP, False, True)
    defaults = packed_linear.KERNEL.default_knobs(spec, target)
    assert all(defaults[key] in values for key, values in packed_linear.KERNEL.knobs.items())
    weight = _packed_weight(4, False, exact=True, seed=3)
    tuned = packed_linear.KERNEL.plan(spec, weight, target, knobs={"row_tile": 2, "out_tile": 8})
    assert isinstance(tuned, KernelPlan) and tuned.knobs == {"row_tile": 2, "out_tile": 8}
    assert tuned.name == packed_linear.KERNEL_NAME and len(tuned.consts) == 3  # qweight, scales, bias
    lib = tvm.compile(tvm.IRModule({"kernel": tuned.func.with_attr("global_symbol", "kernel")}), target=target)
    x = torch.randint(-2, 3, (3, K), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(_run(lib, x, tuned.consts), _reference(x, weight, 4))


@pytest.mark.parametrize(("mcpu", "prefetches"), [("emeraldrapids", True), ("znver4", False)])
def test_gemv_prefetches_its_weights_on_intel_cores(mcpu: str, prefetches: bool) -> None:
    """On x86 cores other than AMD's the GEMV prefetches its weight stream with ``prefetcht0``; AMD's keep the
    hardware prefetcher alone."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    spec = PackedLinearSpec(1, K, N, 8, GROUP, False, True)
    planned = packed_linear.KERNEL.plan(spec, _packed_weight(8, False, exact=True, seed=5), target)
    lib = tvm.compile(tvm.IRModule({"kernel": planned.func.with_attr("global_symbol", "kernel")}), target=target)
    assert ("prefetcht0" in lib.mod.inspect_source("asm")) == prefetches


@pytest.mark.parametrize(
    "knobs", [{"row_tile": 2, "vectors": 1, "row_block": 16}, {"row_tile": 6, "vectors": 4, "row_block": 64}]
)
def test_gemm_plan_builds_the_knobs_it_is_given(knobs: dict) -> None:
    """Every knob changes the schedule, not the result."""
    target = resolve_target("x86")
    spec = PackedLinearSpec(24, K, N, 4, GROUP, True, True)
    defaults = packed_gemm.KERNEL.default_knobs(spec, target)
    assert all(defaults[key] in values for key, values in packed_gemm.KERNEL.knobs.items())
    weight = _packed_weight(4, True, exact=True, seed=5)
    tuned = packed_gemm.KERNEL.plan(spec, weight, target, knobs=knobs)
    assert isinstance(tuned, KernelPlan) and tuned.knobs == knobs and tuned.name == packed_gemm.KERNEL_NAME
    assert len(tuned.consts) == 4  # panel codes, scales, zeros, bias
    lib = tvm.compile(tvm.IRModule({"kernel": tuned.func.with_attr("global_symbol", "kernel")}), target=target)
    x = torch.randint(-2, 3, (24, K), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(_run(lib, x, tuned.consts), _reference(x, weight, 4))


def test_gemv_plans_the_panel_gemm_on_its_own_constants_from_gemm_rows() -> None:
    """A prefill-sized batch keeps the GEMV's constants (one weight serves decode and prefill) but a GEMM function."""
    target = resolve_target("x86")
    weight = _packed_weight(4, False, exact=True, seed=5)
    decode, prefill = (
        packed_linear.KERNEL.plan(PackedLinearSpec(rows, K, N, 4, GROUP, False, True), weight, target)
        for rows in (1, packed_linear.GEMM_ROWS)
    )
    assert all(torch.equal(a, b) for a, b in zip(decode.consts, prefill.consts, strict=True))
    assert "acc" in str(prefill.func) and "gacc" not in str(prefill.func)


def test_gemm_panel_layout_round_trips() -> None:
    """Panel bytes hold column ``p·W + v``'s codes of inputs ``j·pb … j·pb + pb − 1``, LSB first."""
    codes = torch.randint(0, 4, (N, K), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    panel = packed_gemm.panel_codes(packing.pack(codes, 2), 2, K, 32)
    assert panel.shape == (N // 32, K // 4, 32)
    lanes = [(panel >> (2 * l)) & 3 for l in range(4)]  # each (N/W, K/4, W)
    unpanelled = torch.stack(lanes, dim=-1).permute(0, 2, 1, 3).reshape(N, K)
    assert torch.equal(unpanelled, codes)


def test_gemm_declines_what_it_cannot_take() -> None:
    """The GEMV's layout limits, int8 activations, and N off the vector width: reasons, so the lowering falls back."""
    target = resolve_target("x86")
    weight = _packed_weight(4, False, exact=True, seed=0)
    gemm = packed_gemm.KERNEL
    assert "not a multiple of group_size" in gemm.supports(
        PackedLinearSpec(8, K, N, 4, 48, False, True), weight, target
    )
    assert "float activations" in gemm.supports(
        PackedLinearSpec(8, K, N, 4, GROUP, False, True, act_bits=8), weight, target
    )
    odd = {**weight, "qweight": weight["qweight"][:40], "scales": weight["scales"][:40], "bias": weight["bias"][:40]}
    assert "multiple of the 16-lane vector" in gemm.supports(
        PackedLinearSpec(8, K, 40, 4, GROUP, False, True), odd, target
    )
    with pytest.raises(BackendError, match="multiple of the 16-lane vector"):
        gemm.plan(PackedLinearSpec(8, K, 40, 4, GROUP, False, True), odd, target)
    with pytest.raises(ValueError, match="multiple of the 16-lane vector"):
        packed_gemm.packed_gemm_func(PackedLinearSpec(8, K, 40, 4, GROUP, False, True), 16, 4, 2, 32)


def test_plan_gives_a_reason_or_refuses_bad_knobs() -> None:
    target = resolve_target("x86")
    weight = _packed_weight(4, False, exact=True, seed=0)
    ragged = PackedLinearSpec(1, K, N, 4, 48, False, True)
    assert "not a multiple of group_size" in packed_linear.KERNEL.supports(ragged, weight, target)
    spec = PackedLinearSpec(1, K, N, 4, GROUP, False, True)
    with pytest.raises(BackendError, match="no knob 'unroll'"):
        packed_linear.KERNEL.plan(spec, weight, target, knobs={"unroll": 4})
    with pytest.raises(BackendError, match="'out_tile' must be a positive int"):
        packed_linear.KERNEL.plan(spec, weight, target, knobs={"out_tile": 0})
