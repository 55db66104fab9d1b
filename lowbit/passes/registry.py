"""Name → pass class registry, so recipes, the CLI and Python code can refer to passes by name.

`parse_spec` reads the one text form of a configured pass, ``name:key=value,...``, for the
command line's ``--pass`` and for strings in ``Pipeline([...])`` / ``compile(passes=[...])``.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, TypeVar

import yaml

from lowbit.errors import PassConfigError, UnknownPassError
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


def parse_spec(spec: str) -> Pass:
    """The pass written as ``name`` or ``name:key=value,key=value``; values are YAML scalars or lists
    (``bits=4``, ``ignore=[lm_head, pooler]``), so commas inside ``[...]`` do not split options."""
    name, _, text = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, _split_options(text)):
        key, sep, value = item.partition("=")
        if not sep:
            raise PassConfigError(f"pass '{spec}': expected KEY=VALUE, got '{item}'")
        options[key.strip()] = yaml.safe_load(value)
    return get(name.strip(), **options)


def _split_options(text: str) -> list[str]:
    """Split on commas that are not inside [...] so list values survive."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


FAMILIES: tuple[str, ...] = ("quant", "reparam", "adapters", "prune")


def _load_builtin() -> None:
    # Importing the families registers their passes.
    for family in FAMILIES:
        importlib.import_module(f"lowbit.passes.{family}")
