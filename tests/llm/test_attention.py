"""The static-cache attention kernel against a plain torch reference: decode, prefill chunks, grouped heads,
padding, successive calls, and the Relax in-place call that generation uses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from lowbit.backends.tvm.target import resolve_target
from lowbit.llm.attention import KEY_SPLITS, AttentionSpec, _exp, cache_attention
from lowbit.llm.reference import rotate

CAPACITY = 160  # more than two key tiles, not a multiple of one
SHAPES = {"smollm2": (9, 3, 64), "tiny": (4, 2, 8)}


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of ``q (B, C, Hq, D)`` over the first ``n`` positions of the updated caches, in float64."""
    batch, chunk, q_heads, dim = q.shape
    n = mask.shape[1]
    group = q_heads // k_cache.shape[1]
    keep = (mask != 0)[:, None, :, None]
    keys = torch.where(keep, k_cache[:, :, :n], 0).double().repeat_interleave(group, dim=1)
    values = torch.where(keep, v_cache[:, :, :n], 0).double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bihd,bhjd->bhij", q.double(), keys) / math.sqrt(dim)
    positions = torch.arange(n - chunk, n)[:, None] >= torch.arange(n)[None, :]
    allowed = positions[None, None] & (mask != 0)[:, None, None, :]
    probs = torch.softmax(torch.where(allowed, scores, -math.inf), dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, 0)
    return torch.einsum("bhij,bhjd->bihd", probs, values).float()


class Stepper:
    """A built kernel called on torch tensors, its caches kept between calls."""

    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec
        func = cache_attention(spec, resolve_target("x86")).with_attr("global_symbol", "attention")
        self.kernel = tvm.compile(tvm.IRModule({"attention": func}), target=resolve_target("x86"))["attention"]
        shape = (spec.batch, spec.kv_heads, spec.max_context, spec.head_dim)
        self.k_cache = tvm.runtime.tensor(np.zeros(shape, dtype="float32"))
        self.v_cache = tvm.runtime.tensor(np.zeros(shape, dtype="float32"))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = tvm.runtime.tensor(np.zeros(q.shape, dtype="float32"))
        args = [tvm.runtime.tensor(t.numpy()) for t in (torch.cat([q, k, v], dim=2), mask.int())]
        self.kernel(*args, self.k_cache, self.v_cache, out)
        return torch.from_numpy(out.numpy())

    def caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.k_cache.numpy()), torch.from_numpy(self.v_cache.numpy())


def spec_for(shape: str, batch: int, chunk: int) -> AttentionSpec:
    q_heads, kv_heads, dim = SHAPES[shape]
    return AttentionSpec(batch, chunk, q_heads, kv_heads, dim, CAPACITY, 1 / math.sqrt(dim))


@pytest.fixture(scope="module")
def steppers() -> dict[tuple[str, int, int], Stepper]:
    """Kernels built once: (shape, batch, chunk)."""
    keys = [("smollm2", 2, 1), ("smollm2", 2, 40), ("tiny", 2, 1), ("tiny", 2, 8), ("smollm2", 1, 1)]
    return {key: Stepper(spec_for(*key)) for key in keys}


def tokens(spec: AttentionSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    b, c, d = spec.batch, spec.chunk, spec.head_dim
    q = torch.randn(b, c, spec.q_heads, d, generator=generator)
    k = torch.randn(b, c, spec.kv_heads, d, generator=generator)
    v = torch.randn(b, c, spec.kv_heads, d, generator=generator)
    return q, k, v


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def run_sequence(steppers: dict, shape: str, pad: int) -> None:
    """A prefill chunk then decode steps (row 1 left-padded by ``pad``): outputs and cache contents."""
    prefill, decode = steppers[(shape, 2, 40 if shape == "smollm2" else 8)], steppers[(shape, 2, 1)]
    n = prefill.spec.chunk
    mask = torch.ones(2, n, dtype=torch.int32)
    mask[1, :pad] = 0
    q, k, v = tokens(prefill.spec, 0)
    assert_close(prefill(q, k, v, mask), reference_after(prefill, q, mask))
    decode.k_cache, decode.v_cache = prefill.k_cache, prefill.v_cache
    written = [(k, v)]
    for step in range(5):
        q, k, v = tokens(decode.spec, step + 1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int32)], dim=1)
        assert_close(decode(q, k, v, mask), reference_after(decode, q, mask))
        written.append((k, v))
    k_cache, v_cache = decode.caches()
    k_all, v_all = (torch.cat([w[i] for w in written], dim=1).transpose(1, 2) for i in (0, 1))
    assert torch.equal(k_cache[:, :, : mask.shape[1]], k_all)
    assert torch.equal(v_cache[:, :, : mask.shape[1]], v_all)


def reference_after(stepper: Stepper, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return reference(q, *stepper.caches(), mask)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_prefill_then_decode_with_left_padding(steppers: dict, shape: str) -> None:
    run_sequence(steppers, shape, pad=3)


def test_decode_at_a_long_context_matches_reference(steppers: dict) -> None:
    """One decode step at position 150 (three key tiles), caches filled with random history."""
    stepper = steppers[("smollm2", 1, 1)]
    generator = torch.Generator().manual_seed(7)
    history = torch.randn(2, *stepper.k_cache.shape, generator=generator)
    stepper.k_cache, stepper.v_cache = (tvm.runtime.tensor(h.numpy()) for h in history)
    mask = torch.ones(1, 151, dtype=torch.int32)
    q, k, v = tokens(stepper.spec, 8)
    assert_close(stepper(q, k, v, mask), reference_after(stepper, q, mask))


def test_fully_masked_query_is_zero_and_masked_garbage_does_not_leak(steppers: dict) -> None:
    """Row 0 has no attendable position (zeros out); row 1's masked slots hold NaN and Inf (no effect)."""
    stepper = steppers[("tiny", 2, 1)]
    shape = stepper.k_cache.shape
    k_cache = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    v_cache = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 20, dtype=torch.int32)
    mask[0] = 0
    mask[1, 4:9] = 0
    k_cache[1, :, 4:9] = math.nan
    v_cache[1, :, 4:7] = math.inf
    v_cache[1, :, 7:9] = math.nan
    stepper.k_cache, stepper.v_cache = (tvm.runtime.tensor(c.numpy()) for c in (k_cache, v_cache))
    q, k, v = tokens(stepper.spec, 9)
    out = stepper(q, k, v, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out).all()
    assert_close(out, reference_after(stepper, q, mask))


def test_one_and_two_threads_give_the_same_result(steppers: dict) -> None:
    """The parallel tasks are independent: 1 and 2 worker threads give bit-identical outputs, as the reference."""
    config = tvm.get_global_func("runtime.config_threadpool")
    stepper = steppers[("smollm2", 2, 40)]
    mask = torch.ones(2, 100, dtype=torch.int32)
    q, k, v = tokens(stepper.spec, 10)
    outs = []
    try:
        for threads in (1, 2):
            config(0, threads)
            outs.append(stepper(q, k, v, mask))
    finally:
        config(0, 0)
    assert torch.equal(outs[0], outs[1])
    assert_close(outs[0], reference_after(stepper, q, mask))


def rotary_tables(rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half tables ``(CAPACITY, rotary_dim)`` as transformers builds them (each angle twice)."""
    inverse = 1 / 10000 ** (torch.arange(0, rotary_dim, 2) / rotary_dim)
    angles = torch.arange(CAPACITY)[:, None] * inverse[None, :]
    return torch.cat([angles, angles], dim=1).cos(), torch.cat([angles, angles], dim=1).sin()


@pytest.mark.parametrize(("shape", "rotary_dim"), [("smollm2", 64), ("smollm2", 32), ("tiny", 4)])
def test_rotary_in_the_kernel_equals_rotating_q_and_k_first(shape: str, rotary_dim: int) -> None:
    """With ``rotary_dim`` the kernel rotates q as it loads it and k as it appends it (all of each head, or its
    first part): a prefill chunk then decode steps, left padding, against rotating first then the plain kernel."""
    target = resolve_target("x86")
    cos, sin = rotary_tables(rotary_dim)
    for chunk in (40, 1):  # a prefill chunk appends in a loop of its own, a decode step in its tasks
        spec = spec_for(shape, 2, chunk)
        plain = Stepper(spec)
        func = cache_attention(AttentionSpec(**{**spec.__dict__, "rotary_dim": rotary_dim}), target)
        kernel = tvm.compile(tvm.IRModule({"attention": func.with_attr("global_symbol", "attention")}), target=target)
        caches = [tvm.runtime.tensor(np.zeros(plain.k_cache.shape, dtype="float32")) for _ in range(2)]
        mask = torch.ones(2, 45, dtype=torch.int32)
        mask[1, :3] = 0
        for step in range(3):
            n = 45 + step * chunk
            mask = torch.cat([mask, torch.ones(2, chunk, dtype=torch.int32)], dim=1)[:, :n]
            positions = (mask.cumsum(1) - 1).clamp(min=0)[:, n - chunk :].to(torch.int64)
            q, k, v = tokens(spec, 30 + step)
            turned = [rotate(x, cos[positions][:, :, None], sin[positions][:, :, None]) for x in (q, k)]
            expected = plain(*turned, v, mask)
            out = tvm.runtime.tensor(np.zeros(q.shape, dtype="float32"))
            args = [tvm.runtime.tensor(t.numpy()) for t in (torch.cat([q, k, v], dim=2), positions, cos, sin, mask)]
            kernel["attention"](*args, *caches, out)
            assert_close(torch.from_numpy(out.numpy()), expected)
            torch.testing.assert_close(torch.from_numpy(caches[0].numpy()), plain.caches()[0], rtol=1e-6, atol=1e-6)
            assert torch.equal(torch.from_numpy(caches[1].numpy()), plain.caches()[1])


def test_relax_call_tir_inplace_updates_the_caches_across_calls() -> None:
    """The call generation makes: ``call_tir_inplace`` with a symbolic ``n``; the caches change in place."""
    spec = spec_for("tiny", 1, 1)
    target = resolve_target("x86")
    n = tirx.Var("n", "int64")
    q_ty = relax.TensorType((spec.batch, spec.chunk, spec.q_heads, spec.head_dim), "float32")
    qkv_ty = relax.TensorType((spec.batch, spec.chunk, spec.q_heads + 2 * spec.kv_heads, spec.head_dim), "float32")
    cache_ty = relax.TensorType((spec.batch, spec.kv_heads, spec.max_context, spec.head_dim), "float32")
    params = [relax.Var("qkv", qkv_ty), relax.Var("mask", relax.TensorType((spec.batch, n), "int32"))]
    params += [relax.Var("k_cache", cache_ty), relax.Var("v_cache", cache_ty)]
    builder = relax.BlockBuilder()
    with builder.function("step", params, pure=False):
        gvar = builder.add_func(cache_attention(spec, target), "attention")
        call = relax.call_tir_inplace(gvar, params, inplace_indices=[-1, 2, 3], out_ty=[q_ty, cache_ty, cache_ty])
        result = builder.emit(call)
        builder.emit_func_output(builder.emit(relax.TupleGetItem(result, 0)))
    vm = relax.VirtualMachine(tvm.compile(builder.get(), target=target), tvm.cpu())
    cache_shape = (spec.batch, spec.kv_heads, spec.max_context, spec.head_dim)
    caches = [tvm.runtime.tensor(np.zeros(cache_shape, "float32")) for _ in range(2)]
    written = []
    for step in range(3):
        q, k, v = tokens(spec, 20 + step)
        mask = torch.ones(1, step + 1, dtype=torch.int32)
        args = [tvm.runtime.tensor(t.numpy()) for t in (torch.cat([q, k, v], dim=2), mask)]
        out = torch.from_numpy(vm["step"](*args, *caches).numpy())
        written.append((k, v))
        k_cache, v_cache = (torch.from_numpy(c.numpy()) for c in caches)
        assert torch.equal(k_cache[0, :, : step + 1], torch.cat([w[0] for w in written], dim=1)[0].transpose(0, 1))
        assert torch.equal(v_cache[0, :, : step + 1], torch.cat([w[1] for w in written], dim=1)[0].transpose(0, 1))
        assert_close(out, reference(q, k_cache, v_cache, mask))


def test_polynomial_exp_is_within_3e7_of_exp() -> None:
    """The kernel's vectorized exp over its whole range, [-87, 0], and clamped (not NaN) far below it."""
    size = 1 << 16

    @T.prim_func
    def exp_of(x: T.Buffer((size,), "float32"), y: T.Buffer((size,), "float32")) -> None:
        for outer in range(size // 16):
            for lane in T.vectorized(16):
                y[outer * 16 + lane] = _exp(x[outer * 16 + lane])

    kernel = tvm.compile(tvm.IRModule({"main": exp_of}), target=resolve_target("x86"))["main"]
    x = np.concatenate([np.linspace(-87, 0, size - 16), np.full(16, -3.4e38)]).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros(size, np.float32))
    kernel(tvm.runtime.tensor(x), y)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(y.numpy()[:-16] - exact[:-16]) / exact[:-16]) < 3e-7
    assert np.all(np.isfinite(y.numpy())) and np.all(y.numpy()[-16:] < 1e-37)


def test_a_decode_step_forks_the_thread_pool_once_and_splits_each_kv_head() -> None:
    """Decode: the new keys are appended inside the attention tasks, 3 kv heads × `KEY_SPLITS` tasks; a prefill
    chunk, whose tasks read each other's new keys, appends them in a parallel loop of its own first."""
    decode = cache_attention(spec_for("smollm2", 1, 1), resolve_target("x86")).script()
    prefill = cache_attention(spec_for("smollm2", 1, 16), resolve_target("x86")).script()
    assert decode.count("T.parallel(") == 1 and f"T.parallel({3 * KEY_SPLITS})" in decode
    assert prefill.count("T.parallel(") == 2
