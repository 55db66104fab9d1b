"""One decode step of attention: TVM's paged KV cache against lowbit's static in-place cache, on one thread.

SmolLM2-135M's attention shape (9 query heads, 3 kv heads, head dim 64, batch 1) over ``--layers`` layers
(30, the model's count, so the caches of one step do not all fit in the CPU caches, as in a real decode).

* paged: TVM's ``PagedAttentionKVCache`` runtime object (``vm.builtin.paged_attention_kv_cache_create``)
  with the CPU TIR kernels TVM ships (``tvm.relax.frontend.nn.llm.kv_cache``), pages of 16 tokens, no RoPE.
  A step is ``kv_state_begin_forward``, one ``attention_kv_cache_attention_with_fused_qkv`` per layer (it
  appends the token's key and value to the pages, then attends), ``kv_state_end_forward``; the token is
  popped afterwards (untimed) so every repeat runs at the same context length.
* static: `lowbit.llm.attention.cache_attention` for a decode step, one call per layer on that layer's
  ``(1, 3, T, 64)`` key and value tensors (T = the largest context), appending in place and attending.

Both caches hold the same random history; before timing, one step's outputs are checked to agree. For each
context length (128, 512, 2048 tokens after the step) the two steps are timed in alternation,
``--repeats`` times; the json/md give min/median/max microseconds per layer (a step's time divided by the
layer count), and for the paged cache how much of it is ``begin_forward`` + ``end_forward``. The 1-minute
load average is recorded at the start and the end, with the CPU model and thread count.

Run: ``python benchmarks/kv_cache.py`` (``--repeats``, ``--layers``). Writes
``benchmarks/results/kv_cache.json`` and ``kv_cache.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.relax.frontend.nn.llm import kv_cache as paged
from tvm.runtime import ShapeTuple

from lowbit.backends.tvm.target import resolve_target
from lowbit.llm.attention import AttentionSpec, cache_attention

RESULTS = Path(__file__).resolve().parent / "results" / "kv_cache.json"
Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
CONTEXTS = (128, 512, 2048)
PAGE = 16
SCALE = 1 / math.sqrt(HEAD_DIM)
THREADS = 1
DTYPE = "float32"


def builtin(name: str) -> Callable[..., Any]:
    return tvm.get_global_func(f"vm.builtin.{name}")


def compiled(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> Callable[..., Any]:
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


class PagedCache:
    """TVM's paged KV cache for one sequence, built from the CPU kernels TVM ships for it."""

    def __init__(self, layers: int, capacity: int, target: tvm.target.Target) -> None:
        h, kv, d = Q_HEADS, KV_HEADS, HEAD_DIM
        no_rope: dict[str, Any] = {}
        kernels = [
            paged._kv_cache_transpose_append(kv, d, DTYPE),
            paged._attention_prefill_ragged_cpu(kv, h, d, d, DTYPE, no_rope),
            paged._attention_prefill_cpu(kv, h, d, DTYPE, False, no_rope),
            paged._attention_decode_cpu(kv, h, d, DTYPE, False, no_rope),
            paged._attention_prefill_cpu(kv, h, d, DTYPE, True, no_rope),
            paged._attention_decode_cpu(kv, h, d, DTYPE, True, no_rope),
            paged.tree_attn_with_paged_kv_cache_cpu(kv, h, d, DTYPE, no_rope),
            paged.tree_attn_cpu(kv, h, d, DTYPE, no_rope),
            paged._merge_state_inplace_cpu(DTYPE),
            paged.llama_rope_with_position_map(1e4, 1.0, d, h, kv, DTYPE, no_rope),
            paged._copy_single_page_cpu(kv, PAGE, d, DTYPE),
            paged._kv_cache_debug_get_kv(layers, kv, d, DTYPE),
            paged._compact_kv_copy_cpu(kv, d, DTYPE),
        ]
        append, ragged, prefill, decode, prefill_sw, decode_sw, tree_paged, tree, merge, rope, copy, debug, compact = (
            compiled(func, target) for func in kernels
        )
        self.layers = layers
        self.handle = builtin("paged_attention_kv_cache_create")(
            ShapeTuple([1, capacity, capacity, PAGE, 0, 1024]),  # sequences, tokens, prefill chunk, page, no window
            ShapeTuple([0, layers]),
            h,
            kv,
            d,
            d,
            ShapeTuple([int(paged.AttnKind.MHA)] * layers),
            False,
            int(paged.RopeMode.NONE),
            1.0,
            1e4,
            None,
            tvm.runtime.empty((), DTYPE, device=tvm.cpu()),
            append,
            None,
            ["tirx", ragged],
            ["tirx", prefill],
            ["tirx", decode],
            ["tirx", prefill_sw],
            ["tirx", decode_sw],
            ["tirx", tree_paged],
            ["tirx", tree],
            [],
            [merge],
            rope,
            copy,
            debug,
            compact,
        )
        builtin("kv_state_add_sequence")(self.handle, 0)
        self._attend = builtin("attention_kv_cache_attention_with_fused_qkv")
        self._begin, self._end = builtin("kv_state_begin_forward"), builtin("kv_state_end_forward")

    def forward(self, qkv: list[tvm.runtime.Tensor], outs: list[tvm.runtime.Tensor]) -> tuple[float, float]:
        """Append ``qkv`` (per layer: tokens × (Hq + 2·Hkv) × D) and attend; the seconds of the whole step and of
        begin_forward + end_forward."""
        start = time.perf_counter()
        self._begin(self.handle, ShapeTuple([0]), ShapeTuple([qkv[0].shape[0]]), None)
        begun = time.perf_counter()
        for layer in range(self.layers):
            self._attend(self.handle, layer, SCALE, qkv[layer], outs[layer])
        attended = time.perf_counter()
        self._end(self.handle)
        end = time.perf_counter()
        return end - start, (begun - start) + (end - attended)

    def pop(self, tokens: int) -> None:
        builtin("kv_state_popn")(self.handle, 0, tokens)


@dataclass
class StaticCache:
    """lowbit's static cache: per layer two ``(1, Hkv, T, D)`` tensors and the decode kernel."""

    kernel: Callable[..., Any]
    keys: list[tvm.runtime.Tensor]
    values: list[tvm.runtime.Tensor]

    def forward(self, q: list, k: list, v: list, mask: tvm.runtime.Tensor, outs: list) -> float:
        start = time.perf_counter()
        for layer, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            self.kernel(q[layer], k[layer], v[layer], mask, keys, values, outs[layer])
        return time.perf_counter() - start


def fill(cache: PagedCache, static: StaticCache, history: np.ndarray, done: int, rng: np.random.Generator) -> None:
    """Bring both caches from ``done`` to ``len(history)`` tokens; ``history`` is (layers, 2, tokens, Hkv, D)."""
    tokens = history.shape[2] - done
    qkv, outs = [], []
    for layer in range(cache.layers):
        q = rng.standard_normal((tokens, Q_HEADS, HEAD_DIM), dtype=np.float32)
        qkv.append(tvm.runtime.tensor(np.concatenate([q, *history[layer, :, done:]], axis=1)))
        outs.append(tvm.runtime.empty((tokens, Q_HEADS, HEAD_DIM), DTYPE, tvm.cpu()))
        for tensor, part in zip((static.keys[layer], static.values[layer]), history[layer], strict=True):
            array = tensor.numpy()
            array[0, :, done : done + tokens] = part[done:].transpose(1, 0, 2)
            tensor.copyfrom(array)
    cache.forward(qkv, outs)


def spread(samples: list[float], layers: int) -> dict[str, float]:
    micros = [s * 1e6 / layers for s in samples]
    return {"min": min(micros), "median": statistics.median(micros), "max": max(micros)}


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    target = resolve_target("x86")
    capacity, layers = max(CONTEXTS), args.layers
    cache = PagedCache(layers, capacity, target)
    spec = AttentionSpec(1, 1, Q_HEADS, KV_HEADS, HEAD_DIM, capacity, SCALE)
    shape = (1, KV_HEADS, capacity, HEAD_DIM)
    static = StaticCache(
        compiled(cache_attention(spec, target), target),
        [tvm.runtime.tensor(np.zeros(shape, np.float32)) for _ in range(layers)],
        [tvm.runtime.tensor(np.zeros(shape, np.float32)) for _ in range(layers)],
    )
    rng = np.random.default_rng(0)
    history = rng.standard_normal((layers, 2, capacity, KV_HEADS, HEAD_DIM), dtype=np.float32)
    rows, done = [], 0
    for context in CONTEXTS:
        fill(cache, static, history[:, :, : context - 1], done, rng)
        done = context - 1
        q = [rng.standard_normal((1, 1, Q_HEADS, HEAD_DIM), dtype=np.float32) for _ in range(layers)]
        kv = [rng.standard_normal((2, 1, 1, KV_HEADS, HEAD_DIM), dtype=np.float32) for _ in range(layers)]
        fused = [tvm.runtime.tensor(np.concatenate([q[i][0], kv[i][0, 0], kv[i][1, 0]], axis=1)) for i in range(layers)]
        args_static = (
            [tvm.runtime.tensor(x) for x in q],
            [tvm.runtime.tensor(x[0]) for x in kv],
            [tvm.runtime.tensor(x[1]) for x in kv],
        )
        mask = tvm.runtime.tensor(np.ones((1, context), np.int32))
        out_paged = [tvm.runtime.empty((1, Q_HEADS, HEAD_DIM), DTYPE, tvm.cpu()) for _ in range(layers)]
        out_static = [tvm.runtime.empty((1, 1, Q_HEADS, HEAD_DIM), DTYPE, tvm.cpu()) for _ in range(layers)]
        cache.forward(fused, out_paged)
        cache.pop(1)
        static.forward(*args_static, mask, out_static)
        difference = max(
            float(np.abs(a.numpy().reshape(-1) - b.numpy().reshape(-1)).max())
            for a, b in zip(out_paged, out_static, strict=True)
        )
        paged_steps, bookkeeping, static_steps = [], [], []
        for _ in range(args.repeats):
            step, overhead = cache.forward(fused, out_paged)
            cache.pop(1)
            paged_steps.append(step)
            bookkeeping.append(overhead)
            static_steps.append(static.forward(*args_static, mask, out_static))
        rows.append(
            {
                "context": context,
                "max_abs_difference": difference,
                "paged_us_per_layer": spread(paged_steps, layers),
                "paged_begin_end_us_per_layer": spread(bookkeeping, layers),
                "static_us_per_layer": spread(static_steps, layers),
            }
        )
        print(json.dumps(rows[-1]))
    return rows


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def markdown(result: dict[str, Any]) -> str:
    machine, load = result["machine"], result["machine"]["load_average_1min"]
    lines = [
        "# Decode attention: TVM paged KV cache vs lowbit static cache",
        "",
        f"`{result['command']}` on {machine['cpu']} ({machine['llvm_cpu']}), {result['threads']} thread, "
        f"TVM {machine['tvm']}; 1-minute load average {load['start']:.2f} at the start and {load['end']:.2f} at "
        f"the end (shared machine). SmolLM2-135M attention (9 query heads, 3 kv heads, head dim 64, batch 1), "
        f"{result['layers']} layers per step; microseconds per layer (step time / layers), "
        f"min / median / max of {result['repeats']} steps. Details in the script's docstring.",
        "",
        "| context | paged (µs/layer) | of which begin+end | static (µs/layer) | paged / static | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        p, b, s = row["paged_us_per_layer"], row["paged_begin_end_us_per_layer"], row["static_us_per_layer"]
        lines.append(
            f"| {row['context']} | {p['min']:.1f} / {p['median']:.1f} / {p['max']:.1f} "
            f"| {b['min']:.2f} / {b['median']:.2f} / {b['max']:.2f} "
            f"| {s['min']:.1f} / {s['median']:.1f} / {s['max']:.1f} "
            f"| {p['median'] / s['median']:.1f}× | {row['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    tvm.get_global_func("runtime.config_threadpool")(0, THREADS)
    load_at_start = os.getloadavg()[0]
    rows = measure(args)
    result = {
        "command": f"python benchmarks/kv_cache.py --repeats {args.repeats} --layers {args.layers}",
        "threads": THREADS,
        "layers": args.layers,
        "repeats": args.repeats,
        "machine": {
            "cpu": cpu_model(),
            "llvm_cpu": tvm.target.codegen.llvm_get_system_cpu(),
            "tvm": tvm.__version__,
            "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
        },
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
