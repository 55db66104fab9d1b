"""Which knobs to try next: the hand schedule, then neighbours of the best, then the rest in a seeded order.

`propose` is a pure function of the knob space, the hand-picked knobs, the trials already
recorded and a seed, so a restarted tuning proposes exactly the candidates an
uninterrupted one would have, skipping those the database already holds. The hand
schedule is always tried first, so a tuned kernel is never slower than it (up to noise).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Mapping, Sequence

from lowbit.backends.tvm.tuning.database import Trial


def space_version(space: Mapping[str, Sequence[int]]) -> str:
    """A short hash of a knob space: records of an older space are not reused after it changes."""
    text = json.dumps({k: list(v) for k, v in space.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def grid(space: Mapping[str, Sequence[int]]) -> list[dict[str, int]]:
    """Every combination of knob values, knobs in sorted order."""
    names = sorted(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[name] for name in names))]


def propose(
    space: Mapping[str, Sequence[int]], default: Mapping[str, int], trials: Sequence[Trial], seed: str
) -> dict[str, int] | None:
    """The next knobs to try, or None once every candidate (the hand schedule included) was tried.

    Order: ``default``; then the untried neighbours of the fastest trial (one knob moved to
    an adjacent value); then the remaining grid in a random order fixed by ``seed``.
    """
    tried = [dict(t.knobs) for t in trials]
    if dict(default) not in tried:
        return dict(default)
    timed = [t for t in trials if t.seconds is not None]
    if timed:
        best = min(timed, key=lambda t: t.seconds).knobs
        for candidate in _neighbours(space, best):
            if candidate not in tried:
                return candidate
    order = grid(space)
    random.Random(seed).shuffle(order)
    return next((candidate for candidate in order if candidate not in tried), None)


def _neighbours(space: Mapping[str, Sequence[int]], knobs: Mapping[str, int]) -> list[dict[str, int]]:
    """Knobs that differ from ``knobs`` in one knob, moved one step in its value list."""
    result = []
    for name in sorted(space):
        values = list(space[name])
        if knobs.get(name) not in values:
            continue
        index = values.index(knobs[name])
        for step in (-1, 1):
            if 0 <= index + step < len(values):
                result.append({**knobs, name: values[index + step]})
    return result


__all__ = ["grid", "propose", "space_version"]
