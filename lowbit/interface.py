"""What a compiled model accepts and returns, recorded at compile time and checked on every call.

Eager PyTorch raises on a token id outside an embedding table, where a compiled kernel would
read out of bounds or clamp; so the valid range of every integer input that indexes a table
is recorded and checked before a run, on every target. Float inputs must be finite: int8
kernels cannot carry NaN or Inf, so every target refuses them instead of answering wrongly. One exception:
an input the graph only adds to the scores of a softmax (an additive attention mask) may hold -inf, which
every target's softmax turns into a weight of 0 as eager does; a row masked entirely (eager: NaN) is refused.
A graph compiled with ``dynamic_shapes`` records the range of each symbolic dimension (`lowbit.ir.shapes`), and
a size outside it is refused before anything runs.
Eager's output structure (a pytree spec, e.g. a transformers ``ModelOutput``) is recorded
so that a backend's flat tuple of tensors is rebuilt into it.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from lowbit.errors import InputError, InputShapeError, NonFiniteInputError
from lowbit.ir.ops_embedding import embedding_packed
from lowbit.ir.shapes import SymbolicDim, check_symbolic, symbolic_axes
from lowbit.ir.trace import FREE_BATCH

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: Ops an index tensor passes through unchanged in value on its way to a table lookup.
_VALUE_PRESERVING_METHODS = frozenset({"long", "int", "to", "view", "reshape", "contiguous", "flatten", "clone"})
_VALUE_PRESERVING_FUNCTIONS = (torch.flatten, torch.reshape, torch.ops.aten.view.default, torch.ops.aten.clone.default)


@dataclass(frozen=True)
class Interface:
    """The graph's input names (in order), the valid ``[low, high)`` range of each integer input that indexes a
    table, eager's output spec (`torch.utils._pytree.treespec_dumps`; None: returned as the backend gives it) and
    the batch size of each input whose batch dimension the graph fixes (known for graphs traced with a free batch),
    and the inputs that are additive softmax masks (`mask_inputs`)."""

    names: tuple[str, ...] = ()
    ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    output: str | None = None
    batch: Mapping[str, int] = field(default_factory=dict)
    masks: tuple[str, ...] = ()
    #: Per input, its symbolic dimensions by axis (a graph compiled with ``dynamic_shapes``).
    symbolic: Mapping[str, Mapping[int, SymbolicDim]] = field(default_factory=dict)
    #: Per input of a graph that serves calls itself, its sizes (None: symbolic), which a call must match.
    sizes: Mapping[str, tuple[int | None, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, gm: fx.GraphModule, eager_output: Any = None) -> Interface:
        """The interface of the traced graph ``gm`` (before any pass), with the spec of ``eager_output``."""
        names = tuple(str(node.target) for node in gm.graph.nodes if node.op == "placeholder")
        output = output_spec(eager_output) if eager_output is not None else None
        binding = FREE_BATCH in gm.meta
        batch, sizes = (fixed_batch(gm), input_sizes(gm)) if binding else ({}, {})
        return cls(names, index_ranges(gm), output, batch, mask_inputs(gm), symbolic_axes(gm), sizes)

    def check(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise `InputShapeError` for a batch size the graph cannot take or a size outside a symbolic dimension's
        range, `NonFiniteInputError` for a float input holding NaN/Inf (a mask: NaN, +Inf or a row all -Inf),
        `InputError` for an index out of range."""
        named = list(self._named(args, kwargs))
        if self.symbolic:
            check_symbolic(self.symbolic, {name: v for name, v in named if isinstance(v, torch.Tensor)})
        for name, value in named:
            if not isinstance(value, torch.Tensor):
                continue
            if name in self.batch and (value.dim() == 0 or value.shape[0] != self.batch[name]):
                raise InputShapeError(
                    f"input '{name}' of shape {tuple(value.shape)}: the traced graph fixes its batch dimension "
                    f"(dim 0) at {self.batch[name]} (the model's code ties it to that size); pass batches of "
                    f"{self.batch[name]}, or compile again with example inputs of the batch size to serve"
                )
            if name in self.sizes:
                _check_sizes(name, value, self.sizes[name])
            if value.numel() == 0:
                continue
            if name in self.masks:
                _check_mask(name, value)
            elif value.is_floating_point() or value.is_complex():
                bad = non_finite_count(value)
                if bad:
                    raise NonFiniteInputError(
                        f"input '{name}' holds {bad} NaN or Inf value(s) of {value.numel()}; compiled models refuse "
                        "non-finite inputs on every target (check the data, or run the eager model to see them); "
                        "-inf is taken only in an additive mask, an input added to softmax scores and used nowhere else"
                    )
            elif name in self.ranges:
                low, high = self.ranges[name]
                smallest, largest = int(value.min()), int(value.max())
                if smallest < low or largest >= high:
                    offending = smallest if smallest < low else largest
                    raise InputError(
                        f"input '{name}' holds {offending}, outside [{low}, {high}): it indexes a table of {high} "
                        "rows (eager PyTorch raises IndexError for it)"
                    )

    def rebuild(self, output: Any) -> Any:
        """``output`` in eager's structure: a backend's flat tensor or tuple is unflattened with the recorded spec."""
        spec = self._spec
        if spec is None:
            return output
        if pytree.tree_structure(output) == spec:
            return output
        leaves = pytree.tree_leaves(output)
        if len(leaves) != spec.num_leaves:
            log.warning(
                "the compiled model returns %d tensors, eager %d: outputs left flat", len(leaves), spec.num_leaves
            )
            return output
        return pytree.tree_unflatten(leaves, spec)

    def as_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "output": self.output,
            "batch": dict(self.batch),
            "masks": list(self.masks),
            **({"symbolic": self._symbolic_dict()} if self.symbolic else {}),
            **({"sizes": {name: list(sizes) for name, sizes in self.sizes.items()}} if self.sizes else {}),
        }

    def _symbolic_dict(self) -> dict[str, dict[str, list[Any]]]:
        return {
            name: {str(axis): [dim.name, dim.low, dim.high] for axis, dim in axes.items()}
            for name, axes in self.symbolic.items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Interface:
        """The interface saved by `as_dict` (an empty one for artifacts written before it was saved)."""
        if not data:
            return cls()
        ranges = {name: (int(low), int(high)) for name, (low, high) in data.get("ranges", {}).items()}
        batch = {name: int(size) for name, size in data.get("batch", {}).items()}
        symbolic = {
            name: {int(axis): SymbolicDim(dim, int(low), int(high)) for axis, (dim, low, high) in axes.items()}
            for name, axes in data.get("symbolic", {}).items()
        }
        masks = tuple(data.get("masks", ()))
        sizes = {name: tuple(sizes) for name, sizes in data.get("sizes", {}).items()}
        return cls(tuple(data.get("names", ())), ranges, data.get("output"), batch, masks, symbolic, sizes)

    def _named(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
        names = list(self.names) + [str(i) for i in range(len(self.names), len(args))]
        yield from zip(names, args)
        yield from kwargs.items()

    @functools.cached_property
    def _spec(self) -> pytree.TreeSpec | None:
        """The recorded spec, read once (its types' modules imported first)."""
        if self.output is None:
            return None
        try:
            _import_types(json.loads(self.output))
            return pytree.treespec_loads(self.output)
        except Exception as error:  # an output class that cannot be imported here: keep the flat outputs
            log.warning("cannot rebuild eager's output structure (%s); outputs are returned flat", error)
            return None


def index_ranges(gm: fx.GraphModule) -> dict[str, tuple[int, int]]:
    """Per graph input that indexes a table (embedding lookup, ``take``/``index_select`` on a constant), the valid
    ``[0, rows)``; an input indexing several tables gets the smallest."""
    ranges: dict[str, tuple[int, int]] = {}
    for node in gm.graph.nodes:
        lookup = _lookup(gm, node)
        if lookup is None:
            continue
        index, rows = lookup
        source = _source(index)
        if source is not None and rows is not None:
            name = str(source.target)
            ranges[name] = (0, min(rows, ranges.get(name, (0, rows))[1]))
    return ranges


def fixed_batch(gm: fx.GraphModule) -> dict[str, int]:
    """Per graph input whose dim 0 the traced graph holds at a concrete size (not a symbol), that size."""
    fixed = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.dim() and is_concrete_int(value.shape[0]):
            fixed[str(node.target)] = int(value.shape[0])
    return fixed


def input_sizes(gm: fx.GraphModule) -> dict[str, tuple[int | None, ...]]:
    """Per tensor graph input, its sizes as traced: an int where the graph holds it concrete, None for a symbol."""
    sizes = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            sizes[str(node.target)] = tuple(int(n) if is_concrete_int(n) else None for n in value.shape)
    return sizes


def _check_sizes(name: str, value: torch.Tensor, sizes: tuple[int | None, ...]) -> None:
    """Raise `InputShapeError` unless ``value`` has the rank of ``sizes`` and each of their concrete sizes."""
    shape = tuple(value.shape)
    wrong = len(shape) != len(sizes) or any(s is not None and n != s for n, s in zip(shape, sizes, strict=False))
    if wrong:
        expected = tuple("*" if s is None else s for s in sizes)
        raise InputShapeError(
            f"input '{name}' of shape {shape}: the traced graph takes shape {expected} (* any size); pass that "
            "shape, or compile with dynamic_shapes= naming the dimensions to serve"
        )


def mask_inputs(gm: fx.GraphModule) -> tuple[str, ...]:
    """The float graph inputs used only as additive softmax masks: through views and casts that keep their last
    dimension, each use is an addition whose result reaches softmaxes over that last dimension through further
    additions only. In such an input -inf is a weight of 0 on every target, and a row all -inf is eager's NaN."""
    masks = []
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta") if node.op == "placeholder" else None
        if meta is not None and meta.dtype.is_floating_point and len(meta.shape) and _masks_only(node, meta.shape[-1]):
            masks.append(str(node.target))
    return tuple(masks)


def _masks_only(node: fx.Node, width: int) -> bool:
    """``node`` (a mask of ``width`` columns) reaches softmaxes over its columns, through views and additions only."""
    if not node.users:
        return False
    for user in node.users:
        if _calls(user, _VIEWS) and user.args[0] is node and _width(user) == width:
            ok = _masks_only(user, width)
        elif _calls(user, _ADDS) and len(user.args) == 2 and not user.kwargs and _width(user) == width:
            ok = _scores_only(user, width)
        else:
            ok = False
        if not ok:
            return False
    return True


def _scores_only(node: fx.Node, width: int) -> bool:
    """``node`` (masked scores) is used only by further additions and by softmaxes over its last dimension."""
    if not node.users:
        return False
    for user in node.users:
        if _calls(user, _ADDS) and len(user.args) == 2 and not user.kwargs and _width(user) == width:
            ok = _scores_only(user, width)
        elif _calls(user, _SOFTMAXES) and user.args[0] is node:
            dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
            rank = len(node.meta["tensor_meta"].shape)
            ok = isinstance(dim, int) and dim % rank == rank - 1
        else:
            ok = False
        if not ok:
            return False
    return True


def non_finite_count(value: torch.Tensor) -> int:
    """How many values of the float tensor ``value`` are NaN or infinite.

    A real CPU tensor is tested in numpy first, on this thread: a torch reduction over a large input wakes torch's
    OpenMP workers, which then spin for a while after it and take the cores from the compiled kernels' own thread
    pool, which runs right after this check. torch counts only when something is off (or numpy cannot view it).
    """
    if value.device.type == "cpu" and value.dtype in _NUMPY_FLOATS and np.isfinite(value.detach().numpy()).all():
        return 0
    return int((~torch.isfinite(value)).sum())


#: Float dtypes numpy views without a copy.
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _check_mask(name: str, value: torch.Tensor) -> None:
    """An additive mask may hold -inf, but no NaN or +inf, and no row all -inf."""
    bad = int((torch.isnan(value) | (value == float("inf"))).sum())
    if bad:
        raise NonFiniteInputError(
            f"input '{name}' holds {bad} NaN or +Inf value(s) of {value.numel()}; it is an additive softmax mask, "
            "which may hold -inf (a weight of 0) but no NaN or +inf (eager's softmax answers NaN for them)"
        )
    if bool((value == float("-inf")).all(dim=-1).any()):
        raise NonFiniteInputError(
            f"input '{name}' masks every position of a row with -inf: eager's softmax answers NaN for that row; "
            "leave at least one position of each row unmasked"
        )


#: Ops a mask passes through unchanged in value, in the fx and in the torch.export (ATen) form.
_VIEWS = frozenset(
    {
        "view", "reshape", "unsqueeze", "expand", "expand_as", "contiguous", "to", "float",
        torch.reshape, torch.unsqueeze, aten.view.default, aten.reshape.default, aten.unsqueeze.default,
        aten.expand.default, aten.clone.default, aten._to_copy.default, aten.alias.default,
    }
)  # fmt: skip
_ADDS = frozenset({"add", operator.add, torch.add, aten.add.Tensor})
_SOFTMAXES = frozenset({"softmax", torch.softmax, F.softmax, aten.softmax.int, aten._softmax.default})


def _calls(node: fx.Node, targets: frozenset[Any]) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _width(node: fx.Node) -> int | None:
    """The last dimension of the float tensor ``node`` makes (None for any other value)."""
    meta = node.meta.get("tensor_meta")
    floating = meta is not None and getattr(meta, "dtype", None) is not None and meta.dtype.is_floating_point
    return int(meta.shape[-1]) if floating and len(meta.shape) else None


def output_spec(output: Any) -> str | None:
    """``output``'s pytree spec as text, or None where a type in it cannot be serialized (logged)."""
    try:
        return pytree.treespec_dumps(pytree.tree_structure(output))
    except Exception as error:  # an unregistered container type: the structure is not recorded
        log.warning("eager's output structure cannot be recorded (%s); compiled outputs stay flat", error)
        return None


def _lookup(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, int | None] | None:
    """(index argument, table rows) when ``node`` looks rows up in a table."""
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), torch.nn.Embedding):
        return node.args[0], gm.get_submodule(str(node.target)).num_embeddings
    if node.op == "call_function" and node.target is F.embedding:
        return node.args[0], _rows(gm, node.args[1], 0)
    if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
        return node.args[1], _rows(gm, node.args[0], 0)
    if node.op == "call_function" and node.target is embedding_packed:
        return node.args[0], _rows(gm, node.args[1], 0)
    if node.op == "call_function" and node.target is torch.take:
        table = _constant(gm, node.args[0])
        return node.args[1], table.numel() if table is not None else None
    if node.target in (torch.index_select, "index_select") and node.op in ("call_function", "call_method"):
        return node.args[2], _rows(gm, node.args[0], int(node.args[1]))
    return None


def _rows(gm: fx.GraphModule, table: Any, dim: int) -> int | None:
    constant = _constant(gm, table)
    return int(constant.shape[dim]) if constant is not None else None


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _source(index: Any) -> fx.Node | None:
    """The graph input ``index`` is (through value-preserving views and casts), else None."""
    while isinstance(index, fx.Node):
        if index.op == "placeholder":
            return index
        if (index.op == "call_method" and index.target in _VALUE_PRESERVING_METHODS) or (
            index.op == "call_function" and index.target in _VALUE_PRESERVING_FUNCTIONS
        ):
            index = index.args[0]
        else:
            return None
    return None


def _import_types(spec: Any) -> None:
    """Import the module of every type named in a serialized spec, so that its pytree registration exists."""
    if isinstance(spec, list):
        for item in spec:
            _import_types(item)
    elif isinstance(spec, dict):
        if isinstance(spec.get("type"), str) and "." in spec["type"]:
            importlib.import_module(spec["type"].rsplit(".", 1)[0])
        _import_types(spec.get("children_spec", []))


__all__ = ["Interface", "fixed_batch", "index_ranges", "input_sizes", "mask_inputs", "output_spec"]
