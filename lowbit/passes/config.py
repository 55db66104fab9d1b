"""Frozen, validated pass configurations.

A pass config is a frozen dataclass whose fields are declared with `option`, which
carries the constraints (choices, range). Construction from user options rejects
unknown keys, wrong types and out-of-range values with an error naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lowbit.errors import PassConfigError


def option(
    default: Any,
    *,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    help: str = "",
) -> Any:
    """Declare a config field with its default and constraints."""
    metadata = {"choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive, "help": help}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in a pass config; use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config. Subclasses must be declared ``@dataclass(frozen=True)``."""

    @classmethod
    def from_options(cls, pass_name: str, options: Mapping[str, Any]) -> PassConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = (
                    f" (did you mean '{close[0]}'?)"
                    if close
                    else f"; known options: {', '.join(sorted(known)) or 'none'}"
                )
                raise PassConfigError(f"{pass_name}: unknown option '{key}'{hint}")
        hints = typing.get_type_hints(cls)
        values = {key: _coerce(pass_name, key, hints[key], value) for key, value in options.items()}
        config = cls(**values)
        config.check(pass_name)
        return config

    def check(self, pass_name: str) -> None:
        """Validate every field against its declared constraints; subclasses add cross-field rules."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            choices = meta.get("choices")
            if choices is not None and value not in choices:
                raise PassConfigError(
                    f"{pass_name}: {f.name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}"
                )
            low, high = meta.get("min"), meta.get("max")
            if low is not None and value is not None and (value < low or (meta.get("min_exclusive") and value == low)):
                op = ">" if meta.get("min_exclusive") else ">="
                raise PassConfigError(f"{pass_name}: {f.name}={value!r} is out of range; it must be {op} {low}")
            if high is not None and value is not None and value > high:
                raise PassConfigError(f"{pass_name}: {f.name}={value!r} is out of range; it must be <= {high}")

    def replace(self, pass_name: str, options: Mapping[str, Any]) -> PassConfig:
        """A copy with ``options`` applied, validated like a fresh config."""
        merged = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        merged.update(options)
        return type(self).from_options(pass_name, merged)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _coerce(pass_name: str, key: str, annotation: Any, value: Any) -> Any:
    """Check ``value`` against the field annotation; YAML lists become tuples."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(pass_name, key, arm, value)
            except PassConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise PassConfigError(
                f"{pass_name}: {key}={value!r} is not supported; choose one of {', '.join(map(repr, args))}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = (value,) if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            raise PassConfigError(f"{pass_name}: {key} must be a list, got {type(value).__name__}")
        item_type = args[0] if args else Any
        return tuple(_coerce(pass_name, key, item_type, v) for v in value)
    if annotation is Any:
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PassConfigError(f"{pass_name}: {key} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PassConfigError(f"{pass_name}: {key} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise PassConfigError(f"{pass_name}: {key} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise PassConfigError(f"{pass_name}: {key} must be a string, got {value!r}")
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise PassConfigError(f"{pass_name}: {key} must be {annotation.__name__}, got {type(value).__name__}")
    return value
