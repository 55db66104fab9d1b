"""Run aarch64 TVM modules on this x86 machine under qemu-user, for tests and checks of ARM artifacts.

    result = qemu.run_artifact("model-arm/", cpu="cortex-a76")   # outputs, latency (meaningless)
    with qemu.emulated_server(cpu="max") as server:              # an RPC server on an emulated CPU
        session = rpc.connect(str(server.address))
    with qemu.emulated_server() as server:                       # tune ARM kernels on an emulated Cortex-A76
        device = RPCDevice(server.address.host, server.address.port)
        lowbit.compile(model, inputs, recipe="w4a16-arm", tune={"trials": 8, "rpc": device})

The emulated device is an aarch64 Python 3.11 with the aarch64 wheels of TVM and numpy,
unpacked by ``scripts/setup_arm.sh`` into a private root (``$LOWBIT_ARM_ROOT``, default
``.cache/arm-root`` of the checkout). qemu runs it with ``-L ROOT`` so its dynamic
loader and libraries come from the root, and TVM in runtime-only mode
(``TVM_USE_RUNTIME_LIB=1``). A small wrapper script per emulated CPU makes that Python
one executable, which TVM's RPC server needs for re-launching itself. Pick ``-cpu``
deliberately: ``cortex-a76`` has the dot-product extension, ``max`` adds i8mm (and
SVE, which a real Cortex-A76 or Neoverse-N1 would fault on). Emulated timings say
nothing about a real device: tuning against an emulated one checks the path (cross-compiled
candidates uploaded, run and checked on the device, records keyed by the ARM target), not
which schedule a real CPU prefers.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.backends.tvm import ARM_CXX, rpc
from lowbit.errors import BackendError

log = logging.getLogger(__name__)

QEMU = "qemu-aarch64"
QEMU_PACKAGE = "qemu-user"
SETUP_COMMAND = "bash scripts/setup_arm.sh"
#: A CPU with NEON and the dot-product extension (sdot), like the ``arm`` target.
DEFAULT_CPU = "cortex-a76"
#: Emulated Python is slow to start (TVM's import alone takes seconds).
START_TIMEOUT = 180.0
#: Written by ``scripts/setup_arm.sh`` once the root is complete.
STAMP = ".lowbit-arm-root"
PYTHON = "usr/bin/python3.11"


class EmulatorUnavailable(BackendError):
    """qemu-user or the emulated aarch64 runtime root is missing (the message says how to install it)."""


@dataclass(frozen=True)
class ArmRoot:
    """A prepared aarch64 root: unpacked Debian packages plus ``site/`` with TVM and numpy."""

    path: Path

    @property
    def python(self) -> Path:
        return self.path / PYTHON

    @property
    def site(self) -> Path:
        return self.path / "site"


def default_root() -> Path:
    """``$LOWBIT_ARM_ROOT``, else ``.cache/arm-root`` in the checkout lowbit is imported from."""
    configured = os.environ.get("LOWBIT_ARM_ROOT")
    if configured:
        return Path(configured).resolve()
    return Path(__file__).resolve().parents[3] / ".cache" / "arm-root"


def find_root(root: str | Path | None = None) -> ArmRoot:
    """The prepared root at ``root`` (default `default_root`), or `EmulatorUnavailable` naming the setup command."""
    found = ArmRoot(Path(root).resolve() if root is not None else default_root())
    if not (found.path / STAMP).is_file() or not found.python.is_file() or not (found.site / "tvm").is_dir():
        raise EmulatorUnavailable(
            f"no emulated aarch64 runtime at {found.path}: run `{SETUP_COMMAND}` "
            "(or point LOWBIT_ARM_ROOT at a root it prepared)"
        )
    return found


def qemu_binary() -> str:
    """The path of ``qemu-aarch64``, or `EmulatorUnavailable` naming the Debian package."""
    found = shutil.which(QEMU)
    if found is None:
        raise EmulatorUnavailable(f"running aarch64 code here needs {QEMU}: install the Debian package {QEMU_PACKAGE}")
    return found


def python_wrapper(cpu: str = DEFAULT_CPU, root: str | Path | None = None) -> Path:
    """An executable script that runs the root's aarch64 Python on an emulated ``cpu`` with TVM on its path."""
    arm = find_root(root)
    if not cpu.replace("-", "").replace("_", "").isalnum():
        raise BackendError(f"'{cpu}' is not a qemu CPU name (e.g. {DEFAULT_CPU}, neoverse-n1, max)")
    script = (
        "#!/bin/sh\n"
        f"# aarch64 Python on an emulated {cpu}; written by lowbit.backends.tvm.qemu\n"
        "unset LD_LIBRARY_PATH LD_PRELOAD PYTHONHOME\n"
        f"export PYTHONPATH='{arm.site}' PYTHONNOUSERSITE=1 TVM_USE_RUNTIME_LIB=1\n"
        f"exec '{qemu_binary()}' -cpu {cpu} -L '{arm.path}' '{arm.python}' \"$@\"\n"
    )
    wrapper = arm.path / ".lowbit" / f"python-{cpu}"
    if not wrapper.is_file() or wrapper.read_text() != script:
        wrapper.parent.mkdir(exist_ok=True)
        staging = wrapper.with_suffix(f".{os.getpid()}")
        staging.write_text(script)
        staging.chmod(0o755)
        staging.replace(wrapper)
    return wrapper


def unavailable_reason(cpu: str = DEFAULT_CPU) -> str | None:
    """Why ARM code cannot be cross-compiled and run on an emulated ``cpu`` here (what to
    install), or None when it can."""
    if shutil.which(ARM_CXX) is None:
        return f"needs the cross compiler {ARM_CXX} (scripts/setup.sh installs it)"
    try:
        python_wrapper(cpu)
    except EmulatorUnavailable as error:
        return str(error)
    return None


def emulated_server(
    cpu: str = DEFAULT_CPU,
    tracker: rpc.Address | str | None = None,
    key: str = "",
    load_library: str | None = None,
    timeout: float = START_TIMEOUT,
    root: str | Path | None = None,
) -> rpc.Server:
    """A TVM RPC server in the emulated Python on ``cpu`` (stop it, or use it as a context manager)."""
    return rpc.Server(
        tracker=tracker, key=key, python=str(python_wrapper(cpu, root)), load_library=load_library, timeout=timeout
    )


def run_artifact(
    path: str | Path,
    inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray] | None = None,
    *,
    cpu: str = DEFAULT_CPU,
    repeats: int = 1,
    timeout: float = START_TIMEOUT,
    root: str | Path | None = None,
) -> rpc.RunResult:
    """Run an exported aarch64 artifact on an emulated ``cpu`` (through an RPC server under qemu)."""
    with emulated_server(cpu, timeout=timeout, root=root) as server:
        return rpc.run_artifact(path, inputs, rpc=str(server.address), timeout=timeout, repeats=repeats)


__all__ = [
    "ArmRoot",
    "DEFAULT_CPU",
    "EmulatorUnavailable",
    "QEMU",
    "QEMU_PACKAGE",
    "SETUP_COMMAND",
    "default_root",
    "emulated_server",
    "find_root",
    "python_wrapper",
    "qemu_binary",
    "run_artifact",
]
