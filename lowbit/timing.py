"""Wall-clock timing of several engines on one machine, in interleaved rounds.

The demo and the benchmarks compare engines that run one after the other in one process. Timing them in
rounds (every engine once per round) spreads the machine's load drifts over all of them alike; an idle before
each engine's turn lets the previous engine's worker threads, which spin a while after a call (ONNX Runtime's
intra-op pool, OpenMP), go to sleep instead of taking a core from the engine being timed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

#: Idle time before each engine's turn in a round, for the previous engine's spinning threads to sleep (ONNX Runtime's
#: intra-op workers spin past 20 ms: with 20 ms, the engine after them lost a core on two threads).
SETTLE_S = 0.2

Key = TypeVar("Key", bound=Hashable)


def interleaved(
    engines: Mapping[Key, Callable[[], Any]], repeats: int, settle_s: float = SETTLE_S
) -> dict[Key, list[float]]:
    """Milliseconds of each engine's calls over ``repeats`` rounds.

    Every engine is called twice first (first-call allocations, lazy initialization). Each round then runs the
    engines in turn: ``settle_s`` idle, one untimed call (caches and thread pool warm for this engine), one timed
    call. Callers run it under ``torch.no_grad()`` where the engines are torch modules.
    """
    for fn in engines.values():
        fn()
        fn()
    times: dict[Key, list[float]] = {key: [] for key in engines}
    for _ in range(max(repeats, 1)):
        for key, fn in engines.items():
            time.sleep(settle_s)
            fn()
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1e3)
    return times


def spread(values: list[float]) -> dict[str, float]:
    """Minimum, median and maximum of ``values``."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
