"""The torch reference backend: runs the transformed GraphModule as it is.

It is the semantic oracle of every other backend: lowbit's custom ops execute their
PyTorch reference implementations here. The GraphModule is its own runner (`as_runner`), so a
loaded artifact stays a GraphModule. An artifact holds the graph node by node (`SavedGraph`) with
the layers and tensors it uses, not a pickled GraphModule: that one is re-traced from its code on
load, which folds buffer arithmetic into constants, drops the input/output pytree structure of
torch.export graphs and needs the tracer class that built the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

import lowbit.ir.ops  # noqa: F401  (registers torch.ops.lowbit before a graph is loaded)
import lowbit.ir.ops_a8  # noqa: F401  (the int8-activation packed linear)
import lowbit.ir.ops_conv  # noqa: F401  (the packed convolutions)
import lowbit.ir.ops_embedding  # noqa: F401  (the packed embedding table)
from lowbit.errors import ArtifactError
from lowbit.interface import Interface
from lowbit.ir.annotations import META_KEY

GRAPH_FILE = "graph.pt"
ANNOTATIONS = "_lowbit_annotations"


def as_runner(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` in eval mode as its own runner (`lowbit.backends.Runner`): it runs wherever torch does, with no
    fallbacks, nothing tuned, and an empty `Interface` until `lowbit.compile` records one (it checks inputs itself).

    torch.fx gives every GraphModule a class of its own (it holds the generated ``forward``), so
    the attributes go on that class: nothing is added to the module's state or to what
    `torch.save` writes.
    """
    cls = type(gm)
    cls.runnable, cls.fallbacks, cls.tuning, cls.interface = True, (), (), Interface()
    return gm.eval()


class TorchBackend:
    name = "torch"

    def compile(
        self,
        gm: fx.GraphModule,
        example_inputs: tuple,
        *,
        cache_dir: Any = None,
        tune: Any = None,
        strict: bool = False,
    ) -> fx.GraphModule:
        """The graph itself is the executable; it runs in eval mode without autograd state. Every layer runs its
        reference implementation, so nothing is on a fallback and ``strict`` has nothing to refuse."""
        return as_runner(gm)

    def save(self, runner: fx.GraphModule, directory: Path) -> list[str]:
        torch.save(SavedGraph.of(runner), directory / GRAPH_FILE)
        return [GRAPH_FILE]

    def load(self, directory: Path) -> fx.GraphModule:
        # The file was checksummed against the manifest before this runs.
        saved = torch.load(directory / GRAPH_FILE, weights_only=False)
        if isinstance(saved, SavedGraph):
            return as_runner(saved.graph_module())
        return as_runner(_with_annotations(saved, directory))


@dataclass(frozen=True)
class _NodeRef:
    """A node argument, by the node's name."""

    name: str


@dataclass(frozen=True)
class _OpRef:
    """An operator overload target (``torch.ops.aten.view.default``), which does not pickle, by its name."""

    namespace: str
    name: str
    overload: str

    def resolve(self) -> Any:
        return getattr(getattr(getattr(torch.ops, self.namespace), self.name), self.overload)


@dataclass(frozen=True)
class _SavedNode:
    op: str
    name: str
    target: Any
    args: Any
    kwargs: Any
    annotation: Any = None


@dataclass(frozen=True)
class SavedGraph:
    """A GraphModule in picklable parts: its nodes (names, targets, arguments and annotations kept exactly), its
    code generator (a torch.export graph's input and output structure) and a module holding its layers and tensors."""

    class_name: str
    nodes: list[_SavedNode]
    codegen: Any
    root: nn.Module

    @classmethod
    def of(cls, gm: fx.GraphModule) -> SavedGraph:
        def ref(value: Any) -> Any:
            return _NodeRef(value.name) if isinstance(value, fx.Node) else value

        nodes = [
            _SavedNode(
                node.op,
                node.name,
                _target_ref(node.target),
                map_aggregate(node.args, ref),
                map_aggregate(node.kwargs, ref),
                node.meta.get(META_KEY),
            )
            for node in gm.graph.nodes
        ]
        root = nn.Module()
        for name, child in gm.named_children():
            root.add_module(name, child)
        for node in gm.graph.nodes:
            if node.op == "get_attr" and "." not in str(node.target):
                setattr(root, str(node.target), getattr(gm, str(node.target)))
        return cls(type(gm).__name__, nodes, gm.graph._codegen, root)

    def graph_module(self) -> fx.GraphModule:
        graph = fx.Graph()
        graph._codegen = self.codegen
        env: dict[str, fx.Node] = {}

        def node_of(value: Any) -> Any:
            return env[value.name] if isinstance(value, _NodeRef) else value

        for saved in self.nodes:
            target = saved.target.resolve() if isinstance(saved.target, _OpRef) else saved.target
            args = map_aggregate(saved.args, node_of)
            kwargs = map_aggregate(saved.kwargs, node_of)
            node = graph.create_node(saved.op, target, args, kwargs, name=saved.name)
            if node.name != saved.name:
                raise ArtifactError(f"saved graph node {saved.name!r} came back as {node.name!r}")
            if saved.annotation is not None:
                node.meta[META_KEY] = saved.annotation
            env[saved.name] = node
        return fx.GraphModule(self.root, graph, class_name=self.class_name)


def _target_ref(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target._schema.name.split("::")
        return _OpRef(namespace, name, target._overloadname or "default")
    return target


def _with_annotations(gm: fx.GraphModule, directory: Path) -> fx.GraphModule:
    """A GraphModule pickled whole (artifacts before `SavedGraph`), its annotations restored by node position."""
    nodes = list(gm.graph.nodes)
    for index, op, target, meta in gm.__dict__.pop(ANNOTATIONS, []):
        node = nodes[index] if index < len(nodes) else None
        if node is None or (node.op, str(node.target)) != (op, target):
            raise ArtifactError(f"{directory}: the saved annotations do not match the graph at node {index}")
        node.meta[META_KEY] = meta
    return gm


__all__ = ["GRAPH_FILE", "SavedGraph", "TorchBackend", "as_runner"]
