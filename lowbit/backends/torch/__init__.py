"""The torch reference backend: runs the transformed GraphModule as it is.

It is the semantic oracle of every other backend: lowbit's custom ops execute their
PyTorch reference implementations here. The GraphModule is its own runner (`as_runner`), so a
loaded artifact stays a GraphModule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx

import lowbit.ir.ops  # noqa: F401  (registers torch.ops.lowbit before a graph is loaded)
import lowbit.ir.ops_a8  # noqa: F401  (the int8-activation packed linear)
from lowbit.errors import ArtifactError
from lowbit.ir.annotations import META_KEY

GRAPH_FILE = "graph.pt"
ANNOTATIONS = "_lowbit_annotations"


def as_runner(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` in eval mode as its own runner (`lowbit.backends.Runner`): it runs wherever torch does, with no
    fallbacks and nothing tuned.

    torch.fx gives every GraphModule a class of its own (it holds the generated ``forward``), so
    the attributes go on that class: nothing is added to the module's state or to what
    `torch.save` writes.
    """
    cls = type(gm)
    cls.runnable, cls.fallbacks, cls.tuning = True, (), ()
    return gm.eval()


class TorchBackend:
    name = "torch"

    def compile(
        self, gm: fx.GraphModule, example_inputs: tuple, *, cache_dir: Any = None, tune: Any = None
    ) -> fx.GraphModule:
        """The graph itself is the executable; it runs in eval mode without autograd state."""
        return as_runner(gm)

    def save(self, runner: fx.GraphModule, directory: Path) -> list[str]:
        # Node meta is not pickled with a GraphModule (its graph is re-traced from the
        # generated code on load, which renames some nodes), so the annotations travel in
        # an attribute (gm.meta is not kept either), keyed by node position, with op and
        # target to check the match.
        setattr(
            runner,
            ANNOTATIONS,
            [
                (index, node.op, str(node.target), node.meta[META_KEY])
                for index, node in enumerate(runner.graph.nodes)
                if META_KEY in node.meta
            ],
        )
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
        return as_runner(gm)


__all__ = ["GRAPH_FILE", "TorchBackend", "as_runner"]
