"""torchvision classifiers in fp32 on this CPU: lowbit (target="x86", no passes) against torch eager.

    python benchmarks/vision_fp32.py [--models resnet18 ...] [--threads 1 2] [--repeats 10]

Each model has random weights (``weights=None``, eval mode) and takes one 224×224 image. One process per thread
count (TVM's pool takes its size from ``TVM_NUM_THREADS`` once per process) compiles every model, checks the
compiled output against eager (relative Frobenius error, as the compile report gives it) and times both engines in
interleaved rounds (`lowbit.timing.interleaved`: per turn an idle, one untimed and one timed call). Prints a table
and writes min / median / max milliseconds, the compile time and the error per model and thread count, with the load
average at the start and the end, to ``benchmarks/results/vision_fp32.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

from lowbit.timing import interleaved, spread

MODELS = ("resnet18", "mobilenet_v3_large", "regnet_x_400mf", "efficientnet_b0", "convnext_tiny")
RESULTS = Path(__file__).parent / "results" / "vision_fp32.json"


def worker(models: list[str], threads: int, repeats: int) -> list[dict[str, Any]]:
    """Compile and time ``models`` in this process, at ``threads`` threads (``TVM_NUM_THREADS`` set by the caller)."""
    import torch
    import torchvision

    import lowbit
    from lowbit.compiler import output_agreement

    torch.set_num_threads(threads)
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        image = torch.randn(1, 3, 224, 224)
        start = time.perf_counter()
        compiled = lowbit.compile(model, (image,), target="x86", passes=[])
        compile_s = time.perf_counter() - start
        with torch.no_grad():
            _, error = output_agreement(model(image), compiled(image))
            times = interleaved({"eager": partial(model, image), "lowbit": partial(compiled, image)}, repeats)
        eager, ours = times["eager"], times["lowbit"]
        rows.append(
            {
                "model": name,
                "threads": threads,
                "compile_s": compile_s,
                "relative_error": error,
                "eager_ms": spread(eager),
                "lowbit_ms": spread(ours),
                "speedup": median(eager) / median(ours),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # the thread count of a worker process
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.models, args.worker, args.repeats)))
        return
    load_start = os.getloadavg()
    rows = []
    for threads in args.threads:
        command = [sys.executable, __file__, "--worker", str(threads), "--repeats", str(args.repeats), "--models"]
        env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
        done = subprocess.run(command + args.models, env=env, check=True, stdout=subprocess.PIPE, text=True)
        rows += json.loads(done.stdout.splitlines()[-1])
    load_end = os.getloadavg()
    print(f"{'model':20s} {'threads':>7s} {'compile s':>9s} {'eager ms':>9s} {'lowbit ms':>9s} {'speedup':>7s} error")
    for row in rows:
        print(
            f"{row['model']:20s} {row['threads']:7d} {row['compile_s']:9.1f} {row['eager_ms']['median']:9.2f} "
            f"{row['lowbit_ms']['median']:9.2f} {row['speedup']:7.2f} {row['relative_error']:.1e}"
        )
    print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"load_average_start": load_start, "load_average_end": load_end, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
