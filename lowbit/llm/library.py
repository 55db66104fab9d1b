"""The compiled decoder's shared library: where it runs (this CPU, or a remote one over RPC), and its files.

A library for this machine's architecture runs in-process; one for another architecture (``arm`` built on x86)
is exported and runs on a device through an RPC session (`remote`), e.g. an emulated Cortex-A76. ``library.json``
records the architecture, the CPU features and how each linear was lowered.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tvm

from lowbit.backends.tvm.convert import LoweredLinear, fallbacks
from lowbit.backends.tvm.quiet import quiet_tvm
from lowbit.backends.tvm.runner import LIBRARY_FILE, signature_linears
from lowbit.backends.tvm.target import host_arch
from lowbit.backends.tvm.toolchains.cpu import check_loadable, library_compiler
from lowbit.llm.runtime import DecoderLayout, TVMDecoder

LIBRARY_INFO = "library.json"


class DecoderLibrary:
    """A decoder's VM executable (or loaded module) for ``arch`` with the CPU ``features`` it needs."""

    def __init__(
        self, executable: Any, arch: str, features: Sequence[str], linears: Sequence[LoweredLinear] = ()
    ) -> None:
        self.executable = executable
        self.arch = arch
        self.features = list(features)
        self.linears = list(linears)

    @property
    def runnable(self) -> bool:
        return self.arch == host_arch()

    @property
    def fallbacks(self) -> list[LoweredLinear]:
        return fallbacks(self.linears)

    def decoder(self, layout: DecoderLayout, device: Any = None) -> TVMDecoder | None:
        """The decoder on ``device`` (default: this CPU; None when the library is for another architecture)."""
        if device is None:
            return TVMDecoder(self.executable, tvm.cpu(), layout) if self.runnable else None
        return TVMDecoder(self.executable, device, layout)

    def save(self, directory: Path) -> list[str]:
        with quiet_tvm():
            self.executable.export_library(
                str(directory / LIBRARY_FILE), fcompile=library_compiler(self.arch, "exporting a library")
            )
        info = {
            "arch": self.arch,
            "features": self.features,
            "linears": [dataclasses.asdict(linear) for linear in self.linears],
        }
        (directory / LIBRARY_INFO).write_text(json.dumps(info, indent=2) + "\n")
        return [LIBRARY_FILE, LIBRARY_INFO]

    @classmethod
    def load(cls, directory: Path) -> DecoderLibrary:
        """The library of an artifact; loaded into this process when it is for this machine (checked)."""
        info = json.loads((directory / LIBRARY_INFO).read_text())
        linears = signature_linears(info)
        if info["arch"] != host_arch():
            return cls(None, info["arch"], info["features"], linears)
        check_loadable(directory, info["arch"], info["features"])
        with quiet_tvm():
            module = tvm.runtime.load_module(str(directory / LIBRARY_FILE))
        return cls(module, info["arch"], info["features"], linears)

    @classmethod
    def remote(cls, directory: Path, session: Any) -> tuple[DecoderLibrary, Any]:
        """The library of an artifact uploaded to and loaded on an RPC session's device, and that device."""
        info = json.loads((directory / LIBRARY_INFO).read_text())
        session.upload(str(directory / LIBRARY_FILE))
        module = session.load_module(LIBRARY_FILE)
        return cls(module, info["arch"], info["features"], signature_linears(info)), session.cpu()


__all__ = ["LIBRARY_INFO", "DecoderLibrary"]
