"""No import cycles: every module of lowbit imports on its own, and lowbit.backends' imports form no cycle."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lowbit
import lowbit.backends

#: Run in a fresh interpreter: for each module, forget every lowbit module, then import that one alone.
SCRIPT = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "lowbit" or m.startswith("lowbit.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def _modules(package) -> list[str]:
    return [package.__name__] + [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


@pytest.mark.slow
def test_every_module_imports_alone() -> None:
    """Each module first in a clean slate (one interpreter, lowbit's modules dropped before each import)."""
    names = _modules(lowbit)
    assert "lowbit.backends.tvm.toolchains.cpu" in names
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(names)], capture_output=True, text=True, check=True, timeout=1200
    )
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{error}" for name, error in failures.items())


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, in functions too (an import deferred into a function to break a cycle
    still is one), except those under ``if TYPE_CHECKING:``."""
    if isinstance(tree, ast.If) and isinstance(tree.test, ast.Name) and tree.test.id == "TYPE_CHECKING":
        return []
    if isinstance(tree, ast.Import | ast.ImportFrom):
        return [tree]
    return [found for child in ast.iter_child_nodes(tree) for found in _imports(child)]


def _module_imports(path: Path, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The lowbit.backends modules that ``path`` imports."""
    found = set()
    for node in _imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {module for module in found if module in known}


def test_backends_imports_have_no_cycle() -> None:
    """The graph of imports between lowbit.backends modules is acyclic."""
    names = _modules(lowbit.backends)
    known = set(names)
    root = Path(lowbit.backends.__file__).parent
    graph = {}
    for name in names:
        relative = Path(*name.split(".")[2:])
        package = (root / relative / "__init__.py").is_file()
        path = root / relative / "__init__.py" if package else (root / relative).with_suffix(".py")
        graph[name] = _module_imports(path, name, package, known)
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for child in sorted(graph[name]):
            assert state.get(child) != 1, f"import cycle: {' -> '.join(trail + [name, child])}"
            if child not in state:
                visit(child, trail + [name])
        state[name] = 2

    for name in names:
        if name not in state:
            visit(name, [])
