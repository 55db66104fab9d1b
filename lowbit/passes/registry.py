"""Name → pass class registry, so recipes and the CLI can refer to passes by name."""

from __future__ import annotations

import difflib
import importlib
from typing import Any, TypeVar

from lowbit.errors import UnknownPassError
from lowbit.passes.base import Pass

_REGISTRY: dict[str, type[Pass]] = {}

# Passes that recipes may already name but that this version does not implement yet.
# Naming one fails loudly instead of silently skipping it.
PLANNED: frozenset[str] = frozenset()

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
    """The pass class registered as ``name``; a clear error when it is unknown or not implemented."""
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in PLANNED:
        raise UnknownPassError(f"pass '{name}' is not implemented in this version of lowbit; available: {', '.join(available())}")
    close = difflib.get_close_matches(name, list(_REGISTRY) + sorted(PLANNED), n=3)
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
