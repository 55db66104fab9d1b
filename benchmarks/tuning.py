"""Tuned against hand-scheduled low-bit kernels: the time of each and the ratio, measured in one run.

For each case (W4A16 g128 on the packed kernels the lowering picks — the GEMV ``packed_linear``
at one row, the panel GEMM ``packed_gemm`` from 4 rows: the layer shapes of ``lowbit demo`` —
all-MiniLM-L6-v2, 256 rows — their one-row decode shapes and (1|32, 4096, 4096); W2A8
g64 asymmetric on the x86 int8 kernel: a MiniLM shape and (1|32, 4096, 4096)), the
tuner reads the best knobs
from the tuning database (the cache dir's, over the shipped one), tuning the case first
when it has no finished record (``--trials`` per case). Then the hand schedule
(``default_knobs``) and the tuned one are built once and timed in turn, ``--rounds``
rounds of ``time_evaluator`` medians each, and the median of each is reported; the
ratio is hand / tuned (above 1: tuning helped). Uses TVM's thread pool as configured
(``TVM_NUM_THREADS``; one thread on this 2-core machine by default). Writes
``benchmarks/results/tuning.json``.

Run: ``python benchmarks/tuning.py`` (``--cache-dir``, ``--trials``, ``--rounds``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch
import tvm

from lowbit.backends.tvm.kernels.generic import packed_gemm, packed_linear
from lowbit.backends.tvm.kernels.spec import LinearKernel, PackedLinearSpec
from lowbit.backends.tvm.kernels.x86 import a8_linear
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.tuning import LocalRunner, MeasureOptions, Tuner, TuningOptions, default_cache_dir
from lowbit.ir import packing

log = logging.getLogger("benchmarks.tuning")

RESULTS = Path(__file__).parent / "results" / "tuning.json"
#: Formats: weight bits, group size, asymmetric, int8 activations.
FORMATS: dict[str, tuple[int, int, bool, bool]] = {
    "w4a16": (4, 128, False, False),
    "w2a8": (2, 64, True, True),
}
#: (format, M, K, N): the demo's MiniLM layers at 256 rows and at one row, and a 4096² layer.
CASES = (
    ("w4a16", 256, 384, 384),
    ("w4a16", 256, 384, 1536),
    ("w4a16", 256, 1536, 384),
    ("w4a16", 1, 384, 1536),
    ("w4a16", 1, 1536, 384),
    ("w4a16", 1, 4096, 4096),
    ("w4a16", 32, 4096, 4096),
    ("w2a8", 256, 384, 1536),
    ("w2a8", 1, 4096, 4096),
    ("w2a8", 32, 4096, 4096),
)


def kernel_of(fmt: str, rows: int) -> LinearKernel:
    """The kernel the lowering uses for ``fmt`` on ``rows`` rows."""
    if fmt == "w2a8":
        return a8_linear.KERNEL
    return packed_gemm.KERNEL if rows >= packed_gemm.MIN_ROWS else packed_linear.KERNEL


def layer(fmt: str, m: int, k: int, n: int) -> tuple[PackedLinearSpec, dict[str, torch.Tensor | None]]:
    """A layer of ``fmt`` with bias and random packed weights (integer zero points when asymmetric)."""
    bits, group, asymmetric, a8 = FORMATS[fmt]
    gen = torch.Generator().manual_seed(0)
    spec = PackedLinearSpec(
        m, k, n, bits, group, asymmetric=asymmetric, has_bias=True, act_bits=8 if a8 else None, act_dynamic=True
    )
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (n, k // group), generator=gen).float() if asymmetric else None
    tensors = {
        "qweight": packing.pack(codes, bits),
        "scales": torch.rand(n, k // group, generator=gen) * 0.01,
        "zeros": zeros,
        "g_idx": None,
        "bias": torch.randn(n, generator=gen),
        "act_scale": None,
    }
    return spec, tensors


def compare(case: tuple[str, int, int, int], tuner: Tuner, runner: LocalRunner, rounds: int) -> dict[str, Any]:
    """Hand and tuned times of one case, built once and timed in turn ``rounds`` times."""
    fmt, m, k, n = case
    kernel = kernel_of(fmt, m)
    spec, tensors = layer(fmt, m, k, n)
    hand_knobs = kernel.default_knobs(spec, tuner.target)
    tuned_knobs = tuner.knobs(kernel, spec, tensors) or hand_knobs
    plans = [kernel.plan(spec, tensors, tuner.target, knobs=knobs) for knobs in (hand_knobs, tuned_knobs)]
    hand, tuned = runner.compare([(p.func, p.consts) for p in plans], rounds)
    row = {
        "format": fmt,
        "kernel": kernel.name,
        "M": m,
        "K": k,
        "N": n,
        "hand_knobs": hand_knobs,
        "tuned_knobs": tuned_knobs,
        "hand_ms": hand * 1e3,
        "tuned_ms": tuned * 1e3,
        "hand_over_tuned": hand / tuned,
    }
    log.info(
        "%s M=%d K=%d N=%d: hand %.3f ms %s, tuned %.3f ms %s",
        *case,
        row["hand_ms"],
        hand_knobs,
        row["tuned_ms"],
        tuned_knobs,
    )
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'format':>6} {'M':>4} {'K':>5} {'N':>5} {'hand ms':>9} {'tuned ms':>9} {'hand/tuned':>10}  "
        "knobs (hand -> tuned)"
    ]
    for r in rows:
        lines.append(
            f"{r['format']:>6} {r['M']:>4} {r['K']:>5} {r['N']:>5} {r['hand_ms']:>9.3f} "
            f"{r['tuned_ms']:>9.3f} {r['hand_over_tuned']:>9.2f}x  {r['hand_knobs']} -> {r['tuned_knobs']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--trials", type=int, default=20, help="trials per case when it has no finished record")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--cases",
        nargs="*",
        default=[f"{f}:{m}x{k}x{n}" for f, m, k, n in CASES],
        help="FORMAT:MxKxN, FORMAT one of " + ", ".join(FORMATS),
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    target = resolve_target("x86")
    tuner = Tuner(target, args.cache_dir, TuningOptions(trials=args.trials))
    runner = LocalRunner(target, MeasureOptions(repeat=5, min_repeat_ms=50))
    cases = [(case.split(":")[0], *(int(v) for v in case.split(":")[1].split("x"))) for case in args.cases]
    rows = [compare(case, tuner, runner, args.rounds) for case in cases]
    print(table(rows))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "target": str(target),
                "tvm_threads": tvm.runtime.num_threads(),
                "rounds": args.rounds,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    log.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()
