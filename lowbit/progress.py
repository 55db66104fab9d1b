"""Progress bars on stderr for counted work: the pass list, a pass's layers or batches, the low-bit layers a
TVM target lowers, tuning trials.

Only the command line turns them on (`enable`), and a bar is drawn only while stderr is a terminal: elsewhere (a
file, a pipe, CI logs) it draws nothing and the ``lowbit`` logger's INFO lines stay the record. Log lines written
while a bar is shown are printed above it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


@dataclass
class _Bars:
    """Whether bars are wanted, and how many are open (log lines are redirected above the outermost)."""

    enabled: bool = False
    open: int = 0


_BARS = _Bars()


def enable(on: bool = True) -> None:
    """Draw bars from now on (where stderr is a terminal); the command line calls it unless ``--quiet``."""
    _BARS.enabled = on


def drawing() -> bool:
    """True when a bar opened now is drawn."""
    return _BARS.enabled and sys.stderr.isatty()


@contextlib.contextmanager
def bar(total: int, desc: str, initial: int = 0) -> Iterator[tqdm]:
    """A bar of ``total`` steps, advanced with ``update(n)``; an inert one unless `drawing`."""
    shown = drawing()
    progress = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, disable=not shown, leave=False)
    redirect = logging_redirect_tqdm([logging.getLogger("lowbit")]) if shown and not _BARS.open else None
    _BARS.open += shown
    try:
        with redirect or contextlib.nullcontext():
            yield progress
    finally:
        _BARS.open -= shown
        progress.close()


__all__ = ["bar", "drawing", "enable"]
