"""The line protocol between `benchmarks/llm_cpu.py` and its engine workers (standard library only).

Each engine, format and thread count runs in its own fresh process (a worker), so that its
peak resident memory is its own and engines in different virtual environments (llama.cpp)
speak the same protocol. A worker reads JSON lines on stdin and answers one JSON line each:

    setup {"prompts": {"128": ids, ...}, "decode_prompt": ids, "new_tokens": 128, "windows": [ids, ...], ...}
          → {"info": {...}, "load_peak_rss_bytes": n}   (after loading and one unmeasured warm-up round)
    "round" → {"prefill_s": {"128": s, ...}, "decode_s": s}
    "finish" → {"peak_rss_bytes": n, "perplexity": p}   (peak read before perplexity, which then runs)

``peak_rss_bytes`` is the resident-set high-water mark from the end of loading (Linux resets
it through /proc/self/clear_refs) through the warm-up and every round: what generation
holds, including the model's touched pages, without a loader's temporary buffers, which
``load_peak_rss_bytes`` counts.

The driver sends ``round`` to every worker in turn, so the engines are measured in the
same rounds, one at a time, while the others wait on stdin. Prefill is the time from the
prompt to the first new token (greedy); decode is the time of the following
``new_tokens - 1`` tokens, each from one single-token forward against the KV cache.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any, Protocol


class Runner(Protocol):
    """One engine's model, loaded in a worker; ``None`` where the engine cannot do something."""

    info: dict[str, Any]

    def prefill(self, ids: list[int]) -> float | None:
        """Seconds from the prompt ``ids`` (empty cache) to its first greedy token."""

    def decode(self, ids: list[int], new_tokens: int) -> float | None:
        """Seconds of new tokens 2..``new_tokens`` after the prompt ``ids`` (greedy)."""

    def perplexity(self, windows: list[list[int]]) -> float | None:
        """exp(mean next-token NLL) over ``windows``, each from an empty cache."""


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (``VmHWM``; ``ru_maxrss`` where /proc is absent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def measure_round(runner: Runner, setup: dict[str, Any]) -> dict[str, Any]:
    return {
        "prefill_s": {length: runner.prefill(ids) for length, ids in setup["prompts"].items()},
        "decode_s": runner.decode(setup["decode_prompt"], setup["new_tokens"]),
    }


def serve(make_runner: Any) -> None:
    """Answer the driver: ``make_runner(setup)`` builds the `Runner` from the setup message.

    The protocol's stdout is a duplicate of file descriptor 1, which is then pointed at
    stderr, so that engines that print do not corrupt it.
    """
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def answer(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    setup = json.loads(sys.stdin.readline())
    runner = make_runner(setup)
    load_peak = peak_rss_bytes()
    reset = reset_peak_rss()
    measure_round(runner, setup)  # warm-up
    answer({"info": {**runner.info, "peak_reset_after_load": reset}, "load_peak_rss_bytes": load_peak})
    for line in sys.stdin:
        request = json.loads(line)
        if request == "round":
            answer(measure_round(runner, setup))
        elif request == "finish":
            peak = peak_rss_bytes()
            answer({"peak_rss_bytes": peak, "perplexity": runner.perplexity(setup["windows"])})
            return
        else:
            raise SystemExit(f"unknown request {request!r}")
