"""llama.cpp (through llama-cpp-python's C API bindings) as a worker of `benchmarks/llm_cpu.py`.

Runs in the `.venv-llama` environment (`bash benchmarks/peers/setup_llama_cpp.sh`):

    python llama_cpp_bench.py quantize SOURCE.gguf OUT.gguf TYPE   # llama.cpp's own quantizer
    python llama_cpp_bench.py version                               # JSON: versions and CPU features
    python llama_cpp_bench.py worker MODEL.gguf                     # speaks benchmarks/peers/llm_protocol.py
    python llama_cpp_bench.py greedy MODEL.gguf NEW_TOKENS ID...    # JSON: the greedy tokens after the prompt

``quantize`` is ``llama_model_quantize`` with the default parameters (no importance matrix)
and ``allow_requantize``. The worker calls llama.cpp the
way its own tools do: a context with llama.cpp's default parameters (flash attention
``auto``, f16 KV cache), batches of tokens into ``llama_decode`` with the logits of the last
position only for prefill and decode, greedy tokens by argmax, and the KV cache cleared
between measurements; perplexity asks for every position's logits.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import _ggml
from llm_protocol import serve

logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own log lines

FTYPES = {
    "F32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "TQ1_0": llama_cpp.LLAMA_FTYPE_MOSTLY_TQ1_0,
    "TQ2_0": llama_cpp.LLAMA_FTYPE_MOSTLY_TQ2_0,
}


def quantize(source: Path, out: Path, name: str) -> None:
    if name not in FTYPES:
        raise SystemExit(f"unknown llama.cpp type {name}; known: {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[name]
    params.allow_requantize = True  # needed only where SOURCE is itself quantized
    params.nthread = 2
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0:
        raise SystemExit(f"llama.cpp could not quantize {source} to {name} (status {status})")


def version() -> dict:
    ggml = _ggml.libggml
    ggml.ggml_version.restype = ggml.ggml_commit.restype = ctypes.c_char_p
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "ggml": ggml.ggml_version().decode(),
        "ggml_commit": ggml.ggml_commit().decode(),
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }


class LlamaCppRunner:
    """A llama.cpp model and context; the context holds one sequence of ``n_ctx`` positions."""

    def __init__(self, path: Path, setup: dict) -> None:
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        longest = max(len(ids) for ids in setup["prompts"].values())
        window = max(len(ids) for ids in setup["windows"])
        self.ctx = self.context(
            max(longest, len(setup["decode_prompt"]) + setup["new_tokens"]), longest, setup["threads"]
        )
        self.window_ctx = self.context(window, window, setup["threads"])
        flash = llama_cpp.llama_context_default_params().flash_attn_type
        self.info = {
            **version(),
            "file_bytes": path.stat().st_size,
            "flash_attn": llama_cpp.llama_flash_attn_type_name(flash).decode(),
        }

    def context(self, n_ctx: int, n_batch: int, threads: int) -> llama_cpp.llama_context_p:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise SystemExit("llama.cpp could not create a context")
        return ctx

    def evaluate(self, ids: list[int]) -> int:
        """Decode ``ids`` after what the cache holds; the greedy next token."""
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        if llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(tokens, len(ids))) != 0:
            raise SystemExit("llama_decode failed")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def clear(self, ctx: llama_cpp.llama_context_p) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)

    def prefill(self, ids: list[int]) -> float:
        self.clear(self.ctx)
        start = time.perf_counter()
        self.evaluate(ids)
        return time.perf_counter() - start

    def decode(self, ids: list[int], new_tokens: int) -> float:
        self.clear(self.ctx)
        token = self.evaluate(ids)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = self.evaluate([token])
        return time.perf_counter() - start

    def perplexity(self, windows: list[list[int]]) -> float:
        nll, count = 0.0, 0
        for window in windows:
            self.clear(self.window_ctx)
            batch = llama_cpp.llama_batch_init(len(window), 0, 1)
            for position, token in enumerate(window):
                batch.token[position], batch.pos[position] = token, position
                batch.n_seq_id[position], batch.seq_id[position][0], batch.logits[position] = 1, 0, 1
            batch.n_tokens = len(window)
            status = llama_cpp.llama_decode(self.window_ctx, batch)
            llama_cpp.llama_batch_free(batch)
            if status != 0:
                raise SystemExit("llama_decode failed")
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits(self.window_ctx), shape=(len(window), self.n_vocab)
            ).astype(np.float64)[:-1]
            logits -= logits.max(axis=1, keepdims=True)
            logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            nll -= float(logprobs[np.arange(len(window) - 1), window[1:]].sum())
            count += len(window) - 1
        return math.exp(nll / count)


def greedy(path: Path, ids: list[int], new_tokens: int) -> list[int]:
    """The first ``new_tokens`` greedy tokens after the prompt ``ids`` (empty cache)."""
    threads = len(os.sched_getaffinity(0))
    setup = {
        "prompts": {"0": ids},
        "windows": [ids],
        "decode_prompt": ids,
        "new_tokens": new_tokens,
        "threads": threads,
    }
    runner = LlamaCppRunner(path, setup)
    tokens = [runner.evaluate(ids)]
    while len(tokens) < new_tokens:
        tokens.append(runner.evaluate(tokens[-1:]))
    return tokens


def main() -> None:
    command, *rest = sys.argv[1:]
    if command == "quantize":
        source, out, name = rest
        quantize(Path(source), Path(out), name)
    elif command == "version":
        print(json.dumps(version()))
    elif command == "worker":
        serve(lambda setup: LlamaCppRunner(Path(rest[0]), setup))
    elif command == "greedy":
        path, new_tokens, *ids = rest
        print(json.dumps(greedy(Path(path), [int(i) for i in ids], int(new_tokens))))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
