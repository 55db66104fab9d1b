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
import lowbit.ir.ops_a8  # noqa: F401  (the int8-activation packed linear)
from lowbit.errors import ArtifactError
from lowbit.ir.annotations import META_KEY

GRAPH_FILE = "graph.pt"
ANNOTATIONS = "_lowbit_annotations"


class TorchBackend:
    name = "torch"

    def compile(self, gm: fx.GraphModule, example_inputs: tuple, *, cache_dir: Any = None, tune: Any = None) -> fx.GraphModule:
        """The graph itself is the executable; it runs in eval mode without autograd state."""
        return gm.eval()

    def save(self, runner: fx.GraphModule, directory: Path) -> list[str]:
        # Node meta is not pickled with a GraphModule (its graph is re-traced from the
        # generated code on load, which renames some nodes), so the annotations travel in
        # an attribute (gm.meta is not kept either), keyed by node position, with op and
        # target to check the match.
        setattr(runner, ANNOTATIONS, [
            (index, node.op, str(node.target), node.meta[META_KEY])
            for index, node in enumerate(runner.graph.nodes)
            if META_KEY in node.meta
        ])
        try:
            torch.save(runner, directory / GRAPH_FILE)
        finally:
            delattr(runner, ANNOTATIONS)
        return [GRAPH_FILE]

    def load(self, directory: Path) -> fx.GraphModule:
        # The file was checksummed against the manifest before this runs.
        gm = torch.load(directory / GRAPH_FILE, weights_only=False)
        nodes = list(gm.graph.nodes)
        for index, op, target, meta in gm.__dict__.pop(ANNOTATIONS, []):
            node = nodes[index] if index < len(nodes) else None
            if node is None or (node.op, str(node.target)) != (op, target):
                raise ArtifactError(f"{directory}: the saved annotations do not match the graph at node {index}")
            node.meta[META_KEY] = meta
        return gm.eval()
