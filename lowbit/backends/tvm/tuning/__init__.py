"""Auto-tuning of lowbit's low-bit TVM kernels with a persistent database.

    from lowbit.backends.tvm import TVMBackend
    runner = TVMBackend("x86").compile(gm, inputs, tune={"trials": 16, "max_seconds": 300})
    runner.tuning                      # TuningResult per kernel signature: knobs, time, hand time

Each kernel (`lowbit.backends.tvm.kernels.spec.LinearKernel`) exposes a knob space
(``knobs``), its hand schedule (``default_knobs``) and ``plan(..., knobs=)``. `Tuner` searches that space (`search`),
timing candidates locally or on a device over TVM RPC (`measure`), and keeps every
trial in a `TuningDatabase` (`database`) under the cache directory: a later compile of
the same shapes for the same target reads the best knobs and measures nothing. The
databases shipped in ``lowbit/backends/tvm/tuned/`` are a read-only layer under the
user's. The cache directory is ``cache_dir=``, else ``$LOWBIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/lowbit/tvm`` (``~/.cache/lowbit/tvm``).
"""

from __future__ import annotations

import os
from pathlib import Path

from lowbit.backends.tvm.tuning.database import SHIPPED_DIR, CorruptDatabase, Trial, TuningDatabase, TuningRecord
from lowbit.backends.tvm.tuning.measure import LocalRunner, MeasureOptions, RPCDevice, RPCRunner
from lowbit.backends.tvm.tuning.tuner import Tuner, TuningOptions, TuningResult

#: Environment variable naming the cache directory.
CACHE_ENV = "LOWBIT_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$LOWBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowbit/tvm``, else ``~/.cache/lowbit/tvm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowbit" / "tvm"


__all__ = [
    "CACHE_ENV",
    "SHIPPED_DIR",
    "CorruptDatabase",
    "LocalRunner",
    "MeasureOptions",
    "RPCDevice",
    "RPCRunner",
    "Trial",
    "Tuner",
    "TuningDatabase",
    "TuningOptions",
    "TuningRecord",
    "TuningResult",
    "default_cache_dir",
]
