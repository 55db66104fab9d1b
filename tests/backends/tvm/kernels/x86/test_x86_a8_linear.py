"""The x86 int8-activation kernel against the torch reference op ``lowbit.linear_packed_a8``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import tvm
from tvm import te
from tvm.target import Target
from x86_a8_layers import layer, reference

import lowbit
from lowbit.backends.tvm.kernels.generic.common import fenced
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec
from lowbit.backends.tvm.kernels.spec import InputNorm, KernelPlan, PackedLinearSpec
from lowbit.backends.tvm.kernels.x86 import a8_linear
from lowbit.backends.tvm.kernels.x86 import intrin as intrin_x86
from lowbit.backends.tvm.target import has_features, resolve_target, x86_host_target
from lowbit.errors import BackendError
from lowbit.ir import packing
from lowbit.llm.reference import rms_norm

K, N = 256, 64
#: (name, bits, group_size, zeros): W1.58 is the ternary pass's layout (2-bit codes 1..3, default zero, per row).
FORMATS = [("w2", 2, 64, "asym"), ("w4", 4, 32, "sym"), ("w8", 8, 128, "asym"), ("w1.58", 2, K, "sym")]


def _weight(bits: int, group: int, zeros: str, exact: bool, seed: int) -> dict[str, torch.Tensor | None]:
    """Random codes, scales, zeros and bias; with ``exact`` every scale and the bias are powers-of-two multiples."""
    gen = torch.Generator().manual_seed(seed)
    low = 1 if group == K else 0  # ternary codes are t + 2 with t in {-1, 0, 1}
    high = 4 if group == K else 2**bits
    codes = torch.randint(low, high, (N, K), generator=gen, dtype=torch.uint8)
    groups = K // group
    if exact:
        scales = 2.0 ** -torch.randint(0, 5, (N, groups), generator=gen).float()
        bias = torch.randint(-8, 9, (N,), generator=gen).float() / 4
    else:
        scales = torch.rand(N, groups, generator=gen) * 0.1 + 0.01
        bias = torch.randn(N, generator=gen)
    zero = torch.randint(0, 2**bits, (N, groups), generator=gen).float() if zeros == "asym" else None
    return {"qweight": packing.pack(codes, bits), "scales": scales, "zeros": zero, "g_idx": None, "bias": bias}


def _spec(rows: int, bits: int, group: int, weight: dict, dynamic: bool) -> PackedLinearSpec:
    return PackedLinearSpec(rows, K, N, bits, group, weight["zeros"] is not None, True, act_bits=8, act_dynamic=dynamic)


def _build(kernel: KernelPlan | dict[str, KernelPlan], target: Target) -> tvm.runtime.Module:
    """One library of the kernel (named "kernel") or of several kernels by name (one LLVM build for all)."""
    named = kernel if isinstance(kernel, dict) else {"kernel": kernel}
    return tvm.compile(
        tvm.IRModule({name: plan.func.with_attr("global_symbol", name) for name, plan in named.items()}), target=target
    )


def _run(lib: tvm.runtime.Module, kernel: KernelPlan, x: torch.Tensor, name: str = "kernel") -> torch.Tensor:
    args = [tvm.runtime.tensor(t.numpy()) for t in [x, *kernel.consts]]
    out = tvm.runtime.tensor(np.zeros((x.shape[0], N), dtype="float32"))
    lib[name](*args, out)
    return torch.from_numpy(out.numpy())


def test_rows_of_tiny_values_keep_their_scale_bit_exactly() -> None:
    """A row scaled by 2⁻²⁴ (absmax about 1e-7) gets the same codes as the row itself and 2⁻²⁴ times its output;
    one scaled below the floor (``ACT_ABSMAX_FLOOR``) equals the reference op's; an all-zero row gives zero."""
    target = resolve_target("x86")
    weight = {**_weight(4, 32, "sym", exact=True, seed=3), "bias": torch.zeros(N)}
    row = torch.randn(K, generator=torch.Generator().manual_seed(0))
    x = torch.stack([row, row * 2.0**-24, row * 2.0**-124, torch.zeros(K)])
    kernel = a8_linear.KERNEL.plan(_spec(4, 4, 32, weight, True), weight, target)
    got, ref = _run(_build(kernel, target), kernel, x), reference(x, weight, 4, 32, K)
    assert torch.equal(got, ref)
    assert torch.equal(got[1], got[0] * 2.0**-24) and got[0].abs().max() > 0.1
    assert torch.equal(got[3], torch.zeros(N))


def _avx2_target() -> Target:
    """This machine's x86 target without VNNI, so the AVX2 intrinsics are chosen (they run on any AVX2 CPU)."""
    return Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})


@pytest.mark.parametrize(("fmt", "bits", "group", "zeros"), FORMATS, ids=[f[0] for f in FORMATS])
def test_kernel_matches_reference_op(fmt: str, bits: int, group: int, zeros: str) -> None:
    """Bit-exact with power-of-two scales, within 1e-5 relative with random ones; M ∈ {1, 5, 32}, dynamic and static.

    Runs the intrinsic this host's target picks (VNNI on AVX-512 VNNI machines, else AVX2).
    """
    target = resolve_target("x86")
    cases = {}
    for dynamic in (True, False):
        for rows in (1, 5, 32):
            for exact in (True, False):
                weight = _weight(bits, group, zeros, exact, seed=rows * 7 + bits)
                weight["act_scale"] = None if dynamic else torch.tensor(2.0**-5 if exact else 0.0371)
                kernel = a8_linear.KERNEL.plan(_spec(rows, bits, group, weight, dynamic), weight, target)
                assert isinstance(kernel, KernelPlan), kernel
                cases[f"m{rows}_{'dynamic' if dynamic else 'static'}", exact] = rows, weight, kernel
    # Power-of-two scales are float16 numbers, which the kernel stores as such (`common.scale_storage`): exact and
    # random weights get functions of their own.
    lib = _build({f"{name}_{exact}": kernel for (name, exact), (_, _, kernel) in cases.items()}, target)
    for (name, exact), (rows, weight, kernel) in cases.items():
        assert kernel.consts[1].dtype == (torch.float16 if exact else torch.float32)
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows + bits)) * 3
        got, ref = _run(lib, kernel, x, f"{name}_{exact}"), reference(x, weight, bits, group, K)
        if exact:
            assert torch.equal(got, ref), f"{fmt} {name}: max diff {(got - ref).abs().max()}"
        else:
            assert (got - ref).abs().max() / ref.abs().max() < 1e-5, f"{fmt} {name}"


@pytest.mark.parametrize("bits", [2, 8])
def test_avx2_intrinsics_are_exact(bits: int) -> None:
    """The AVX2 intrinsics (``vpmaddubsw``, and the nibble split for 8-bit codes) match the reference bit for bit."""
    target = _avx2_target()
    spec_weight = _weight(bits, 64, "asym", exact=True, seed=bits)
    spec_weight["act_scale"] = None
    spec = _spec(5, bits, 64, spec_weight, True)
    assert a8_linear.intrinsic(spec, target) == (intrin_x86.AVX2_U8 if bits == 8 else intrin_x86.AVX2_U7)
    kernel = a8_linear.KERNEL.plan(spec, spec_weight, target)
    lib = _build(kernel, target)
    assert "vpmaddubsw" in lib.mod.inspect_source("asm")
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, :4] = torch.tensor([127.0, -127.0, 0.5, -0.5]) / 127 * x[0].abs().max()  # ties at the rounding boundary
    assert torch.equal(_run(lib, kernel, x), reference(x, spec_weight, bits, 64, K))


def test_vnni_variant_compiles_and_runs_where_the_host_has_it() -> None:
    """An AVX-512 VNNI target gets ``vpdpbusd``; it is compiled always and run only on a host with the feature."""
    target = Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    weight = _weight(8, 64, "asym", exact=True, seed=1)
    weight["act_scale"] = None
    spec = _spec(5, 8, 64, weight, True)
    assert a8_linear.intrinsic(spec, target) == intrin_x86.VNNI
    kernel = a8_linear.KERNEL.plan(spec, weight, target)
    lib = _build(kernel, target)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")
    if not has_features(Target(x86_host_target()), "avx512vnni", "avx512vl"):
        pytest.skip("this host has no AVX-512 VNNI: compiled only")
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(_run(lib, kernel, x), reference(x, weight, 8, 64, K))


@pytest.mark.parametrize("bits", [2, 4])
def test_vnni_gemv_splits_lanes_and_prefetches_and_is_exact(bits: int) -> None:
    """The VNNI GEMV masks quads in place (no byte shifts) into per-quad accumulators and prefetches its weights.

    Compiled always; run (bit-exact, zero points and power-of-two scales) only on a host with AVX-512 VNNI.
    """
    target = Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    weight = _weight(bits, 64, "asym", exact=True, seed=bits + 11)
    weight["act_scale"] = None
    spec = _spec(1, bits, 64, weight, True)
    knobs = a8_linear.KERNEL.default_knobs(spec, target)
    assert a8_linear.split_lanes(intrin_x86.VNNI, bits, 64, knobs["row_tile"], knobs["row_vectors"])
    kernel = a8_linear.KERNEL.plan(spec, weight, target)
    asm = _build(kernel, target).mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "prefetchnta" in asm
    assert "vgf2p8affineqb" not in asm and "vpsrlw" not in asm  # the quads are masked, never shifted
    intel = Target({"kind": "llvm", "mcpu": "emeraldrapids", "num-cores": 2})
    assert "prefetcht0" in _build(a8_linear.KERNEL.plan(spec, weight, intel), intel).mod.inspect_source("asm")
    if not has_features(Target(x86_host_target()), "avx512vnni", "avx512vl"):
        pytest.skip("this host has no AVX-512 VNNI: compiled only")
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(bits)) * 3
    assert torch.equal(_run(_build(kernel, target), kernel, x), reference(x, weight, bits, 64, K))


def test_lanes_split_only_with_vnni_and_too_few_chains() -> None:
    """AVX2 would saturate on masked quads; a GEMM tile has chains enough; accumulators must fit registers and int32."""
    assert a8_linear.split_lanes(intrin_x86.VNNI, 2, 128, rows=1, vectors=4)
    assert not a8_linear.split_lanes(intrin_x86.AVX2_U7, 2, 128, rows=1, vectors=4)
    assert not a8_linear.split_lanes(intrin_x86.VNNI, 8, 128, rows=1, vectors=4)  # one quad per byte: nothing to split
    assert not a8_linear.split_lanes(intrin_x86.VNNI, 4, 128, rows=4, vectors=2)  # 8 chains already
    assert not a8_linear.split_lanes(intrin_x86.VNNI, 2, 128, rows=1, vectors=8)  # 32 accumulators
    # a lane sums group_size / 4 products of at most 128 · 192: 87381 of them stay below 2^31, 87382 do not
    assert a8_linear.split_lanes(intrin_x86.VNNI, 2, 4 * 87381, rows=1, vectors=4)
    assert not a8_linear.split_lanes(intrin_x86.VNNI, 2, 4 * 87382, rows=1, vectors=4)


def test_only_the_gemv_prefetches() -> None:
    """A GEMV reads each weight once and prefetches the stream; a GEMM re-reads its tile from cache and does not."""
    target = resolve_target("x86")
    weight = _weight(2, 64, "sym", exact=True, seed=4)
    weight["act_scale"] = None
    for rows, prefetches in ((1, True), (8, False)):
        kernel = a8_linear.KERNEL.plan(_spec(rows, 2, 64, weight, True), weight, target)
        assert ("llvm.prefetch" in kernel.func.script()) == prefetches, rows


def test_gemv_prefetches_its_first_weights_before_the_activation_prologue() -> None:
    """The word-row loop prefetches ahead, so the GEMV's first `PREFETCH_BYTES` are prefetched before the prologue."""
    target = resolve_target("x86")
    weight = _weight(2, 64, "sym", exact=True, seed=4)
    weight["act_scale"] = None
    script = a8_linear.KERNEL.plan(_spec(1, 2, 64, weight, True), weight, target).func.script()
    prologue = script[: script.index('T.sblock("absmax_rf")')]
    starts = [line for line in prologue.splitlines() if "llvm.prefetch" in line]
    assert len(starts) == min(a8_linear.PREFETCH_BYTES, N * K // 4) // 64
    assert "words.data, 0, " in starts[0]
    script = a8_linear.KERNEL.plan(_spec(8, 2, 64, weight, True), weight, target).func.script()
    assert "llvm.prefetch" not in script


@pytest.mark.parametrize("rows", [1, 5])
def test_absmax_runs_in_vector_lanes_and_stays_exact(rows: int) -> None:
    """The dynamic scale's ``max |x|`` is reduced in vector lanes, then across them; any order gives the same maximum.

    Runs on every AVX2 host; the largest magnitude sits at each end of a row and is negative in one of them.
    """
    target = _avx2_target()
    weight = _weight(2, 64, "asym", exact=True, seed=rows + 21)
    weight["act_scale"] = None
    kernel = a8_linear.KERNEL.plan(_spec(rows, 2, 64, weight, True), weight, target)
    lines = kernel.func.script().splitlines()
    partial = next(i for i, line in enumerate(lines) if 'T.sblock("absmax_rf")' in line)
    assert "T.vectorized(16)" in lines[partial - 1]
    lib = _build(kernel, target)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)) * 3
    x[0, -1] = -50.0
    x[-1, 0] = 40.0 if rows > 1 else x[-1, 0]
    assert torch.equal(_run(lib, kernel, x), reference(x, weight, 2, 64, K))


@pytest.mark.parametrize(("rows", "k_in", "dynamic"), [(1, K, True), (5, K, True), (1, K, False), (3, 1536, True)])
def test_input_norm_runs_in_the_prologue_and_equals_norm_then_layer(rows: int, k_in: int, dynamic: bool) -> None:
    """`X86A8Linear.normed_plan` RMS-norms each input row in the kernel, bit for bit as the torch reference norms it
    (its sum of squares in torch's order), so its output is the reference op's on the reference norm; the norm's
    weight is the last constant; a convolution's plan computes none."""
    target = resolve_target("x86")
    weight = layer(N, k_in, 4, 128, False, True, seed=rows + 31)
    weight["scales"] = torch.rand(weight["scales"].shape, generator=torch.Generator().manual_seed(rows)) * 0.1 + 0.01
    weight["act_scale"] = None if dynamic else torch.tensor(0.0371)
    gen = torch.Generator().manual_seed(rows)
    norm = InputNorm(torch.rand(k_in, generator=gen) + 0.5, 1e-5)
    x = torch.randn(rows, k_in, generator=gen) * 3
    spec = PackedLinearSpec(rows, k_in, N, 4, 128, False, True, act_bits=8, act_dynamic=dynamic)
    kernel = a8_linear.KERNEL.normed_plan(spec, weight, target, norm)
    assert torch.equal(kernel.consts[-1], norm.weight)
    got = _run(_build(kernel, target), kernel, x)
    assert torch.equal(got, reference(rms_norm(x, norm.weight, norm.eps), weight, 4, 128, k_in))
    conv = ConvSpec(1, K, N, 4, 32, False, True, act_bits=8)
    with pytest.raises(BackendError, match="convolution"):
        a8_linear.KERNEL.normed_plan(conv, weight, target, norm)
    wide = replace(spec, in_features=a8_linear.MAX_NORM_COLUMNS + 1)
    assert "torch's order" in a8_linear.KERNEL.input_norm_reason(wide, weight, target)


@pytest.mark.parametrize("k_in", [37, 100, 576, 1536, 2600])
def test_norm_sum_adds_in_torch_order(k_in: int) -> None:
    """The input norm's sum of squares equals torch's float sum bit for bit: whole blocks of slot vectors (1536,
    2600), a partial block, vectors past the last round and elements past the last vector (37, 100)."""
    rows = 4
    x = te.placeholder((rows, k_in), "float32", name="x")
    total = a8_linear.norm_sum_stages(lambda m, k: fenced(x[m, k] * x[m, k]), rows, k_in)
    func = te.create_prim_func([x, total]).with_attr("global_symbol", "kernel")
    lib = tvm.compile(tvm.IRModule({"kernel": func}), target=resolve_target("x86"))
    values = torch.randn(rows, k_in, generator=torch.Generator().manual_seed(k_in)) * 2
    out = tvm.runtime.tensor(np.zeros(rows, dtype="float32"))
    lib["kernel"](tvm.runtime.tensor(values.numpy()), out)
    assert torch.equal(torch.from_numpy(out.numpy()), values.pow(2).sum(-1))


def test_per_group_values_are_blocked_by_tile_group() -> None:
    per_group = torch.arange(64 * 3).reshape(64, 3)
    blocks = a8_linear.blocked(per_group, vectors=2)
    assert blocks.shape == (4, 3, 16)
    for block, group, row in ((0, 0, 0), (1, 2, 5), (3, 1, 15)):
        assert blocks[block, group, row] == per_group[block * 16 + row, group]


def test_knobs_span_the_space_and_every_choice_is_exact() -> None:
    target = resolve_target("x86")
    weight = _weight(4, 64, "sym", exact=True, seed=3)
    weight["act_scale"] = None
    spec = _spec(6, 4, 64, weight, True)
    defaults = a8_linear.KERNEL.default_knobs(spec, target)
    assert all(defaults[key] in values for key, values in a8_linear.KNOBS.items())
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(3))
    for knobs in ({"row_tile": 2, "out_tile": 16, "row_vectors": 1}, {"row_tile": 8, "out_tile": 64, "row_vectors": 4}):
        kernel = a8_linear.KERNEL.plan(spec, weight, target, knobs=knobs)
        assert kernel.knobs == knobs and kernel.name == a8_linear.KERNEL_NAME
        assert torch.equal(_run(_build(kernel, target), kernel, x), reference(x, weight, 4, 64, K))
    with pytest.raises(BackendError, match="no knob 'unroll'"):
        a8_linear.KERNEL.plan(spec, weight, target, knobs={"unroll": 2})
    with pytest.raises(BackendError, match="does not tile out_features"):
        a8_linear.KERNEL.plan(spec, weight, target, knobs={"out_tile": 128})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"bits": 3}, "3-bit codes"),
        ({"bits": 1}, "1-bit codes"),
        ({"has_g_idx": True}, "g_idx"),
        ({"group_size": 48}, "not a multiple of group_size"),
        ({"group_size": 8, "bits": 2}, "not a multiple of 16"),
        ({"out_features": 60}, "not a multiple of 8"),
        ({"act_bits": None}, "8-bit activations"),
    ],
)
def test_layouts_the_kernel_does_not_cover(changes: dict, reason: str) -> None:
    base = {
        "batch": 1,
        "in_features": K,
        "out_features": N,
        "bits": 4,
        "group_size": 64,
        "asymmetric": False,
        "has_bias": False,
        "act_bits": 8,
    }
    spec = PackedLinearSpec(**{**base, **changes})
    assert reason in a8_linear.unsupported_reason(spec)
    assert reason in a8_linear.KERNEL.supports(spec, {}, resolve_target("x86"))
    with pytest.raises(BackendError, match="cannot take"):
        a8_linear.KERNEL.plan(spec, {}, resolve_target("x86"))


def test_targets_and_zero_points_the_kernel_refuses() -> None:
    weight = _weight(4, 64, "asym", exact=True, seed=0)
    spec = _spec(1, 4, 64, weight, True)
    assert "x86 LLVM target" in a8_linear.KERNEL.supports(spec, weight, resolve_target("arm"))
    assert "AVX2" in a8_linear.KERNEL.supports(spec, weight, Target({"kind": "llvm", "mcpu": "x86-64"}))
    weight["zeros"] = weight["zeros"] + 0.5
    assert "fractional zero points" in a8_linear.KERNEL.supports(spec, weight, resolve_target("x86"))


@pytest.mark.parametrize("rows", [1, 5])
def test_float16_scales_are_stored_in_half_the_bytes_with_the_same_output(rows: int) -> None:
    """Random scales rounded to float16 numbers: the plan stores them as float16, and its output is bit for bit the
    output of the same layer with the scales stored as float32 (the kernel widens them exactly)."""
    target = resolve_target("x86")
    weight = _weight(4, 32, "asym", exact=False, seed=rows)
    weight["scales"] = weight["scales"].half().float()
    spec = _spec(rows, 4, 32, weight, True)
    half = a8_linear.KERNEL.plan(spec, weight, target)
    knobs = a8_linear.KERNEL.default_knobs(spec, target)
    func = a8_linear.a8_linear_func(
        spec, a8_linear.intrinsic(spec, target), knobs["row_tile"], knobs["out_tile"], knobs["row_vectors"]
    )
    full = KernelPlan(func, [*half.consts[:1], half.consts[1].float(), *half.consts[2:]], half.name, knobs)
    assert half.consts[1].dtype == torch.float16
    assert half.consts[1].nbytes * 2 == full.consts[1].nbytes
    lib = _build({"half": half, "full": full}, target)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)) * 3
    got, expected = _run(lib, half, x, "half"), _run(lib, full, x, "full")
    assert torch.equal(got, expected)
    ref = reference(x, weight, 4, 32, K)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


@pytest.mark.parametrize("rows", [1, 6])
def test_partial_last_group_runs_on_the_int8_kernel(rows: int) -> None:
    """in_features=96 in groups of 64 (SmolLM2's 576 in groups of 128 alike): padded to whole groups, zero
    inputs in the new columns, so the int8 kernel still matches the reference graph."""
    torch.manual_seed(rows)
    model = torch.nn.Sequential(torch.nn.Linear(96, 32)).eval()
    x = torch.randn(rows, 96)
    compiled = lowbit.compile(
        model,
        (x,),
        target="x86",
        passes=[lowbit.passes.get("rtn", bits=4, group_size=64), lowbit.passes.get("quantize_activations")],
    )
    assert [(linear.kernel, linear.spec.in_features) for linear in compiled._runner.linears] == [("a8_linear_x86", 128)]
    with torch.no_grad():
        ref = compiled.graph(x)
    assert (compiled(x) - ref).abs().max() / ref.abs().max() < 1e-5


GATHER_CASES = [
    (8, 32, False, {"out_tile": 64, "row_vectors": 4}, False),
    (4, 64, True, {"out_tile": 32, "row_vectors": 2}, False),
    (4, 32, False, {"out_tile": 16, "row_vectors": 1}, False),
    (8, 32, False, {"out_tile": 64, "row_vectors": 4}, True),
]


@pytest.mark.parametrize(("bits", "group", "asym", "knobs", "half"), GATHER_CASES)
def test_gather_rows_decodes_the_interleaved_table_like_the_packed_embedding(bits, group, asym, knobs, half) -> None:
    """A table tied to the layer is read from the kernel's own constants: the rows equal the packed embedding
    reference bit for bit (``half``: scales that are float16 numbers, stored as float16)."""
    from lowbit.ir import ops_embedding

    n_out, k_in = 128, 128
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (n_out, k_in), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n_out, k_in // group, generator=gen) + 0.1
    scales = scales.half().float() if half else scales
    zeros = torch.randint(0, 2**bits, (n_out, k_in // group), generator=gen).float() if asym else None
    tensors = {"qweight": packing.pack(codes, bits), "scales": scales, "zeros": zeros, "g_idx": None, "bias": None}
    spec = PackedLinearSpec(1, k_in, n_out, bits, group, asym, False, act_bits=8)
    target = Target(x86_host_target())
    chosen = {**a8_linear.KERNEL.default_knobs(spec, target), **knobs}
    plan = a8_linear.KERNEL.plan(spec, tensors, target, knobs=chosen)
    assert plan.consts[1].dtype == (torch.float16 if half else torch.float32)
    ids = torch.tensor([0, 5, 127, 64, 5, 9], dtype=torch.int64)
    func = a8_linear.KERNEL.gather_rows(spec, chosen, ids.numel(), scale_dtype=plan.consts[1].dtype)
    lib = tvm.compile(func.with_attr("global_symbol", "gather"), target=target)
    out = tvm.runtime.tensor(np.zeros((ids.numel(), k_in), "float32"))
    consts = [tvm.runtime.tensor(t.numpy()) for t in plan.consts[: 3 if asym else 2]]
    lib["gather"](tvm.runtime.tensor(ids.numpy()), *consts, out)
    expected = ops_embedding.embedding_packed(ids, tensors["qweight"], scales, zeros, bits, group, k_in)
    assert torch.equal(torch.from_numpy(out.numpy()), expected)
