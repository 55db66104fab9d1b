"""TVM's C++ warnings that a user cannot act on, kept off the terminal.

TVM's compiler and runtime write ``LOG(WARNING)`` lines straight to the process's standard error, with no
level to set: the ``take`` legalization's "Fast mode segfaults when there are out-of-bounds indices" (an
embedding lookup's indices are the model's own, and lowbit's own gathers clip) and the VM's "Scope Saving:" /
"Scope Loaded:" lines on every export and load. `quiet_tvm` captures file descriptor 2 around a TVM call and
writes back every line but those.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

#: Text of the TVM warnings `quiet_tvm` drops (a line holding one of them is not written back).
SILENCED: tuple[str, ...] = (
    "Fast mode segfaults when there are out-of-bounds indices",
    "Warning: Scope Saving:",
    "Warning: Scope Loaded:",
)


@contextlib.contextmanager
def quiet_tvm() -> Iterator[None]:
    """Run the block with standard error captured; then write back every line but the `SILENCED` ones."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().splitlines(keepends=True)
                if not any(text.encode() in line for text in SILENCED)
            ]
            if kept:
                os.write(2, b"".join(kept))


__all__ = ["SILENCED", "quiet_tvm"]
