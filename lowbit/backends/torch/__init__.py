"""The torch reference backend: runs the transformed GraphModule as it is.

It is the semantic oracle of every other backend: lowbit's custom ops execute their
PyTorch reference implementations here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import lowbit.ir.ops  # noqa: F401  (registers torch.ops.lowbit before a graph is loaded)

GRAPH_FILE = "graph.pt"


class TorchBackend:
    name = "torch"

    def compile(self, gm: fx.GraphModule, example_inputs: tuple, *, cache_dir: Any = None, tune: Any = None) -> fx.GraphModule:
        """The graph itself is the executable; it runs in eval mode without autograd state."""
        return gm.eval()

    def save(self, runner: fx.GraphModule, directory: Path) -> list[str]:
        torch.save(runner, directory / GRAPH_FILE)
        return [GRAPH_FILE]

    def load(self, directory: Path) -> fx.GraphModule:
        # The file was checksummed against the manifest before this runs.
        return torch.load(directory / GRAPH_FILE, weights_only=False).eval()
