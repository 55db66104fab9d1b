"""Named recipes: YAML files shipped in this package, loadable by name or path.

    recipe = lowbit.recipes.load("w4a16-x86")          # a shipped recipe
    recipe = lowbit.recipes.load("configs/mine.yaml")  # any file
    passes = recipe.build("convert")                   # fresh, validated Pass instances

Each shipped file is a scheme (``w4a16.yaml``) written once for all targets; the recipe
``w4a16-x86`` is its shared passes with its ``x86`` part. A file loaded by path is one
recipe for one target.

Loading validates everything a pipeline would trip over later (pass names, stages,
options, overrides, target, tuning options) and raises a `RecipeError` naming the file
and the key path.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import RecipeError
from lowbit.recipes.schema import PassSpec, Recipe, TuneOptions, display_name, parse, parse_scheme

_SUFFIXES = (".yaml", ".yml")


def available() -> list[str]:
    """The names of the shipped recipes, ``<scheme>-<target>`` for each target part of each scheme file, sorted."""
    names = []
    for path in _scheme_files():
        data = _read_yaml(path, path.read_text(encoding="utf-8"))
        targets = data.get("targets") if isinstance(data, dict) else None
        names += [f"{path.stem}-{target}" for target in targets or ()]
    return sorted(names)


def load(name_or_path: str | os.PathLike[str]) -> Recipe:
    """Load and validate a recipe: a shipped name like ``"w4a16-x86"``, or a path to a YAML file.

    A string is a path when it contains a path separator or ends in ``.yaml``/``.yml``.
    """
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name_or_path):
        path = Path(name_or_path)
        return parse(_read_yaml(path, _read_file(path)), path)
    path = _shipped_path(name_or_path)
    target = name_or_path.rpartition("-")[2]
    return parse_scheme(_read_yaml(path, path.read_text(encoding="utf-8")), path, target)


def status() -> dict[str, str]:
    """Each shipped recipe's name → ``"ready"``, or the error that loading it raises."""
    result = {}
    for name in available():
        try:
            load(name)
        except RecipeError as exc:
            result[name] = str(exc)
        else:
            result[name] = "ready"
    return result


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith(_SUFFIXES)


def _scheme_files() -> list[Path]:
    return sorted(Path(str(entry)) for entry in resources.files(__name__).iterdir() if entry.name.endswith(".yaml"))


def _shipped_path(name: str) -> Path:
    """The scheme file of the shipped recipe ``name``; an error listing close matches and all names if none."""
    names = available()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise RecipeError(
            f"{name}.yaml: no shipped recipe named '{name}'{hint}; available: {', '.join(names)}; "
            "to load your own file, pass its path"
        )
    return Path(str(resources.files(__name__) / f"{name.rpartition('-')[0]}.yaml"))


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RecipeError(f"{path}: recipe file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe file: {exc}") from exc


def _read_yaml(path: Path, text: str) -> Any:
    """Parse ``text``; a syntax error or a duplicated key becomes a `RecipeError` with its line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        line = f"line {exc.problem_mark.line + 1}: " if exc.problem_mark else ""
        raise RecipeError(f"{display_name(path)}: {line}invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{display_name(path)}: invalid YAML: {exc}") from exc


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that rejects duplicated mapping keys (YAML would silently keep the last one,
    so a repeated override pattern would change which rule wins without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


__all__ = ["PassSpec", "Recipe", "TuneOptions", "available", "load", "status"]
