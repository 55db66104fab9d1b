"""Causal attention over a static key/value cache, as one hand-scheduled CPU PrimFunc.

The cache is two plain tensors ``(B, Hkv, T, D)`` of fixed capacity ``T`` that the kernel
updates in place: each call appends its ``C`` new keys and values at positions ``n - C ..
n - 1`` (``n``, the sequence length after the call, is symbolic), then lets query ``i`` (at
position ``p = n - C + i``) attend to the cached positions ``j <= p`` whose ``mask[b, j]``
is non-zero. Masked positions are never read into the result (the cache may hold garbage
there); a query with nothing to attend to gets zeros. The queries, keys and values come in one tensor, as a fused
q/k/v projection computes them (no slicing copies). With a rotary embedding (`AttentionSpec.rotary_dim`
leading features of each head, rotate-half) the kernel rotates each query as it loads it and each key as it appends
it, at the angles of the token's position, so a decode step needs no elementwise kernels around the attention.

Schedule: one parallel task per (batch row, kv head, block of queries); the task's rows are
the block's queries times the query heads that share the kv head (grouped-query
attention), so every key and value row loaded from the cache serves all of them. Where one
task holds all of its kv head's queries (a decode step), its key tiles are split in
`KEY_SPLITS` tasks, whose partial softmax sums are merged after them (rescaled to the
common top score), so a few kv heads still share the threads evenly; each task appends
the new keys and values that fall in its tiles (one fork and join of the thread pool per
layer, not two). Otherwise they are appended in a parallel loop of their own before the
tasks, which read each other's new keys. Keys
stream in tiles of `KEY_TILE` with an online softmax (running max and sum per row,
accumulators rescaled per tile), so the work and the memory read are bounded by ``n``, not
``T``, and nothing but the tile's scores is kept. Dot products and the value accumulation
are vectorized along ``D`` (a value row is loaded once and added into every row's sum); the
tile's max, exponentials (a polynomial, `_exp`: LLVM would call libm per lane) and sum are
vectorized along the keys. Masked and future positions get the lowest float32 as score and
an exact 0 as weight, and a value row whose weight is 0 is skipped, never multiplied. A task's scalars are
let-bound (``T.bind``): a plain assignment makes a mutable local, which TVM allocates from its workspace pool inside
a parallel loop (a call per scalar per task, about 1 µs per decode call in all).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script import tirx as T

from lowbit.backends.tvm.kernels.generic.common import divisor_at_most, finish, power_of_two_divisor
from lowbit.backends.tvm.target import float32_lanes

#: Keys per tile of the online softmax (their scores stay in L1; their rows stay in L1 across the task's rows).
KEY_TILE = 64
#: Rows (queries × grouped heads) per task in a prefill chunk: each loaded key serves that many dot products.
ROW_BLOCK = 32
#: Parts a task's key tiles are split into where one task holds all of a kv head's queries (a decode step): a
#: model with 3 kv heads (SmolLM2) makes 6 tasks, which two threads share evenly, not 2 to 1.
KEY_SPLITS = 2
#: Below this, `_exp` returns its value at the floor: ``2^k`` stays a normal float32 (``k >= -126``).
EXP_FLOOR = -87.0
#: ln 2 split in two (the high part exact in a few bits), so ``x - k·ln 2`` loses nothing for ``|k| <= 126``.
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4
#: The score of a position that is not attended to: the lowest float32, so differences with it stay finite.
MASKED = -3.4028234663852886e38


@dataclass(frozen=True)
class AttentionSpec:
    """Shapes of one attention call: ``C`` new tokens for ``B`` rows, against a cache of ``T`` positions."""

    batch: int
    chunk: int
    q_heads: int
    kv_heads: int
    head_dim: int
    max_context: int
    scale: float
    #: Leading features of each head that the kernel rotates (rotate-half) before use, 0 for none.
    rotary_dim: int = 0

    def __post_init__(self) -> None:
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and in [0, head_dim={self.head_dim}]")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads={self.q_heads} is not a multiple of kv_heads={self.kv_heads}")
        if not 1 <= self.chunk <= self.max_context:
            raise ValueError(f"chunk={self.chunk} must lie in [1, max_context={self.max_context}]")

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.q_heads // self.kv_heads

    @property
    def query_block(self) -> int:
        """Queries per task: all of a decode step, up to `ROW_BLOCK` rows (queries × group) in a prefill chunk."""
        return divisor_at_most(self.chunk, max(1, ROW_BLOCK // self.group))


def cache_attention(spec: AttentionSpec, target: tvm.target.Target) -> tirx.PrimFunc:
    """The PrimFunc ``(qkv, mask, k_cache, v_cache, out)`` of the module doc, for ``target``'s CPU; with
    ``spec.rotary_dim``, ``(qkv, positions, cos, sin, mask, k_cache, v_cache, out)``.

    Shapes: ``qkv (B, C, Hq + 2 Hkv, D)`` (the query heads, then the key heads, then the value heads: a fused
    projection's output as it is), ``out (B, C, Hq, D)``, ``mask (B, n)`` int32 with a
    symbolic int64 ``n``, ``k_cache, v_cache (B, Hkv, T, D)``, ``positions (B, C)`` int64 (the new tokens' rotary
    positions), ``cos, sin (T, rotary_dim)``; all float32 but the mask and the positions.
    """
    return finish(_kernel(spec, float32_lanes(target)), None)


@functools.cache
def _kernel(spec: AttentionSpec, wide: int) -> tirx.PrimFunc:
    """The unmarked PrimFunc, parsed once per shape, for vectors of ``wide`` float32 lanes."""
    batch, chunk, q_heads, kv_heads, dim, capacity = (
        spec.batch,
        spec.chunk,
        spec.q_heads,
        spec.kv_heads,
        spec.head_dim,
        spec.max_context,
    )
    group, block, heads = spec.group, spec.query_block, spec.q_heads + 2 * spec.kv_heads
    lanes = power_of_two_divisor(dim, wide)  # vectors along the head dimension
    rows, blocks, chunks, tile = block * group, chunk // block, dim // lanes, KEY_TILE
    splits = KEY_SPLITS if blocks == 1 else 1
    partials = batch * kv_heads * splits if splits > 1 else 1
    scale = spec.scale
    rotary, half = spec.rotary_dim, spec.rotary_dim // 2
    # vectors of the rotation: whole ones on each side of the half
    turn = power_of_two_divisor(math.gcd(dim, half), wide) if rotary else lanes

    @T.macro
    def fold_lanes(buffer: T.Buffer, width: T.int32, combine: T.handle) -> None:
        """Combine the ``width`` lanes of ``buffer`` into its first element, halving the vector each step."""
        if width >= 16:
            for lane in T.vectorized(8):
                buffer[lane] = combine(buffer[lane], buffer[lane + 8])
        if width >= 8:
            for lane in T.vectorized(4):
                buffer[lane] = combine(buffer[lane], buffer[lane + 4])
        if width >= 4:
            for lane in T.vectorized(2):
                buffer[lane] = combine(buffer[lane], buffer[lane + 2])
        if width >= 2:
            buffer[0] = combine(buffer[0], buffer[1])

    @T.macro
    def rotated(
        dst: T.Buffer, dst_row: T.int64, src: T.Buffer, src_row: T.int64, cos: T.Buffer, sin: T.Buffer,
        position: T.int64, factor: T.float32,
    ) -> None:  # fmt: skip
        """Row ``dst_row`` of ``dst`` = ``factor`` × row ``src_row`` of ``src``, its first `rotary_dim` features
        rotated (rotate-half) by the angles of ``position``; rows are 2-d views of the 4-d tensors."""
        for dc in range(half // turn):
            for lane in T.vectorized(turn):
                dst[dst_row, dc * turn + lane] = (
                    src[src_row, dc * turn + lane] * cos[position, dc * turn + lane]
                    - src[src_row, half + dc * turn + lane] * sin[position, dc * turn + lane]
                ) * factor
        for dc in range(half // turn, rotary // turn):
            for lane in T.vectorized(turn):
                dst[dst_row, dc * turn + lane] = (
                    src[src_row, dc * turn + lane] * cos[position, dc * turn + lane]
                    + src[src_row, dc * turn + lane - half] * sin[position, dc * turn + lane]
                ) * factor
        for dc in range(rotary // turn, dim // turn):
            for lane in T.vectorized(turn):
                dst[dst_row, dc * turn + lane] = src[src_row, dc * turn + lane] * factor

    @T.macro
    def append(
        qkv: T.Buffer, k_cache: T.Buffer, v_cache: T.Buffer, positions: T.Buffer, cos: T.Buffer,
        sin: T.Buffer, b: T.int64, g: T.int64, start: T.int64, low: T.int64, high: T.int64,
    ) -> None:  # fmt: skip
        """Write the new keys (rotated) and values of row ``b``, kv head ``g`` at positions ``start ..`` in ``[low,
        high)``."""
        for i in range(chunk):
            if start + i >= low:  # noqa: SIM102 (TIR's `and` evaluates both sides)
                if start + i < high:
                    for dc in range(chunks):
                        for lane in T.vectorized(lanes):
                            v_cache[b, g, start + i, dc * lanes + lane] = qkv[
                                b, i, q_heads + kv_heads + g, dc * lanes + lane
                            ]
                    if rotary > 0:
                        rotated(
                            T.decl_buffer((batch * kv_heads * capacity, dim), "float32", data=k_cache.data),
                            (b * kv_heads + g) * capacity + start + i,
                            T.decl_buffer((batch * chunk * heads, dim), "float32", data=qkv.data),
                            (b * chunk + i) * heads + q_heads + g,
                            cos,
                            sin,
                            T.min(T.max(positions[b, i], 0), capacity - 1),
                            T.float32(1),
                        )
                    else:
                        for dc in range(chunks):
                            for lane in T.vectorized(lanes):
                                k_cache[b, g, start + i, dc * lanes + lane] = qkv[b, i, q_heads + g, dc * lanes + lane]

    @T.macro
    def attend(
        qkv: T.Buffer, positions: T.Buffer, cos: T.Buffer, sin: T.Buffer, mask: T.Buffer,
        k_cache: T.Buffer, v_cache: T.Buffer, out: T.Buffer, n: T.int64,
    ) -> None:  # fmt: skip
        """The kernel's body (``positions, cos, sin`` are None without rotary)."""
        start = T.bind(n - chunk)  # position of the first new token
        # the top score, sum of weights and weighted values of each (task, row) over the task's keys, when split
        part_top = T.decl_buffer((partials, rows), "float32")
        part_total = T.decl_buffer((partials, rows), "float32")
        part_acc = T.decl_buffer((partials, rows, dim), "float32")
        if blocks > 1:  # tasks of one kv head read each other's new keys: append them all first
            for bh in T.parallel(batch * kv_heads):
                append(qkv, k_cache, v_cache, positions, cos, sin, bh // kv_heads, bh % kv_heads, start, start, n)
        for task in T.parallel(batch * kv_heads * blocks * splits):
            split = T.bind(task % splits)
            b = T.bind(task // splits // (kv_heads * blocks))
            g = T.bind(task // splits // blocks % kv_heads)
            first = T.bind(task // splits % blocks * block)  # first query of the task
            end = T.bind(start + first + block)  # positions < end are attended to by some row of the task
            tiles = T.bind((end + (tile - 1)) // tile)
            begin = T.bind(split * ((tiles + (splits - 1)) // splits))  # the task's key tiles: [begin, stop)
            stop = T.bind(T.min(begin + (tiles + (splits - 1)) // splits, tiles))
            if blocks == 1:  # the new keys in the task's tiles are its own: append in the same parallel region
                append(qkv, k_cache, v_cache, positions, cos, sin, b, g, start, begin * tile, stop * tile)
            qs = T.decl_buffer((rows, dim), "float32")
            acc = T.decl_buffer((rows, dim), "float32")
            scores = T.decl_buffer((rows, tile), "float32")
            top = T.decl_buffer((rows,), "float32")
            tile_top = T.decl_buffer((rows,), "float32")
            total = T.decl_buffer((rows,), "float32")
            part = T.decl_buffer((lanes,), "float32")
            fold = T.decl_buffer((wide,), "float32")
            rescale = T.decl_buffer((1,), "float32")
            for r, dc in T.grid(rows, chunks):
                for lane in T.vectorized(lanes):
                    acc[r, dc * lanes + lane] = T.float32(0)
            for r in range(rows):
                if rotary > 0:
                    rotated(
                        qs,
                        r,
                        T.decl_buffer((batch * chunk * heads, dim), "float32", data=qkv.data),
                        (b * chunk + first + r // group) * heads + g * group + r % group,
                        cos,
                        sin,
                        T.min(T.max(positions[b, first + r // group], 0), capacity - 1),
                        T.float32(scale),
                    )
                else:
                    for dc in range(chunks):
                        for lane in T.vectorized(lanes):
                            qs[r, dc * lanes + lane] = qkv[
                                b, first + r // group, g * group + r % group, dc * lanes + lane
                            ] * T.float32(scale)
            for r in range(rows):
                top[r] = T.float32(MASKED)
                total[r] = T.float32(0)
            for t in range(begin, T.max(begin, stop)):
                for r, jj in T.grid(rows, tile):
                    scores[r, jj] = T.float32(MASKED)
                for jj in range(tile):
                    if t * tile + jj < end:  # noqa: SIM102 (TIR's `and` evaluates both sides: no mask read past n)
                        if mask[b, t * tile + jj] != 0:
                            for r in range(rows):
                                for lane in T.vectorized(lanes):
                                    part[lane] = qs[r, lane] * k_cache[b, g, t * tile + jj, lane]
                                for dc in range(1, chunks):
                                    for lane in T.vectorized(lanes):
                                        part[lane] = (
                                            part[lane]
                                            + qs[r, dc * lanes + lane] * k_cache[b, g, t * tile + jj, dc * lanes + lane]
                                        )
                                fold_lanes(part, lanes, _add)
                                if t * tile + jj <= start + first + r // group:
                                    scores[r, jj] = part[0]
                for r in range(rows):
                    for lane in T.vectorized(wide):
                        fold[lane] = scores[r, lane]
                    for jc in range(1, tile // wide):
                        for lane in T.vectorized(wide):
                            fold[lane] = T.max(fold[lane], scores[r, jc * wide + lane])
                    fold_lanes(fold, wide, T.max)
                    tile_top[r] = T.max(top[r], fold[0])
                    rescale[0] = _exp(top[r] - tile_top[r])
                    top[r] = tile_top[r]
                    for jc in range(tile // wide):
                        for lane in T.vectorized(wide):
                            scores[r, jc * wide + lane] = T.Select(
                                scores[r, jc * wide + lane] > T.float32(MASKED),
                                _exp(scores[r, jc * wide + lane] - tile_top[r]),
                                T.float32(0),
                            )
                    for lane in T.vectorized(wide):
                        fold[lane] = scores[r, lane]
                    for jc in range(1, tile // wide):
                        for lane in T.vectorized(wide):
                            fold[lane] = fold[lane] + scores[r, jc * wide + lane]
                    fold_lanes(fold, wide, _add)
                    total[r] = total[r] * rescale[0] + fold[0]
                    for dc in range(chunks):
                        for lane in T.vectorized(lanes):
                            acc[r, dc * lanes + lane] = acc[r, dc * lanes + lane] * rescale[0]
                for jj, r in T.grid(tile, rows):  # a value row serves every row; the rows' sums are independent
                    if scores[r, jj] != T.float32(0):  # masked positions: never read (their rows may be NaN)
                        for dc in range(chunks):
                            for lane in T.vectorized(lanes):
                                acc[r, dc * lanes + lane] = (
                                    acc[r, dc * lanes + lane]
                                    + scores[r, jj] * v_cache[b, g, t * tile + jj, dc * lanes + lane]
                                )
            if splits == 1:
                for r, dc in T.grid(rows, chunks):
                    for lane in T.vectorized(lanes):
                        out[b, first + r // group, g * group + r % group, dc * lanes + lane] = T.Select(
                            total[r] > T.float32(0), acc[r, dc * lanes + lane] / total[r], T.float32(0)
                        )
            else:
                for r in range(rows):
                    part_top[task, r] = top[r]
                    part_total[task, r] = total[r]
                    for dc in range(chunks):
                        for lane in T.vectorized(lanes):
                            part_acc[task, r, dc * lanes + lane] = acc[r, dc * lanes + lane]
        if splits > 1:  # blocks == 1: a head's splits are consecutive tasks; their sums rescaled to the top score
            for bg, r in T.grid(batch * kv_heads, rows):
                best = T.decl_buffer((1,), "float32")
                weights = T.decl_buffer((splits,), "float32")
                merged = T.decl_buffer((1,), "float32")
                values = T.decl_buffer((dim,), "float32")
                best[0] = part_top[bg * splits, r]
                for split in range(1, splits):
                    best[0] = T.max(best[0], part_top[bg * splits + split, r])
                merged[0] = T.float32(0)
                for split in range(splits):
                    weights[split] = _exp(part_top[bg * splits + split, r] - best[0])
                    merged[0] = merged[0] + weights[split] * part_total[bg * splits + split, r]
                for dc in range(chunks):
                    for lane in T.vectorized(lanes):
                        values[dc * lanes + lane] = weights[0] * part_acc[bg * splits, r, dc * lanes + lane]
                for split, dc in T.grid(splits - 1, chunks):
                    for lane in T.vectorized(lanes):
                        values[dc * lanes + lane] = (
                            values[dc * lanes + lane]
                            + weights[split + 1] * part_acc[bg * splits + split + 1, r, dc * lanes + lane]
                        )
                head = T.bind(bg % kv_heads * group + r % group)
                for dc in range(chunks):
                    for lane in T.vectorized(lanes):
                        out[bg // kv_heads, r // group, head, dc * lanes + lane] = T.Select(
                            merged[0] > T.float32(0), values[dc * lanes + lane] / merged[0], T.float32(0)
                        )

    if rotary:

        @T.prim_func(private=True)
        def rotating(
            qkv: T.Buffer((batch, chunk, heads, dim), "float32"),
            positions: T.Buffer((batch, chunk), "int64"),
            cos: T.Buffer((capacity, rotary), "float32"),
            sin: T.Buffer((capacity, rotary), "float32"),
            mask_handle: T.handle,
            k_cache: T.Buffer((batch, kv_heads, capacity, dim), "float32"),
            v_cache: T.Buffer((batch, kv_heads, capacity, dim), "float32"),
            out: T.Buffer((batch, chunk, q_heads, dim), "float32"),
        ) -> None:
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            mask = T.match_buffer(mask_handle, (batch, n), "int32")
            attend(qkv, positions, cos, sin, mask, k_cache, v_cache, out, n)

        return rotating

    @T.prim_func(private=True)
    def kernel(
        qkv: T.Buffer((batch, chunk, heads, dim), "float32"),
        mask_handle: T.handle,
        k_cache: T.Buffer((batch, kv_heads, capacity, dim), "float32"),
        v_cache: T.Buffer((batch, kv_heads, capacity, dim), "float32"),
        out: T.Buffer((batch, chunk, q_heads, dim), "float32"),
    ) -> None:
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        mask = T.match_buffer(mask_handle, (batch, n), "int32")
        attend(qkv, None, None, None, mask, k_cache, v_cache, out, n)

    return kernel


def _add(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    return a + b


def _exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(x)`` for ``x <= 0`` that vectorizes (LLVM calls libm once per lane for ``exp``), within 3e-7 relative.

    ``x = k·ln 2 + r`` with ``|r| <= ln 2 / 2``, ``exp(r)`` by its Taylor polynomial of degree 6, ``2^k`` built in
    the exponent bits; ``x`` is clamped at `EXP_FLOOR`, where the result (~1e-38) is as good as zero here.
    """
    x = T.max(x, T.float32(EXP_FLOOR))
    k = T.round(x * T.float32(1 / math.log(2)))
    r = x - k * T.float32(LN2_HIGH) - k * T.float32(LN2_LOW)
    poly = T.float32(1 / 720)
    for degree in (5, 4, 3, 2, 1, 0):
        poly = poly * r + T.float32(1 / math.factorial(degree))
    return poly * T.reinterpret("float32", T.shift_left(T.Cast("int32", k) + 127, 23))


__all__ = ["KEY_TILE", "AttentionSpec", "cache_attention"]
