"""Backends: ``torch`` runs the graph as the reference; ``x86``/``arm``/``cuda`` (and TVM target dicts) go through TVM."""

from __future__ import annotations

from typing import Any, Mapping

from lowbit.errors import BackendError

TARGETS: tuple[str, ...] = ("torch", "x86", "arm", "cuda")


def check_target(target: str | Mapping[str, Any]) -> str | dict[str, Any]:
    """Validate a target: one of `TARGETS`, or a TVM target dict (it must have a ``kind``)."""
    if isinstance(target, str):
        if target not in TARGETS:
            raise BackendError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)} or a TVM target dict")
        return target
    if isinstance(target, Mapping):
        if "kind" not in target:
            raise BackendError("a target dict needs a 'kind' key (e.g. {'kind': 'llvm', 'mcpu': 'znver3'})")
        return dict(target)
    raise BackendError(f"a target is a name or a dict, not {type(target).__name__}")


def get_backend(target: str | Mapping[str, Any]) -> Any:
    """The backend object that compiles for ``target``."""
    target = check_target(target)
    if target == "torch":
        from lowbit.backends.torch import TorchBackend

        return TorchBackend()
    from lowbit.backends.tvm import TVMBackend

    return TVMBackend(target)
