"""Name → pass class registry, so recipes and the CLI can refer to passes by name."""

from __future__ import annotations

import difflib
import importlib
from typing import Any, TypeVar

from lowbit.errors import UnknownPassError
from lowbit.passes.base import Pass

_REGISTRY: dict[str, type[Pass]] = {}

P = TypeVar("P", bound=type[Pass])


def register(cls: P) -> P:
    """Class decorator: register a pass under its ``name`` (snake_case, unique)."""
    name = cls.name
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"pass name {name!r} must be snake_case")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"pass name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def lookup(name: str) -> type[Pass]:
    """The pass class registered as ``name``; a clear error naming close matches when it is unknown."""
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise UnknownPassError(f"unknown pass '{name}'{hint}; available: {', '.join(available())}")


def get(name: str, **options: Any) -> Pass:
    """Instantiate the pass registered as ``name`` with validated ``options``."""
    return lookup(name)(**options)


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


FAMILIES: tuple[str, ...] = ("quant", "reparam", "adapters", "prune")


def _load_builtin() -> None:
    # Importing the families registers their passes.
    for family in FAMILIES:
        importlib.import_module(f"lowbit.passes.{family}")
