"""The recipe schema: frozen dataclasses and the validation that builds them from parsed YAML.

Two file shapes: a recipe for one target (``target:`` and ``tune:`` at the top level; users'
files), and a scheme holding the shared passes once with a ``targets:`` mapping of per-target
parts (the shipped ``w4a16.yaml`` gives ``w4a16-x86``, ``w4a16-arm``, ``w4a16-cuda``).

Every error is a `RecipeError` whose message starts with ``<file>: <key path>: `` so a user
can find the offending line, e.g. ``w4a16.yaml: convert[0].bits: rtn: bits=5 is not
supported; choose one of 2, 3, 4, 8``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lowbit.backends import check_target
from lowbit.errors import BackendError, PassConfigError, RecipeError, UnknownPassError
from lowbit.passes.base import Pass
from lowbit.passes.registry import lookup
from lowbit.passes.selection import SKIP

STAGES: tuple[str, ...] = ("prepare", "convert")
TOP_LEVEL_KEYS: tuple[str, ...] = ("name", "description", "target", "tune", "prepare", "convert")
REQUIRED_KEYS: tuple[str, ...] = ("target", "convert")
SCHEME_KEYS: tuple[str, ...] = ("name", "description", "prepare", "convert", "targets")
SCHEME_REQUIRED_KEYS: tuple[str, ...] = ("convert", "targets")
TARGET_PART_KEYS: tuple[str, ...] = ("description", "tune")

Target = str | Mapping[str, Any]


@dataclass(frozen=True)
class TuneOptions:
    """MetaSchedule tuning for the TVM backend: a trial budget, a time cap and a database path."""

    trials: int = 64
    max_seconds: float | None = None
    database: str | None = None


@dataclass(frozen=True)
class PassSpec:
    """One pass entry of a recipe: registry name, options, per-layer overrides, and where it was written."""

    name: str
    options: Mapping[str, Any]
    overrides: Mapping[str, Any]
    stage: str
    key_path: str

    def instantiate(self, source: str) -> Pass:
        """Build the pass through the registry; errors become `RecipeError` naming ``source`` and the key path."""
        cls = self._pass_class(source)
        with _config_errors(source, self.key_path, cls.name, self.options):
            base = cls(**self.options)
        for layer, value in self.overrides.items():
            if value != SKIP:
                with _config_errors(source, f"{self.key_path}.overrides[{layer!r}]", cls.name, value):
                    base.config.replace(cls.name, value)
        with _config_errors(source, self.key_path, cls.name, self.options):
            return cls(overrides=self.overrides, **self.options)

    def _pass_class(self, source: str) -> type[Pass]:
        """The registered class, checked to belong to this spec's stage."""
        try:
            cls = lookup(self.name)
        except UnknownPassError as exc:
            raise _error(source, f"{self.key_path}.pass", str(exc)) from exc
        if cls.stage not in ("any", self.stage):
            raise _error(
                source,
                f"{self.key_path}.pass",
                f"'{self.name}' is a {cls.stage}-stage pass; list it under '{cls.stage}', not '{self.stage}'",
            )
        return cls


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: a target, tuning options and the passes of each stage."""

    name: str
    description: str
    path: Path
    target: Target
    tune: TuneOptions
    prepare: tuple[PassSpec, ...]
    convert: tuple[PassSpec, ...]

    def build(self, stage: str) -> list[Pass]:
        """Fresh pass instances for ``stage`` (``"prepare"`` or ``"convert"``), in recipe order."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
        return [spec.instantiate(display_name(self.path)) for spec in getattr(self, stage)]

    def with_target(self, target: Target) -> Recipe:
        """A copy of this recipe for another target (a name from `TARGETS` or a TVM target dict).

        An unknown target raises `BackendError`, as everywhere else a target is given in code.
        """
        return dataclasses.replace(self, target=_freeze(check_target(target)))


_SHIPPED_DIR: Path = Path(__file__).parent


def display_name(path: Path) -> str:
    """How messages name a recipe file: the bare file name when shipped, else the path."""
    return path.name if path.parent == _SHIPPED_DIR else str(path)


def parse(data: Any, path: Path) -> Recipe:
    """Validate parsed YAML ``data`` of a one-target recipe file read from ``path`` and build the `Recipe`."""
    source = display_name(path)
    _check_top_level(source, data, TOP_LEVEL_KEYS, REQUIRED_KEYS)
    return _build(
        source,
        name=_parse_string(source, "name", data.get("name", path.stem)),
        description=_parse_string(source, "description", data.get("description", "")),
        path=path,
        target=_parse_target(source, "target", data["target"]),
        tune=_parse_tune(source, "tune", data.get("tune")),
        stages=data,
    )


def parse_scheme(data: Any, path: Path, target: str) -> Recipe:
    """The recipe for ``target`` from a scheme file (the shipped ``w4a8.yaml``): its shared keys (passes and a
    description template) with the part of its ``targets`` mapping for ``target`` on top.

    The recipe is named ``<scheme>-<target>``; the scheme's ``name`` must equal the file stem. A target part holds
    a ``description`` (filling ``{target}`` in the template) and a ``tune`` block, which a CUDA target may not
    have: the TVM backend does not tune CUDA kernels.
    """
    source = display_name(path)
    _check_top_level(source, data, SCHEME_KEYS, SCHEME_REQUIRED_KEYS)
    scheme = _parse_string(source, "name", data.get("name", path.stem))
    if scheme != path.stem:
        raise _error(source, "name", f"'{scheme}' must equal the file name '{path.stem}'")
    parts = _mapping(source, "targets", data["targets"])
    if target not in parts:
        raise _error(source, "targets", f"no part for target '{target}'; this scheme has {', '.join(map(str, parts))}")
    where = f"targets.{target}"
    part = _mapping(source, where, parts[target] or {})
    _check_keys(source, f"{where}.", part, TARGET_PART_KEYS)
    if target == "cuda" and "tune" in part:
        raise _error(
            source, f"{where}.tune", "CUDA kernels are not tuned (the tuner times kernels on CPUs); leave 'tune' out"
        )
    template = _parse_string(source, "description", data.get("description", ""))
    filler = _parse_string(source, f"{where}.description", part.get("description", target))
    return _build(
        source,
        name=f"{scheme}-{target}",
        description=template.replace("{target}", filler),
        path=path,
        target=_parse_target(source, "targets", target),
        tune=_parse_tune(source, f"{where}.tune", part.get("tune")),
        stages=data,
    )


def _check_top_level(source: str, data: Any, known: tuple[str, ...], required: tuple[str, ...]) -> None:
    """``data`` is a mapping with only ``known`` keys and every ``required`` one."""
    if not isinstance(data, Mapping):
        raise _error(source, "<top level>", f"a recipe is a mapping of {', '.join(known)}; got {_kind(data)}")
    if "targets" in data and "targets" not in known:
        raise _error(
            source,
            "targets",
            "a recipe file loaded by path is for one target: give 'target' (and its 'tune') at the top level instead",
        )
    _check_keys(source, "", data, known)
    for key in required:
        if key not in data:
            raise _error(source, key, "missing; every recipe needs it")


def _build(
    source: str,
    *,
    name: str,
    description: str,
    path: Path,
    target: Target,
    tune: TuneOptions,
    stages: Mapping[str, Any],
) -> Recipe:
    """The `Recipe` with the ``prepare`` and ``convert`` passes of ``stages``, each pass built once to validate it."""
    recipe = Recipe(
        name=name,
        description=description,
        path=path,
        target=target,
        tune=tune,
        prepare=_parse_stage(source, "prepare", stages.get("prepare", [])),
        convert=_parse_stage(source, "convert", stages["convert"]),
    )
    for stage in STAGES:
        recipe.build(stage)  # validates pass names, stages, options and overrides
    return recipe


def _parse_string(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _error(source, key, f"must be a string, got {_kind(value)}")
    return value


def _parse_target(source: str, key_path: str, value: Any) -> Target:
    try:
        return _freeze(check_target(value))
    except BackendError as exc:
        raise _error(source, key_path, str(exc)) from exc


def _parse_tune(source: str, key_path: str, value: Any) -> TuneOptions:
    """Tuning options at ``key_path``; every key is optional and defaults to `TuneOptions`' defaults."""
    if value is None:
        return TuneOptions()
    mapping = _mapping(source, key_path, value)
    _check_keys(source, f"{key_path}.", mapping, tuple(f.name for f in dataclasses.fields(TuneOptions)))
    defaults = TuneOptions()
    trials = mapping.get("trials", defaults.trials)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise _error(source, f"{key_path}.trials", f"must be an integer >= 0, got {trials!r}")
    max_seconds = mapping.get("max_seconds", defaults.max_seconds)
    if max_seconds is not None and (not _is_number(max_seconds) or max_seconds <= 0):
        raise _error(source, f"{key_path}.max_seconds", f"must be a number > 0 or null, got {max_seconds!r}")
    database = mapping.get("database", defaults.database)
    if database is not None and (not isinstance(database, str) or not database):
        raise _error(source, f"{key_path}.database", f"must be a path or null, got {database!r}")
    return TuneOptions(trials=trials, max_seconds=max_seconds, database=database)


def _parse_stage(source: str, stage: str, value: Any) -> tuple[PassSpec, ...]:
    if value is None:
        value = []
    if not isinstance(value, list):
        raise _error(source, stage, f"must be a list of passes, got {_kind(value)}")
    return tuple(_parse_pass(source, stage, f"{stage}[{index}]", entry) for index, entry in enumerate(value))


def _parse_pass(source: str, stage: str, key_path: str, entry: Any) -> PassSpec:
    """One ``{pass: name, overrides: {...}, **options}`` entry."""
    if not isinstance(entry, Mapping):
        raise _error(source, key_path, f"a pass entry is a mapping like {{pass: rtn, bits: 4}}, got {_kind(entry)}")
    if "pass" not in entry:
        raise _error(source, key_path, "missing the 'pass' key naming the pass")
    name = entry["pass"]
    if not isinstance(name, str) or not name:
        raise _error(source, f"{key_path}.pass", f"must be a pass name, got {name!r}")
    options = {key: value for key, value in entry.items() if key not in ("pass", "overrides")}
    overrides = _parse_overrides(source, f"{key_path}.overrides", entry.get("overrides"))
    return PassSpec(name, MappingProxyType(options), overrides, stage, key_path)


def _parse_overrides(source: str, key_path: str, value: Any) -> Mapping[str, Any]:
    """Per-layer overrides: layer name or pattern → ``skip`` or a mapping of options."""
    if value is None:
        return MappingProxyType({})
    mapping = _mapping(source, key_path, value)
    for layer, override in mapping.items():
        where = f"{key_path}[{layer!r}]"
        if not isinstance(layer, str) or not layer:
            raise _error(source, where, "an override key is a layer name or pattern (a string)")
        if layer.startswith("re:"):
            try:
                re.compile(layer[3:])
            except re.error as exc:
                raise _error(source, where, f"invalid regular expression: {exc}") from exc
        if override != SKIP and not isinstance(override, Mapping):
            raise _error(source, where, f"must be '{SKIP}' or a mapping of options, got {override!r}")
    return MappingProxyType(dict(mapping))


def _mapping(source: str, key_path: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _error(source, key_path, f"must be a mapping, got {_kind(value)}")
    return value


def _check_keys(source: str, prefix: str, mapping: Mapping[str, Any], known: tuple[str, ...]) -> None:
    """Reject keys outside ``known``, suggesting the closest known key."""
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            raise _error(source, f"{prefix}{key}", f"unknown key; {hint}")


@contextmanager
def _config_errors(source: str, key_path: str, pass_name: str, options: Mapping[str, Any]) -> Iterator[None]:
    """Turn a `PassConfigError` into a `RecipeError` at the option it names (else at ``key_path``)."""
    try:
        yield
    except PassConfigError as exc:
        key = _named_option(str(exc), pass_name, options)
        raise _error(source, key_path + (f".{key}" if key else ""), str(exc)) from exc


def _named_option(message: str, pass_name: str, options: Mapping[str, Any]) -> str | None:
    """The option a pass-config message is about (``"rtn: bits=5 ..."`` → ``bits``), if it is one of ``options``."""
    match = re.match(rf"{re.escape(pass_name)}: (?:unknown option ')?(\w+)", message)
    return match.group(1) if match and match.group(1) in options else None


def _error(source: str, key_path: str, message: str) -> RecipeError:
    return RecipeError(f"{source}: {key_path}: {message}")


def _freeze(target: str | dict[str, Any]) -> Target:
    return target if isinstance(target, str) else MappingProxyType(target)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """A short description of a YAML value for messages, e.g. ``list [1, 2]``."""
    return "null" if value is None else f"{type(value).__name__} {reprlib.repr(value)}"


__all__ = ["PassSpec", "Recipe", "TuneOptions", "display_name", "parse", "parse_scheme"]
