"""Backends: ``torch`` runs the graph as the reference; ``x86``/``arm``/``cuda`` (and TVM target dicts) go through TVM.

Every backend satisfies `Backend` and compiles a graph into a `Runner`: the callable the compiled model runs, with
whether it can run on this machine, the low-bit layers on a fallback, and the kernel tuning it used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lowbit.errors import BackendError

if TYPE_CHECKING:
    from torch import fx

    from lowbit.interface import Interface

TARGETS: tuple[str, ...] = ("torch", "x86", "arm", "cuda")


@runtime_checkable
class Runner(Protocol):
    """A compiled model: called with the graph's inputs, returns its outputs (torch tensors)."""

    #: Whether this machine can run it (False for a module cross-compiled for another device).
    runnable: bool
    #: Low-bit layers that run on a fallback, each with ``node`` and ``reason``.
    fallbacks: Sequence[Any]
    #: The kernel knobs chosen per kernel signature (TVM's `TuningResult`); empty where nothing is tuned.
    tuning: Sequence[Any]
    #: What `lowbit.compile` recorded about the inputs and outputs; a runner that saves itself saves it too.
    interface: Interface

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


class Backend(Protocol):
    """Compiles a lowbit GraphModule for one target, and saves and loads what it compiled."""

    name: str

    def compile(
        self,
        gm: fx.GraphModule,
        example_inputs: tuple,
        *,
        cache_dir: Any = None,
        tune: Any = None,
        strict: bool = False,
    ) -> Runner:
        """A runner for ``gm``; ``strict``: raise `lowbit.errors.UnsupportedLayerError` before building where a
        low-bit layer would run on a fallback instead of its kernel."""
        ...

    def save(self, runner: Runner, directory: Path) -> list[str]: ...

    def load(self, directory: Path) -> Runner: ...


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


def get_backend(target: str | Mapping[str, Any]) -> Backend:
    """The backend object that compiles for ``target``."""
    target = check_target(target)
    if target == "torch":
        from lowbit.backends.torch import TorchBackend

        return TorchBackend()
    from lowbit.backends.tvm import TVMBackend

    return TVMBackend(target)


__all__ = ["TARGETS", "Backend", "Runner", "check_target", "get_backend"]
