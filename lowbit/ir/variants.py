"""Running a graph specialized to the example's input shapes on calibration batches of other shapes.

torch.export bakes the example's sizes into the graph (view shapes, ``arange`` lengths, slice ends). A trace of the
same model at another input shape has, for most models, the same nodes with other constants (and without views
that keep a size-1 dimension as it is): `ShapeVariant` records the constants that differ, by node name, and
`VariantInterpreter` runs the graph being compiled with them, so a batch of that shape reaches the same layers, as
earlier passes left them. `add_calibration_variants` traces the model at each calibration shape the graph cannot
take (and names the batch, its inputs and the reason where the model itself rejects a shape); `fit_batches` cuts
batches whose size is a multiple of a specialized batch size into batches of it (rows are independent samples, so
the statistics are those of the whole batch); `run_batch` runs one batch through the graph, or through its shape's
variant; `check_batches` (run by the pipeline before any pass) names a batch the graph cannot run. Graphs from
torch.fx compute most sizes as they run, but lowbit's decompositions (`lowbit.ir.decompose`) write sizes into them
too: they are traced again at each calibration shape as well.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from lowbit.errors import CalibrationError, TraceError
from lowbit.ir.trace import FREE_BATCH, _summary, graph_inputs, trace

log = logging.getLogger(__name__)
aten = torch.ops.aten

Batch = tuple[tuple[Any, ...], dict[str, Any]]
#: The shape of each graph input (None: not a tensor), in placeholder order.
Signature = tuple[tuple[int, ...] | None, ...]
#: ``gm.meta`` key: the graph's `ShapeVariant` per input `Signature`.
VARIANTS = "lowbit_shape_variants"
#: Ops a trace at another shape may leave out where they keep their input as it is.
_VIEWS = frozenset({aten.expand.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default})


@dataclass(frozen=True)
class ShapeVariant:
    """The constants a trace at another input shape puts in place of the traced graph's: per node name, the
    ``(leaf index, traced value, value at that shape)`` of its flattened ``(args, kwargs)``; per attribute target,
    the tensor constant at that shape; the nodes that are the identity at that shape (``identities``: an ``expand``
    or view the trace there leaves out, as torch.export does to one that keeps a dimension of size 1 as it is)."""

    constants: Mapping[str, tuple[tuple[int, Any, Any], ...]] = field(default_factory=dict)
    attributes: Mapping[str, torch.Tensor] = field(default_factory=dict)
    identities: frozenset[str] = frozenset()

    @classmethod
    def between(cls, traced: fx.GraphModule, other: fx.GraphModule) -> ShapeVariant:
        """The variant taking ``traced`` to ``other`` (the same model traced at another shape); `ValueError` saying
        where when the two graphs differ in more than constants and left-out views."""
        second = list(other.graph.nodes)
        names: dict[str, str] = {}  # traced node name -> name of the node of ``other`` computing its value
        constants: dict[str, tuple[tuple[int, Any, Any], ...]] = {}
        attributes: dict[str, torch.Tensor] = {}
        identities = set()
        position = 0
        for a in traced.graph.nodes:
            b = second[position] if position < len(second) else None
            changes = _changes(a, b, names) if b is not None and (a.op, a.target) == (b.op, b.target) else None
            if changes is None:
                if a.target not in _VIEWS or not a.args or not isinstance(a.args[0], fx.Node):
                    where = f"'{b.name}' ({b.target})" if b is not None else "nothing"
                    raise ValueError(f"node {where} where the compiled graph has '{a.name}' ({a.target})")
                identities.add(a.name)
                names[a.name] = names[a.args[0].name]
                continue
            position += 1
            names[a.name] = b.name
            if changes:
                constants[a.name] = changes
            if a.op == "get_attr":
                x, y = _attribute(traced, str(a.target)), _attribute(other, str(b.target))
                if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and not _same(x, y):
                    attributes[str(a.target)] = y.detach()
        if position != len(second):
            raise ValueError(f"node '{second[position].name}' ({second[position].target}) has no counterpart")
        return cls(constants, attributes, frozenset(identities))

    def arguments(self, node: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``node``'s ``(args, kwargs)`` at this variant's shape: each recorded constant still in place replaced."""
        changes = self.constants.get(node.name)
        if not changes:
            return node.args, node.kwargs
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        for index, traced, value in changes:
            if index < len(leaves) and _same(leaves[index], traced):
                leaves[index] = value
        return pytree.tree_unflatten(leaves, spec)


class VariantInterpreter(fx.Interpreter):
    """Runs the graph with a `ShapeVariant`'s constants (the graph's own modules and parameters)."""

    def __init__(self, gm: fx.GraphModule, variant: ShapeVariant) -> None:
        super().__init__(gm)
        self.variant = variant

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.variant.identities:
            return self.env[n.args[0]]
        return super().run_node(n)

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = self.variant.arguments(n)
        return self.map_nodes_to_values(args, n), self.map_nodes_to_values(kwargs, n)

    def get_attr(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = self.variant.attributes.get(str(target))
        return super().get_attr(target, args, kwargs) if value is None else value


def signature(gm: fx.GraphModule, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Signature:
    """The shapes of ``gm``'s inputs for a call ``gm(*args, **kwargs)``."""
    values = graph_inputs(gm, tuple(args), dict(kwargs))
    return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in values)


def interpreter(gm: fx.GraphModule, args: Sequence[Any], kwargs: Mapping[str, Any]) -> fx.Interpreter:
    """An interpreter that runs ``gm`` on a batch like ``(args, kwargs)``: through its shape's variant if it has one."""
    variant = _variant(gm, signature(gm, args, kwargs))
    return fx.Interpreter(gm) if variant is None else VariantInterpreter(gm, variant)


def run_batch(gm: fx.GraphModule, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """``gm``'s output for one calibration batch of `fit_batches` (flat, as a graph from torch.export returns it,
    when the batch runs through its shape's variant)."""
    variant = _variant(gm, signature(gm, args, kwargs))
    if variant is None:
        return gm(*args, **kwargs)
    return VariantInterpreter(gm, variant).run(*graph_inputs(gm, tuple(args), dict(kwargs)), enable_io_processing=False)


def fit_batches(gm: fx.GraphModule, batches: Iterable[Batch]) -> list[Batch]:
    """``batches`` as ``gm`` runs them (module doc): as they are where ``gm`` takes their shape; else cut along dim 0
    into batches of the batch size ``gm`` is specialized to where it divides theirs (each part run as it is or
    through its shape's variant); else through their shape's variant. `CalibrationError` for a batch that has none."""
    fitted = []
    for args, kwargs in batches:
        shapes = signature(gm, args, kwargs)
        parts = _parts(gm, shapes, args, kwargs)
        if all(_runs(gm, signature(gm, *part)) for part in parts):
            fitted.extend(parts)
            continue
        raise CalibrationError(f"a calibration batch of {_untraced(gm, shapes)}")
    return fitted


def _untraced(gm: fx.GraphModule, shapes: Signature) -> str:
    return (
        f"inputs {_describe(gm, shapes)} does not fit the graph traced by torch.export, which is specialized to "
        f"{_describe(gm, traced_shapes(gm))}, and no trace at its shape was made: calibrate through lowbit.compile "
        "or lowbit.prepare (they trace the model at each calibration shape), or call "
        "lowbit.ir.variants.add_calibration_variants first"
    )


def check_batches(gm: fx.GraphModule, batches: Iterable[Batch]) -> None:
    """`CalibrationError` naming the batch, its inputs and why, for a calibration batch ``gm`` cannot run: one of a
    shape it has no trace at (`add_calibration_variants`), or one the model rejects. Each shape other than the
    traced one runs through ``gm`` once (in eval mode, without gradients)."""
    seen = {traced_shapes(gm)}
    modes = [(module, module.training) for module in gm.modules()]
    try:
        with torch.no_grad():
            for index, (args, kwargs) in enumerate(batches):
                shapes = signature(gm, args, kwargs)
                if shapes in seen:
                    continue
                seen.add(shapes)
                parts = _parts(gm, shapes, args, kwargs)
                if not all(_runs(gm, signature(gm, *part)) for part in parts):
                    raise CalibrationError(f"calibration batch {index}: {_untraced(gm, shapes)}")
                try:
                    run_batch(gm.eval(), *parts[0])
                except Exception as exc:  # noqa: BLE001 - whatever the model raises is why it rejects the shape
                    raise CalibrationError(
                        f"calibration batch {index} (inputs {_describe(gm, shapes)}): the model does not run at this "
                        f"shape: {_summary(_root(exc))}"
                    ) from exc
    finally:
        for module, training in modes:
            module.training = training


def add_calibration_variants(
    model: torch.nn.Module, gm: fx.GraphModule, batches: Iterable[Batch], leaf_modules: Sequence[Any] = ()
) -> None:
    """Make every calibration batch runnable through ``gm`` (traced from ``model``): trace ``model`` again, with
    ``gm``'s tracer, at each shape ``gm`` does not take as it is and record the constants that differ there as a
    `ShapeVariant` in ``gm.meta``. Graphs from torch.fx are traced again at every shape, since lowbit's own
    decompositions (`lowbit.ir.decompose`) write sizes into them too; where nothing differs there, they need no
    variant. A shape the model rejects (or whose trace differs from ``gm`` in more than constants) is a
    `CalibrationError` naming the batch, its inputs and why."""
    variants = dict(gm.meta.get(VARIANTS, {}))
    tracer = gm.meta.get("lowbit_tracer")
    checked: set[Signature] = set()
    for index, (args, kwargs) in enumerate(batches):
        shapes = signature(gm, args, kwargs)
        if shapes in checked:
            continue
        checked.add(shapes)
        where = f"calibration batch {index} (inputs {_describe(gm, shapes)})"
        args, kwargs = _parts(gm, shapes, args, kwargs)[0]
        shapes = signature(gm, args, kwargs)
        if shapes in variants or shapes == traced_shapes(gm) or (tracer == "export" and takes(gm, shapes)):
            continue
        try:
            other = trace(
                model,
                tuple(args),
                leaf_modules=tuple(leaf_modules),
                tracer=tracer or "auto",
                example_kwargs=dict(kwargs),
                free_batch=bool(gm.meta.get(FREE_BATCH)),
            )
        except TraceError as exc:
            raise CalibrationError(f"{where}: the model does not run at this shape: {_summary(_root(exc))}") from exc
        try:
            variant = ShapeVariant.between(gm, other)
        except ValueError as exc:
            raise CalibrationError(
                f"{where}: the model traced at this shape is another graph than at the example's shape ({exc}), so "
                f"it cannot calibrate the compiled one; give batches of shape {_describe(gm, traced_shapes(gm))}"
            ) from exc
        if variant.constants or variant.attributes or variant.identities or not takes(gm, shapes):
            variants[shapes] = variant
            log.info("calibration: traced the model at %s", _describe(gm, shapes))
    gm.meta[VARIANTS] = variants


def traced_shapes(gm: fx.GraphModule) -> Signature:
    """The shapes of ``gm``'s inputs when it was traced (shape propagation's record)."""
    metas = [node.meta.get("tensor_meta") for node in gm.graph.nodes if node.op == "placeholder"]
    return tuple(tuple(meta.shape) if hasattr(meta, "shape") else None for meta in metas)


def takes(gm: fx.GraphModule, shapes: Signature) -> bool:
    """Whether ``gm`` runs inputs of ``shapes`` as it is: for graphs from torch.export, every dimension it holds at a
    concrete size (not a symbol, as a free batch dimension is) has that size; graphs from torch.fx run any shape
    (`add_calibration_variants` records the shapes where they run with other constants)."""
    if gm.meta.get("lowbit_tracer") != "export":
        return True
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for node, shape, traced in zip(placeholders, shapes, traced_shapes(gm)):
        value = node.meta.get("val")
        dims = tuple(value.shape) if isinstance(value, torch.Tensor) else traced
        if shape is None or dims is None:
            continue
        if len(dims) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
            return False
    return True


def _variant(gm: fx.GraphModule, shapes: Signature) -> ShapeVariant | None:
    """The variant ``gm`` runs inputs of ``shapes`` through; None where it runs them as it is."""
    return gm.meta.get(VARIANTS, {}).get(shapes)


def _runs(gm: fx.GraphModule, shapes: Signature) -> bool:
    """Whether ``gm`` runs inputs of ``shapes``, as it is or through a variant."""
    return shapes in gm.meta.get(VARIANTS, {}) or takes(gm, shapes)


def _parts(gm: fx.GraphModule, shapes: Signature, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Batch]:
    """The batch as ``gm`` runs it: whole where ``gm`` takes its shape as it is; else cut along dim 0 into batches of
    the traced batch size where that divides its rows (every tensor input's dim 0); else whole. Rows are independent
    samples, and a trace at the traced batch size is the one most like the compiled graph (batches of one, above
    all: torch.export leaves out ops on dimensions of size 1)."""
    args, kwargs = tuple(args), dict(kwargs)
    if takes(gm, shapes):
        return [(args, kwargs)]
    traced = traced_shapes(gm)
    pairs = [(s, t) for s, t in zip(shapes, traced) if s is not None and t is not None and len(s) and len(t)]
    rows, size = (pairs[0][0][0], pairs[0][1][0]) if pairs else (0, 0)
    if not size or rows == size or rows % size or any((s[0], t[0]) != (rows, size) for s, t in pairs):
        return [(args, kwargs)]
    return [
        (tuple(_rows_of(a, rows, part) for a in args), {k: _rows_of(v, rows, part) for k, v in kwargs.items()})
        for part in (slice(start, start + size) for start in range(0, rows, size))
    ]


def _root(exc: BaseException) -> BaseException:
    """The exception at the bottom of ``exc``'s chain of causes (the model's own error under a tracer's report)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _describe(gm: fx.GraphModule, shapes: Signature) -> str:
    """``input_ids (2, 9), attention_mask (2, 9)``: the tensor inputs' names and shapes."""
    names = [str(node.target) for node in gm.graph.nodes if node.op == "placeholder"]
    return ", ".join(f"{name} {shape}" for name, shape in zip(names, shapes) if shape is not None)


def _rows_of(value: Any, rows: int, part: slice) -> Any:
    """``value[part]`` for a batch's tensors of ``rows`` samples; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value[part]
    return value


def _changes(a: fx.Node, b: fx.Node, names: Mapping[str, str]) -> tuple[tuple[int, Any, Any], ...] | None:
    """The constants of ``a`` that ``b`` (its counterpart at another shape) holds other values of, as
    ``(leaf index, value in a, value in b)``; None where they read other nodes or take other arguments."""
    leaves, spec = pytree.tree_flatten((a.args, a.kwargs))
    others, other_spec = pytree.tree_flatten((b.args, b.kwargs))
    if spec != other_spec:
        return None
    changes = []
    for index, (x, y) in enumerate(zip(leaves, others)):
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node) and names.get(x.name) == y.name):
                return None
        elif not _same(x, y):
            changes.append((index, x, y))
    return tuple(changes)


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    """The value at the dotted ``target`` of ``gm`` (None where there is none)."""
    value: Any = gm
    for name in target.split("."):
        value = getattr(value, name, None)
    return value


def _same(x: Any, y: Any) -> bool:
    """Whether two graph constants are equal (tensors by dtype, shape and value)."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and (x is y or (x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x, y))))
        )
    return type(x) is type(y) and bool(x == y)


__all__ = [
    "VARIANTS",
    "ShapeVariant",
    "Signature",
    "VariantInterpreter",
    "add_calibration_variants",
    "check_batches",
    "fit_batches",
    "interpreter",
    "run_batch",
    "signature",
    "takes",
    "traced_shapes",
]
