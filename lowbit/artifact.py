"""Exported artifacts: a directory with the backend's files and a checksummed manifest.

Export writes into a temporary sibling directory and renames it into place, so a
failed export never leaves a half-written artifact. Load verifies every checksum and
the target before anything is deserialized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import lowbit
from lowbit.backends import get_backend
from lowbit.errors import ArtifactError

if TYPE_CHECKING:
    from lowbit.compiler import CompiledModel

MANIFEST = "manifest.json"
FORMAT = "lowbit-artifact"
FORMAT_VERSION = 1

log = logging.getLogger("lowbit.artifact")


def write(
    path: str | Path,
    target: Any,
    runner: Any,
    info: dict[str, Any],
    overwrite: bool = False,
    save: Callable[[Path], list[str]] | None = None,
) -> Path:
    """Write an artifact for ``runner`` (compiled for ``target``) to the directory ``path``: the files the backend
    saves, or those ``save(directory)`` writes (it returns their names)."""

    def fill(staging: Path) -> None:
        files = save(staging) if save is not None else get_backend(target).save(runner, staging)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "target": target,
            **info,
            "versions": _versions(),
            "files": {name: _sha256(staging / name) for name in files},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    log.info("writing the %s artifact to %s", target, path)
    return _publish(Path(path), overwrite, fill)


def copy(source: str | Path, path: str | Path, overwrite: bool = False) -> Path:
    """Copy the artifact at ``source`` to ``path`` after checking it (how a loaded artifact is exported again: a
    loaded TVM library cannot be serialized a second time)."""
    read_manifest(source)
    log.info("copying the artifact %s to %s", source, path)
    return _publish(Path(path), overwrite, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True))


def _publish(path: Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling directory of ``path`` and rename it into place (module doc)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ArtifactError(f"{path} already exists and is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        fill(staging)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, after checking its format and every checksum."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a lowbit artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ArtifactError(f"{manifest_path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {manifest.get('format_version')} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{path}: {name} is listed in the manifest but missing")
        if _sha256(file) != digest:
            raise ArtifactError(f"{path}: checksum mismatch for {name}; the artifact is corrupted or was modified")
    return manifest


def load(path: str | Path, target: Any = None) -> CompiledModel:
    """Load an exported artifact as a `lowbit.CompiledModel` (``graph`` None for TVM targets; ``report`` restored
    from the manifest), checking its inputs and rebuilding eager's outputs as the compiled model did.

    ``target``, when given, must match the target the artifact was built for.
    """
    from lowbit.compiler import CompiledModel

    manifest = read_manifest(path)
    built_for = manifest.get("target")
    if target is not None and built_for != target:
        raise ArtifactError(f"{path} was built for target {built_for!r}, not {target!r}")
    if "decoder" in manifest:
        from lowbit.llm.model import load as load_causal_lm

        return load_causal_lm(Path(path), manifest)
    runner = get_backend(built_for).load(Path(path))
    report, interface, info = restored(manifest)
    if hasattr(runner, "interface"):
        runner.interface = interface
    graph = runner if isinstance(runner, torch.fx.GraphModule) else None
    return CompiledModel(graph, runner, report, info, interface, source=Path(path))


def restored(manifest: Mapping[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """What a compiled model kept in its manifest: its `CompileReport`, its `Interface`, and the recipe, passes
    and inputs it was compiled with."""
    from lowbit.compiler import CompileReport
    from lowbit.interface import Interface

    target = manifest.get("target")
    report = CompileReport.from_summary(target, {"recipe": manifest.get("recipe"), **manifest.get("report", {})})
    info = {key: manifest[key] for key in ("recipe", "passes", "inputs") if key in manifest}
    return report, Interface.from_dict(manifest.get("interface")), info


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    return {"lowbit": lowbit.__version__, "torch": torch.__version__, "python": platform.python_version()}
