"""Layer selection by name: exact names and glob (or ``re:``) patterns.

Used for a pass's ``targets``/``ignore`` lists and for per-layer overrides, where an
exact name beats any pattern and, among patterns, the first match wins.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SKIP = "skip"


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
        return cls(tuple((mapping or {}).items()))

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
        """Override keys that select none of ``layers`` (reported so typos do not go unnoticed)."""
        return [key for key, _ in self.rules if not any(matches(layer, key) for layer in layers)]
