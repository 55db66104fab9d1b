"""lowbit's packed TVM kernels (W2/W4/W8 weights, fp32 activations) against torch fp32 ``F.linear``.

For (M, K, N) in {1, 32} × {(4096, 4096), (4096, 11008), (11008, 4096)}, group size
128, symmetric, no bias, on one thread and on all threads. Each thread count runs in
its own process (TVM sizes its thread pool once, from ``TVM_NUM_THREADS``), on kernels
compiled once by the parent. Times are medians of ``--repeats`` runs after warm-up;
the ratio is torch / lowbit (above 1: the kernel is faster). "GB/s" is the bytes a
kernel must read (packed weights, scales, activations) over its time, compared with
a measured memory-read bandwidth (a sum over a 512 MiB fp32 tensor, same thread count).

Run: ``python benchmarks/kernels.py`` (``--repeats``, ``--shapes 4096x4096`` to subset).
Writes ``benchmarks/results/kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("benchmarks.kernels")

RESULTS = Path(__file__).parent / "results" / "kernels.json"
ROWS = (1, 32)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
BITS = (2, 4, 8)
GROUP = 128
BANDWIDTH_BYTES = 512 * 2**20


def kernel_name(bits: int, rows: int, k: int, n: int) -> str:
    return f"w{bits}_m{rows}_k{k}_n{n}"


def build(shapes: list[tuple[int, int]], directory: Path) -> list[dict[str, Any]]:
    """Compile every kernel for this machine's x86 target into ``directory``; returns the case list."""
    import tvm

    from lowbit.backends.tvm.kernels.packed_linear import PackedLinearSpec, packed_linear_func
    from lowbit.backends.tvm.target import float32_lanes, resolve_target

    target = resolve_target("x86")
    lanes = float32_lanes(target)
    cases = []
    for bits in BITS:
        for rows in ROWS:
            for k, n in shapes:
                name = kernel_name(bits, rows, k, n)
                log.info("compiling %s", name)
                spec = PackedLinearSpec(rows, k, n, bits, GROUP, asymmetric=False, has_bias=False)
                lib = tvm.compile(tvm.IRModule({name: packed_linear_func(spec, lanes, name=name)}), target=target)
                lib.export_library(str(directory / f"{name}.so"))
                cases.append({"bits": bits, "M": rows, "K": k, "N": n, "name": name})
    return cases


def read_bandwidth(repeats: int) -> float:
    """Bytes/s of summing a large fp32 tensor (memory-read bound) with the current torch thread count."""
    data = torch.ones(BANDWIDTH_BYTES // 4)
    return BANDWIDTH_BYTES / (median_s(lambda: data.sum(), repeats))


def median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(directory: Path, cases: list[dict[str, Any]], threads: int, repeats: int) -> dict[str, Any]:
    """Time every case at ``threads`` threads (TVM_NUM_THREADS is set by the parent)."""
    import numpy as np
    import tvm

    from lowbit.ir import packing

    torch.set_num_threads(threads)
    bandwidth = read_bandwidth(repeats)
    log.info("%d thread(s): read bandwidth %.1f GB/s", threads, bandwidth / 1e9)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in cases:
        bits, m, k, n = case["bits"], case["M"], case["K"], case["N"]
        codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
        qweight = packing.pack(codes, bits)
        scales = torch.rand(n, k // GROUP, generator=gen) * 0.01
        x = torch.randn(m, k, generator=gen)
        weight = torch.randn(n, k, generator=gen)
        lib = tvm.runtime.load_module(str(directory / f"{case['name']}.so"))
        args = [tvm.runtime.tensor(t.numpy()) for t in (x, qweight, scales)]
        out = tvm.runtime.tensor(np.zeros((m, n), dtype="float32"))
        timer = lib.time_evaluator(case["name"], tvm.cpu(), number=1, repeat=repeats, min_repeat_ms=0)
        lowbit_s = statistics.median(timer(*args, out).results)
        with torch.no_grad():
            torch_s = median_s(lambda: F.linear(x, weight), repeats)
        read = qweight.numel() + scales.numel() * 4 + x.numel() * 4
        row = {**{key: case[key] for key in ("bits", "M", "K", "N")}, "threads": threads,
               "lowbit_ms": lowbit_s * 1e3, "torch_fp32_ms": torch_s * 1e3, "speedup": torch_s / lowbit_s,
               "read_bytes": read, "lowbit_GBps": read / lowbit_s / 1e9,
               "fraction_of_read_bandwidth": read / lowbit_s / bandwidth}
        log.info("%s, %d thread(s): lowbit %.3f ms, torch %.3f ms", case["name"], threads, row["lowbit_ms"],
                 row["torch_fp32_ms"])
        rows.append(row)
    return {"threads": threads, "read_bandwidth_GBps": bandwidth / 1e9, "rows": rows}


def table(runs: list[dict[str, Any]]) -> str:
    lines = [f"{'W':>3} {'M':>3} {'K':>6} {'N':>6} {'thr':>3} {'lowbit ms':>10} {'torch ms':>9} {'torch/lowbit':>12} "
             f"{'GB/s':>6} {'of read bw':>10}"]
    for run in runs:
        for r in run["rows"]:
            lines.append(f"{r['bits']:>3} {r['M']:>3} {r['K']:>6} {r['N']:>6} {r['threads']:>3} {r['lowbit_ms']:>10.3f} "
                         f"{r['torch_fp32_ms']:>9.3f} {r['speedup']:>11.2f}x {r['lowbit_GBps']:>6.1f} "
                         f"{r['fraction_of_read_bandwidth']:>9.0%}")
        lines.append(f"    read bandwidth at {run['threads']} thread(s): {run['read_bandwidth_GBps']:.1f} GB/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shapes", nargs="*", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN pairs")
    parser.add_argument("--worker", nargs=2, metavar=("DIR", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.worker:
        directory, threads = Path(args.worker[0]), int(args.worker[1])
        cases = json.loads((directory / "cases.json").read_text())
        (directory / f"run{threads}.json").write_text(json.dumps(worker(directory, cases, threads, args.repeats)))
        return

    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    all_threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        cases = build(shapes, directory)
        (directory / "cases.json").write_text(json.dumps(cases))
        runs = []
        for threads in sorted({1, all_threads}):
            env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
            subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--worker", str(directory),
                            str(threads)], env=env, check=True)
            runs.append(json.loads((directory / f"run{threads}.json").read_text()))
    print(table(runs))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": all_threads,
                    "torch": torch.__version__},
        "group_size": GROUP, "repeats": args.repeats, "runs": runs,
    }, indent=2) + "\n")
    log.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()
