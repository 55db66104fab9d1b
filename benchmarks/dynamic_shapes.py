"""One model compiled for a range of shapes against one compiled per shape: MiniLM (w8a8-x86) at several sizes.

    python benchmarks/dynamic_shapes.py [--shapes 8x8 8x32 8x128 1x32 32x32] [--threads 1 2] [--repeats 10]

The demo's model (all-MiniLM-L6-v2, real weights, recipe w8a8-x86) is compiled once with the demo's symbolic batch
and sequence (`lowbit.demo.SHAPE_RANGES`) and once per ``BATCHxLENGTH`` shape at that shape. Each shape's input is
that many unpadded windows of the GPL-3 text (``[CLS]`` + tokens + ``[SEP]``). One process per thread count (TVM's
pool takes its size from ``TVM_NUM_THREADS`` once per process) times both modules in interleaved rounds
(`lowbit.timing.interleaved`: per turn an idle, one untimed and one timed call) and prints, per shape, the median
milliseconds and the ratio symbolic / fixed (1.0: no cost for serving every shape), with the relative error between
the two outputs. Writes min / median / max milliseconds, the compile times and the load average at the start and the
end to ``benchmarks/results/dynamic_shapes.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

from lowbit.timing import interleaved, spread

SHAPES = ("8x8", "8x32", "8x128", "1x32", "32x32")
RESULTS = Path(__file__).parent / "results" / "dynamic_shapes.json"
TEXT = Path("/usr/share/common-licenses/GPL-3")


def windows(tokenizer: Any, batch: int, length: int) -> dict[str, Any]:
    """``batch`` consecutive ``[CLS] + length-2 tokens + [SEP]`` windows of the GPL-3 text (no padding)."""
    import torch

    ids = tokenizer(re.sub(r"\s+", " ", TEXT.read_text()), add_special_tokens=False, verbose=False)["input_ids"]
    body = length - 2
    rows = torch.tensor(ids[: batch * body]).view(batch, body)
    cls = torch.full((batch, 1), tokenizer.cls_token_id)
    sep = torch.full((batch, 1), tokenizer.sep_token_id)
    input_ids = torch.cat([cls, rows, sep], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def worker(shapes: list[tuple[int, int]], threads: int, repeats: int) -> list[dict[str, Any]]:
    """Compile and time at ``threads`` threads (``TVM_NUM_THREADS`` set by the caller)."""
    import torch

    import lowbit
    from lowbit import demo, zoo
    from lowbit.compiler import output_agreement

    torch.set_num_threads(threads)
    minilm = zoo.load_minilm()
    example = windows(minilm.tokenizer, *shapes[0])
    start = time.perf_counter()
    symbolic = lowbit.compile(
        minilm.model, (), example_kwargs=example, recipe=demo.DEFAULT_RECIPE, dynamic_shapes=demo.dynamic_shapes()
    )
    symbolic_s = time.perf_counter() - start
    rows = []
    for batch, length in shapes:
        inputs = windows(minilm.tokenizer, batch, length)
        start = time.perf_counter()
        fixed = lowbit.compile(minilm.model, (), example_kwargs=inputs, recipe=demo.DEFAULT_RECIPE)
        fixed_s = time.perf_counter() - start
        with torch.no_grad():
            _, error = output_agreement(fixed(**inputs), symbolic(**inputs))
            times = interleaved({"symbolic": partial(symbolic, **inputs), "fixed": partial(fixed, **inputs)}, repeats)
        rows.append(
            {
                "batch": batch,
                "length": length,
                "threads": threads,
                "compile_s": {"symbolic": symbolic_s, "fixed": fixed_s},
                "relative_error": error,
                "symbolic_ms": spread(times["symbolic"]),
                "fixed_ms": spread(times["fixed"]),
                "ratio": median(times["symbolic"]) / median(times["fixed"]),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def parse_shape(text: str) -> tuple[int, int]:
    batch, length = text.lower().split("x")
    return int(batch), int(length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="BATCHxLENGTH, e.g. 8x32")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # the thread count of a worker process
    args = parser.parse_args()
    shapes = [parse_shape(text) for text in args.shapes]
    if args.worker is not None:
        print(json.dumps(worker(shapes, args.worker, args.repeats)))
        return
    load_start = os.getloadavg()
    rows = []
    for threads in args.threads:
        command = [sys.executable, __file__, "--worker", str(threads), "--repeats", str(args.repeats), "--shapes"]
        env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
        done = subprocess.run(command + args.shapes, env=env, check=True, stdout=subprocess.PIPE, text=True)
        rows += json.loads(done.stdout.splitlines()[-1])
    load_end = os.getloadavg()
    print(f"{'shape':>8s} {'threads':>7s} {'symbolic ms':>11s} {'fixed ms':>9s} {'ratio':>6s} error")
    for row in rows:
        print(
            f"{row['batch']:>3d}x{row['length']:<4d} {row['threads']:7d} {row['symbolic_ms']['median']:11.2f} "
            f"{row['fixed_ms']['median']:9.2f} {row['ratio']:6.2f} {row['relative_error']:.1e}"
        )
    print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"load_average_start": load_start, "load_average_end": load_end, "repeats": args.repeats, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
