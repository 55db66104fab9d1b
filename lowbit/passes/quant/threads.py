"""Run torch single-threaded for the per-layer work of calibrated quantizers.

GPTQ's column loop and AWQ's grid searches are long chains of vector-sized operations
and mid-sized products. On a machine shared with other jobs, every multi-threaded
torch operation waits for its slowest thread, and a descheduled thread stalls it:
measured here with one other job running, two threads made the Cholesky factorizations
3–10× and AWQ's scale search about 3.5× slower than one thread. The calibration
forwards (large matrix products) keep torch's threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block, restoring the thread count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


__all__ = ["single_thread"]
