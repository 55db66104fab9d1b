"""llama.cpp (through llama-cpp-python) on SmolLM2-135M: prompt processing, decode and perplexity.

Runs in the `.venv-llama` environment (`bash benchmarks/peers/setup_llama_cpp.sh`); called by
`benchmarks/llm_cpu.py`, which compares it with lowbit. Input is a JSON request on stdin:

    {"gguf": PATH, "work": DIR, "types": ["Q4_1", "Q4_0", ...], "threads": [1, 2],
     "prompt": [token ids], "windows": [[token ids], ...], "decode_tokens": 32, "repeats": 5}

For each type other than the file's own, the GGUF is requantized with llama.cpp's own
quantizer (``allow_requantize``). Prompt processing evaluates the prompt in one batch
from an empty KV cache; decode then evaluates ``decode_tokens`` single tokens against
the cache; both compute the logits of the last position only, as llama.cpp does by
default. Perplexity is over the windows, each scored from an empty cache with every
position's logits. Prints one
JSON list of results on stdout; progress goes to stderr.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama

log = logging.getLogger("llama_cpp_bench")

FTYPES = {
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q2_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "TQ2_0": getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_TQ2_0", None),
}


def quantized(source: Path, work: Path, name: str) -> Path:
    """``source`` requantized to ``name`` (cached in ``work``)."""
    out = work / f"{source.stem}.{name}.gguf"
    if out.exists():
        return out
    ftype = FTYPES.get(name)
    if ftype is None:
        raise SystemExit(f"this llama-cpp-python has no quantization type {name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if status != 0:
        raise SystemExit(f"llama.cpp could not quantize {source} to {name} (status {status})")
    tmp.rename(out)
    return out


def last_logits(llm: Llama) -> np.ndarray:
    """Logits of the last evaluated position (llama-cpp-python keeps ``scores`` only with ``logits_all``)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))


def measure(path: Path, threads: int, request: dict) -> dict:
    prompt, repeats = request["prompt"], request["repeats"]
    settings = dict(
        model_path=str(path),
        n_ctx=max(512, len(prompt) + request["decode_tokens"] + 8),
        n_batch=len(prompt),
        n_ubatch=len(prompt),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm = Llama(**settings)
    prompt_s, decode_s = [], []
    for _ in range(repeats + 1):  # the first round warms up
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_s.append(time.perf_counter() - start)
        token = int(np.argmax(last_logits(llm)))
        start = time.perf_counter()
        for _ in range(request["decode_tokens"]):
            llm.eval([token])
            token = int(np.argmax(last_logits(llm)))
        decode_s.append(time.perf_counter() - start)
    llm = Llama(**settings, logits_all=True)
    nll, count = 0.0, 0
    for window in request["windows"]:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logprobs[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    prompt_median = statistics.median(prompt_s[1:])
    decode_median = statistics.median(decode_s[1:])
    return {
        "prompt_ms": prompt_median * 1e3,
        "prompt_tokens_per_s": len(prompt) / prompt_median,
        "decode_tokens_per_s": request["decode_tokens"] / decode_median,
        "perplexity": math.exp(nll / count),
        "file_bytes": path.stat().st_size,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    request = json.load(sys.stdin)
    source, work = Path(request["gguf"]), Path(request["work"])
    work.mkdir(parents=True, exist_ok=True)
    native = source.stem.rsplit(".", 1)[-1]
    results = []
    for name in request["types"]:
        path = source if name == native else quantized(source, work, name)
        for threads in request["threads"]:
            log.info("llama.cpp %s, %d thread(s)", name, threads)
            results.append(
                {"type": name, "threads": threads, "version": llama_cpp.__version__, **measure(path, threads, request)}
            )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
