"""Layer selection by name: exact names and glob (or ``re:``) patterns.

Used for a pass's ``targets``/``ignore`` lists and for per-layer overrides, where an
exact name beats any pattern and, among patterns, the first match wins. Overrides may also
name layers by position or kind: ``@first``/``@last`` is the first/last layer the pass matches
in graph order, ``@first:conv``/``@last:linear`` the first/last of one kind (how a recipe keeps a
CNN's stem convolution and its classifier at a higher precision without knowing their names),
and ``@conv``/``@linear`` every layer of that kind (``{"@conv": "skip"}`` keeps convolutions float).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lowbit.errors import PassConfigError

SKIP = "skip"
#: Layer kinds a positional key may name (``@first:conv``).
KINDS: tuple[str, ...] = ("conv", "linear")


def positional(key: str) -> tuple[str, str | None] | None:
    """``("first" | "last" | "all", kind or None)`` for a positional or kind key, None for a name or pattern.

    Raises `PassConfigError` for a key that starts with ``@`` but names no position or kind.
    """
    if not key.startswith("@"):
        return None
    if key[1:] in KINDS:
        return "all", key[1:]
    where, _, kind = key[1:].partition(":")
    if where not in ("first", "last") or (kind and kind not in KINDS):
        raise PassConfigError(
            f"override key {key!r}: positions are @first and @last, optionally with a kind ({', '.join(KINDS)}), "
            f"e.g. @first:conv; every layer of a kind is {' or '.join('@' + kind for kind in KINDS)}"
        )
    return where, kind or None


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    return any(matches(name, p) for p in patterns)


def is_pattern(text: str) -> bool:
    return text.startswith("re:") or any(c in text for c in "*?[")


@dataclass(frozen=True)
class LayerOverrides:
    """Per-layer option overrides; a value of ``"skip"`` excludes the layer."""

    rules: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> LayerOverrides:
        rules = tuple((str(key), value) for key, value in (mapping or {}).items())
        for key, _ in rules:
            positional(key)
        return cls(rules)

    def bind(self, layers: Sequence[tuple[str, str]]) -> LayerOverrides:
        """The overrides with each positional key replaced by the names of the layers it selects among ``layers``
        (``(name, kind)`` in graph order); a key that selects nothing is dropped."""
        rules = []
        for key, value in self.rules:
            position = positional(key)
            if position is None:
                rules.append((key, value))
                continue
            where, kind = position
            names = [name for name, layer_kind in layers if kind is None or layer_kind == kind]
            if where != "all":
                names = names[:1] if where == "first" else names[-1:]
            rules.extend((name, value) for name in names)
        return LayerOverrides(tuple(rules))

    def lookup(self, layer: str) -> Any | None:
        """The override for ``layer``: its exact entry if any, else the first matching pattern's."""
        for key, value in self.rules:
            if key == layer:
                return value
        for key, value in self.rules:
            if is_pattern(key) and matches(layer, key):
                return value
        return None

    def unused(self, layers: list[str]) -> list[str]:
        """Override keys that select none of ``layers`` (reported so typos do not go unnoticed); positional keys
        are generic rules (a recipe's), never reported."""
        return [
            key for key, _ in self.rules if positional(key) is None and not any(matches(layer, key) for layer in layers)
        ]
