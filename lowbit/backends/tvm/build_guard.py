"""A time limit on compiling a scheduled module, so that a build that does not finish is a named error.

A schedule LLVM cannot digest (a huge unrolled or vectorized loop) once made a model's build run for tens of
minutes without a word. `bounded_build` runs the build on a worker thread and waits at most the limit
(``LOWBIT_BUILD_TIMEOUT_S``, default `DEFAULT_TIMEOUT_S`); past it, a separate process compiles the module's
TIR functions one at a time, each under the same limit, to name the one that does not finish, and
`BuildTimeoutError` says which. A build within the limit costs one thread start.
"""

from __future__ import annotations

import json
import logging
import os
import queue as queues
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import tvm
from tvm.target import Target

from lowbit.errors import BuildTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a build may take unless ``LOWBIT_BUILD_TIMEOUT_S`` says otherwise.
DEFAULT_TIMEOUT_S = 600.0
#: Seconds the process that names the slow function may take to start (it imports TVM) or between functions.
START_TIMEOUT_S = 300.0
#: The child process of `slow_function` (TVM only, so that it starts in a second): prints "ready", then for
#: each function its name, compiles it and prints the seconds it took; an empty line ends.
COMPILE_EACH = """
import json, sys, time
import tvm
spec = json.loads(open(sys.argv[1]).read())
functions, target = tvm.ir.load_json(spec["functions"]), tvm.ir.load_json(spec["target"])
print("ready", flush=True)
for gvar, func in functions.functions_items():
    print(gvar.name_hint, flush=True)
    start = time.perf_counter()
    tvm.compile(func.with_attr("global_symbol", gvar.name_hint), target=target)
    print(time.perf_counter() - start, flush=True)
print("", flush=True)
"""


def build_timeout() -> float:
    """The build time limit in seconds: ``LOWBIT_BUILD_TIMEOUT_S`` if set, else `DEFAULT_TIMEOUT_S`."""
    return float(os.environ.get("LOWBIT_BUILD_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def bounded_build(build: Callable[[], T], mod: tvm.IRModule, target: Target, limit: float | None = None) -> T:
    """``build()`` (the compilation of ``mod`` for ``target``), or `BuildTimeoutError` after ``limit`` seconds.

    ``build`` runs on a daemon thread, so it sets up its own thread-local contexts (target, ``torch.no_grad``).
    A build past the limit keeps running in the background (native code cannot be interrupted) while the error
    is raised.
    """
    limit = build_timeout() if limit is None else limit
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = build()
        except BaseException as error:  # re-raised on the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, name="lowbit-build", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        raise BuildTimeoutError(_timeout_message(mod, target, limit))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _timeout_message(mod: tvm.IRModule, target: Target, limit: float) -> str:
    stuck, times = slow_function(mod, target, limit)
    head = f"compiling the module did not finish within {limit:g} s"
    if stuck is not None:
        return (
            f"{head}: the TIR function '{stuck}' (named after the operators fused in it) does not compile within "
            f"{limit:g} s on its own; its schedule needs fixing (or raise LOWBIT_BUILD_TIMEOUT_S to wait longer)"
        )
    slowest = ", ".join(f"'{name}' {seconds:.1f} s" for name, seconds in sorted(times.items(), key=lambda t: -t[1])[:3])
    return f"{head}; no single TIR function exceeds it (slowest: {slowest}); raise LOWBIT_BUILD_TIMEOUT_S"


def slow_function(mod: tvm.IRModule, target: Target, limit: float) -> tuple[str | None, dict[str, float]]:
    """Compile each TIR function of ``mod`` alone in a fresh Python process: the first one that takes longer
    than ``limit`` seconds (None if none does), and the seconds each one finished in."""
    functions = tvm.IRModule(
        {gvar: func for gvar, func in mod.functions_items() if isinstance(func, tvm.tirx.PrimFunc)}
    )
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as directory:
        job = Path(directory) / "functions.json"
        job.write_text(json.dumps({"functions": tvm.ir.save_json(functions), "target": tvm.ir.save_json(target)}))
        child = subprocess.Popen(
            [sys.executable, "-c", COMPILE_EACH, str(job)], stdout=subprocess.PIPE, text=True, env=_child_env()
        )
        lines: queues.Queue[str] = queues.Queue()
        threading.Thread(target=_read_lines, args=(child.stdout, lines), daemon=True).start()
        try:
            lines.get(timeout=START_TIMEOUT_S)  # the child has imported TVM and read the module
            while name := lines.get(timeout=START_TIMEOUT_S):
                try:
                    seconds = lines.get(timeout=limit)
                except queues.Empty:  # still compiling
                    return name, times
                if not seconds:  # the child failed
                    break
                times[name] = float(seconds)
        except queues.Empty:
            log.warning("the process that times each TIR function did not answer")
        finally:
            child.kill()
            child.wait()
    return None, times


def _read_lines(stream: Any, lines: queues.Queue[str]) -> None:
    """Put each line of ``stream`` (stripped) on ``lines``, then an empty one at its end."""
    for line in stream:
        lines.put(line.strip())
    lines.put("")


def _child_env() -> dict[str, str]:
    """This process's environment, with its import path, so that the child imports the same TVM."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


__all__ = ["DEFAULT_TIMEOUT_S", "bounded_build", "build_timeout", "slow_function"]
