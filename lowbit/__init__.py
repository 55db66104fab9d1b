"""lowbit: trace a PyTorch model to torch.fx, rewrite it with passes, compile it to a backend.

    import lowbit
    compiled = lowbit.compile(model, example_inputs, recipe="w4a16-x86", target="torch")
    compiled(*example_inputs); print(compiled.report); compiled.export("out/model")

Public names are imported on first use, so ``import lowbit.errors`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CompileReport": "lowbit.compiler",
    "CompiledModel": "lowbit.compiler",
    "compile": "lowbit.compiler",
    "dequantized_weights": "lowbit.inspection",
    "prepare": "lowbit.compiler",
    "Pipeline": "lowbit.passes.pipeline",
    "load": "lowbit.artifact",
    "trace": "lowbit.ir.trace",
}
_SUBMODULES = ("errors", "passes", "recipes", "zoo")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"lowbit.{name}")
    else:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    globals()[name] = value
    return value
