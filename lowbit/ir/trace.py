"""The tracing front door: turn a PyTorch model into lowbit's IR, a torch.fx GraphModule.

Two tracers, tried in this order by ``tracer="auto"``:

* ``"fx"``: torch.fx symbolic tracing. Standard ``torch.nn`` layers (Linear, Conv,
  Embedding, norms, activations, pooling...) and the user's ``leaf_modules`` stay
  opaque ``call_module`` nodes. Arguments of ``forward`` with no example value and a constant default
  (``attn_mask=None``, ``is_causal=False``) are bound to it, not graph inputs. Fails on data-dependent
  Python control flow.
* ``"export"``: ``torch.export.export`` (non-strict), then canonicalized
  (`lowbit.ir.canonicalize`) so layers are ``call_module`` nodes again. This is the
  tracer that handles transformers 5.x models (their own fx tracer no longer exists);
  causal LMs must be built with ``use_cache=False`` in their config, since a KV cache
  object can be neither an input nor an output of the graph. ``leaf_modules`` does not
  apply to it. Its graph is specialised to the example input shapes, except the batch dimension when the
  caller asks for it free (``free_batch``).

Under either tracer, ``nn.LSTM``, ``nn.GRU`` and ``nn.MultiheadAttention`` layers are decomposed into
``nn.Linear`` layers and primitive ops (`lowbit.ir.decompose`) so passes and backends see ordinary layers.
Whichever tracer succeeds, every node's result is shape-propagated into
``node.meta["tensor_meta"]`` and ``gm.meta["lowbit_tracer"]`` records the tracer. The
graph is traced in eval mode and shares its layers and tensors with the model, as
torch.fx does. A model neither tracer handles raises `TraceError` saying where and why
tracing broke and how to fix it.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import operator
import sysconfig
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph import _PyTreeCodeGen
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from lowbit.errors import TraceError
from lowbit.interop import onnx_import
from lowbit.ir import shapes
from lowbit.ir.canonicalize import canonicalize_exported
from lowbit.ir.decompose import (
    UnsupportedOptionError,
    decomposable,
    decompose,
    decomposed_for_export,
    output_structure,
)

logger = logging.getLogger("lowbit.trace")

TRACERS: tuple[str, ...] = ("fx", "export")
#: ``gm.meta`` key: True when torch.export traced the graph with the batch dimension of its inputs left free.
FREE_BATCH = "lowbit_free_batch"
LeafModule = type[nn.Module] | str

_TORCH_DIR = str(Path(torch.__file__).parent)
_STDLIB_DIR = sysconfig.get_paths()["stdlib"]
_LOWBIT_IR_DIR = str(Path(__file__).parent)


# --- the two tracers ------------------------------------------------------------


class LeafTracer(fx.Tracer):
    """fx tracer that also keeps the user's leaf modules (classes or module paths) opaque."""

    def __init__(self, leaf_modules: Sequence[LeafModule] = ()) -> None:
        super().__init__()
        self.leaf_classes = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_paths = frozenset(m for m in leaf_modules if isinstance(m, str))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # The base rule keeps every torch.nn module except containers (Sequential) a leaf.
        return self.is_user_leaf(m, module_qualified_name) or super().is_leaf_module(m, module_qualified_name)

    def is_user_leaf(self, m: nn.Module, module_qualified_name: str) -> bool:
        """The user asked to keep this module whole (``leaf_modules``)."""
        return isinstance(m, self.leaf_classes) or module_qualified_name in self.leaf_paths

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # A recurrent or attention layer returns a tuple: its call unpacks like one (``out, _ = self.lstm(x)``).
        out = super().call_module(m, forward, args, kwargs)
        return output_structure(m, out) if isinstance(out, fx.Proxy) and decomposable(m) else out


#: Types of a default value that the fx tracer binds as a constant when no example input is given for it.
_CONSTANT_DEFAULTS = (type(None), bool, int, float, str)


def unbound_defaults(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``model.forward`` left at a constant default (``attn_mask=None``, ``is_causal=False``).

    They are no graph inputs: the fx tracer binds them as constants, so branches such as
    ``if attn_mask is not None`` are decided at trace time, as they are in the eager call.
    """
    parameters = list(inspect.signature(model.forward).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    bound = {p.name for p in parameters[: len(args)] if p.kind in positional} | set(kwargs)
    return {
        p.name: p.default
        for p in parameters
        if p.name not in bound
        and p.kind in (*positional, inspect.Parameter.KEYWORD_ONLY)
        and type(p.default) in _CONSTANT_DEFAULTS
    }


def _drop_specialization_guards(gm: fx.GraphModule) -> None:
    """Remove the inputs fx keeps for constant-bound arguments, with the checks it attaches to them.

    fx leaves each bound argument as a defaulted placeholder that only feeds a guard
    (``_assert_is_none(arg)`` or ``torch._assert(arg == value)``); the traced graph never reads it otherwise.
    """
    for node in [n for n in gm.graph.nodes if n.op == "placeholder" and n.args]:
        guards = [_guard(user) for user in node.users]
        if not node.users or any(guard is None for guard in guards):
            continue
        for guard in guards:
            for step in guard:
                gm.graph.erase_node(step)
        gm.graph.erase_node(node)
    gm.recompile()


def _guard(user: fx.Node) -> list[fx.Node] | None:
    """The nodes of fx's specialization guard starting at ``user`` (in erase order), or None if it is none."""
    if user.target is _assert_is_none:
        return [user]
    checks = list(user.users)
    specialized = (
        user.target is operator.eq
        and len(checks) == 1
        and checks[0].target is torch._assert
        and "has been specialized to have value" in str(checks[0].args[1])
    )
    return [checks[0], user] if specialized else None


def _trace_fx(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], leaf_modules: Sequence[LeafModule]
) -> fx.GraphModule:
    tracer = LeafTracer(leaf_modules)
    graph = tracer.trace(model, concrete_args=unbound_defaults(model, args, kwargs) or None)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    _drop_specialization_guards(gm)
    return gm


def _trace_export(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    free_batch: bool = False,
    dynamic: Mapping[str, Mapping[int, shapes.SymbolicDim]] | None = None,
) -> fx.GraphModule:
    with decomposed_for_export(model, args, kwargs):
        if dynamic:
            program = torch.export.export(
                model, args, kwargs, strict=False, dynamic_shapes=_export_dynamic(model, args, kwargs, dynamic)
            )
        else:
            program = _export_free_batch(model, args, kwargs) if free_batch else None
        gm = canonicalize_exported(program or torch.export.export(model, args, kwargs, strict=False), model)
    if free_batch or dynamic:  # the graph itself serves calls (the torch target): its concrete batch sizes bind
        gm.meta[FREE_BATCH] = program is not None and not dynamic
    if dynamic:
        gm.meta[shapes.SYMBOLIC_DIMS] = _symbol_names(gm, dynamic)
    return gm


def _export_dynamic(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: Mapping[str, Mapping[int, Any]]
) -> Any:
    """torch.export's ``dynamic_shapes`` for the parsed spec ``dynamic``: keyed like the call (positional
    arguments by position, in a tuple) when there are positional arguments, else by keyword."""
    by_name = shapes.export_shapes(dynamic)
    if not args:
        return {name: by_name.get(name) for name in kwargs}
    names = list(inspect.signature(model.forward).parameters)[: len(args)]
    return (*(by_name.get(name) for name in names), *(by_name.get(name) for name in kwargs))


def _symbol_names(gm: fx.GraphModule, dynamic: Mapping[str, Mapping[int, shapes.SymbolicDim]]) -> dict[str, Any]:
    """torch's symbol of each dimension of ``dynamic`` (``"s43"``) → its `SymbolicDim`; `TraceError` where the model
    ties a dimension to a size or to an expression of other sizes."""
    found: dict[str, shapes.SymbolicDim] = {}
    placeholders = {str(node.target): node for node in gm.graph.nodes if node.op == "placeholder"}
    for name, axes in dynamic.items():
        value = placeholders[name].meta.get("val") if name in placeholders else None
        for axis, dim in axes.items():
            size = value.shape[axis] if isinstance(value, torch.Tensor) else None
            if not isinstance(size, torch.SymInt) or not size.node.expr.is_symbol:
                raise shapes.SymbolicDimError(
                    f"input '{name}' dimension {axis} ({dim.name}) did not stay symbolic in the traced graph (it is "
                    f"{size}): the model ties it to a fixed size or to other dimensions; leave it out of dynamic_shapes"
                )
            found[str(size.node.expr)] = dim
    return found


def _export_free_batch(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.export.ExportedProgram | None:
    """``model`` exported with dim 0 of every tensor input left free wherever the model allows it (``Dim.AUTO``,
    a size of 1 included), or None when that export fails (the export at the example shapes then runs)."""
    shapes = torch.export.ShapesCollection()
    for value in pytree.tree_leaves((args, kwargs)):
        if isinstance(value, torch.Tensor) and value.dim():
            shapes[value] = {0: torch.export.Dim.AUTO}
    try:
        with fx_config.patch(backed_size_oblivious=True):
            dynamic = shapes.dynamic_shapes(model, args, kwargs)
            program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
        _check_doubled_batch(model, program, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - the export at the example shapes reports a real failure
        logger.info("export with a free batch dimension failed (%s); exporting at the example shapes", _summary(exc))
        return None
    return program


def _check_doubled_batch(
    model: nn.Module, program: torch.export.ExportedProgram, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Raise unless ``program`` answers as ``model`` does on the example batch repeated twice: a size-oblivious
    export can keep a size-1 constant the batch indexes (transformers' masks at batch 1), which only another
    batch size shows."""

    def doubled(value: Any) -> Any:
        return torch.cat([value, value]) if isinstance(value, torch.Tensor) and value.dim() else value

    args2, kwargs2 = pytree.tree_map(doubled, (args, kwargs))
    with torch.no_grad():
        expected = pytree.tree_leaves(model(*args2, **kwargs2))
        got = pytree.tree_leaves(program.module()(*args2, **kwargs2))
    pairs = list(zip(expected, got, strict=True))
    for want, have in pairs:
        if isinstance(want, torch.Tensor) and not torch.allclose(have, want, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise ValueError("the export with a free batch differs from the model at twice the example batch")


# --- shape propagation ----------------------------------------------------------


def _fx_inputs(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Placeholder values of a plain fx graph: positional args, then kwargs or defaults."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = set(kwargs) - {n.target for n in placeholders}
    if unknown:
        raise TraceError(f"example_kwargs names inputs the traced forward does not take: {sorted(unknown)}")
    values = list(args)
    for node in placeholders[len(args) :]:
        if node.target in kwargs:
            values.append(kwargs[node.target])
        elif node.args:
            values.append(node.args[0])
        else:
            raise TraceError(f"no example value for input {node.target!r}")
    return values


def graph_inputs(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> list[Any]:
    """The values of ``gm``'s placeholders, in order, for a call ``gm(*args, **kwargs)``.

    Exported graphs take pytree-flattened inputs, so this flattens with their in-spec.
    """
    kwargs = kwargs or {}
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        return fx_pytree.tree_flatten_spec((tuple(args), kwargs), codegen.pytree_info.in_spec)
    return _fx_inputs(gm, args, kwargs)


def propagate_shapes(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
    """Run ``gm`` once on example inputs, recording ``node.meta["tensor_meta"]`` on every
    node that produces tensors (passes re-run it after rewriting the graph)."""
    with torch.no_grad():
        ShapeProp(gm).run(*graph_inputs(gm, args, kwargs), enable_io_processing=False)


# --- error reports --------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    """One tracer's exception."""

    tracer: str
    exc: BaseException


@dataclass(frozen=True)
class _Construct:
    """A Python construct that breaks tracing, recognised from the exception text."""

    needles: tuple[str, ...]
    description: str
    fix: str  # the construct-specific fix, tried before the generic leaf/wrap advice


_CONSTRUCTS: tuple[_Construct, ...] = (
    _Construct(
        ("cannot be used as inputs to control flow", "data-dependent expression"),
        "data-dependent control flow (`if`/`while`/`assert`/bool() on a tensor value)",
        "express the branch with tensor ops (torch.where)",
    ),
    _Construct(
        ("cannot be iterated",),
        "iterating over a traced tensor (a for-loop, tuple unpacking or *args)",
        "index the tensor or use tensor ops instead of a Python loop",
    ),
    _Construct(
        ("does not support item assignment",),
        "item assignment on a traced tensor (`x[i] = ...`)",
        "build the tensor out of place (torch.where, torch.cat, Tensor.index_put)",
    ),
    _Construct(("'len' is not supported",), "len() called on a traced tensor", "use x.shape[0] instead of len(x)"),
    _Construct(
        ("co_varnames is too small",),
        "a forward wrapped by a decorator whose signature torch.fx cannot rebuild",
        "use tracer='export' (or 'auto'), which handles such models",
    ),
    _Construct(
        ("register a pytree",),
        "an input or output of a type torch.export cannot flatten (e.g. a KV cache object)",
        "build transformers causal LMs with use_cache=False in their config, or register the type as a pytree node",
    ),
    _Construct(
        ("Constraints violated",),
        "a dimension of dynamic_shapes that the model ties to a size or to other dimensions",
        "leave that dimension out of dynamic_shapes or narrow its range (TORCH_LOGS=+dynamic shows the constraint)",
    ),
    _Construct(
        ("target=torch._assert", "AssertionError"),
        "an assertion of the model (torch._assert, assert) that fails for the example inputs",
        "pass example inputs of the shape and size the model expects",
    ),
    _Construct(
        ("Proxy",),
        "a non-torch function called on a traced tensor (int(), float(), numpy...)",
        "keep the computation in torch ops",
    ),
)


def _construct(exc: BaseException) -> _Construct | None:
    text = f"{type(exc).__name__}: {exc}"
    return next((c for c in _CONSTRUCTS if any(needle in text for needle in c.needles)), None)


def _summary(exc: BaseException) -> str:
    """One line: the exception's qualified type and the first non-empty line of its message."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{name}: {first}" if first else name


def _is_internal(filename: str) -> bool:
    """Frames of torch, the standard library and this package are not the user's code."""
    if filename.startswith((_TORCH_DIR, _LOWBIT_IR_DIR, "<")):
        return True
    return filename.startswith(_STDLIB_DIR) and "-packages" not in filename


def _failure_site(model: nn.Module, exc: BaseException) -> tuple[str, nn.Module, str | None]:
    """Where ``exc`` was raised: the innermost module of ``model`` that was running
    (path, module) and the innermost user source line inside the model, if any."""
    paths = {id(m): name for name, m in model.named_modules()}
    path, module, location = "", model, None
    inside_model = False
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in paths:
            inside_model = True
            path, module = paths[id(owner)], owner
        filename = frame.f_code.co_filename
        if inside_model and not _is_internal(filename):
            location = f"{filename}:{lineno}: {linecache.getline(filename, lineno).strip()}"
    return path, module, location


def _hint(path: str, cls_name: str, construct: _Construct | None) -> str:
    """What the user can do: the construct's own fix, a leaf module, torch.fx.wrap."""
    if path:
        leaf = f"mark the module a leaf with leaf_modules=({cls_name},) or leaf_modules=({path!r},)"
    else:
        leaf = "move that code into a submodule and mark it a leaf with leaf_modules=(TheClass,)"
    steps = [construct.fix] if construct else []
    steps += [f"{leaf} so fx keeps it as one opaque call", "wrap an offending free function with torch.fx.wrap"]
    return "; or ".join(steps)


def _primary(model: nn.Module, failures: Sequence[_Failure]) -> _Failure:
    """The failure to explain: the first one raised inside the model's own code, else the
    last one (torch.export gets further than fx on most models)."""
    return next((f for f in failures if _failure_site(model, f.exc)[2] is not None), failures[-1])


def _explain(model: nn.Module, failures: Sequence[_Failure], primary: _Failure) -> str:
    """The TraceError message: where tracing broke, on what construct, and the fix."""
    construct = _construct(primary.exc)
    path, module, location = _failure_site(model, primary.exc)
    cls_name = type(module).__name__
    where = f"module {path!r} ({cls_name})" if path else f"the top-level module ({cls_name})"
    what = construct.description if construct else "an unsupported operation"
    lines = [f"cannot trace {type(model).__name__}: {what} in {where}"]
    if location:
        lines.append(f"  at {location}")
    lines += [f"  {f.tracer} tracer: {_summary(f.exc)}" for f in failures]
    lines.append(f"  hint: {_hint(path, cls_name, construct)}")
    return "\n".join(lines)


# --- front door -----------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, restoring every submodule's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _normalize_inputs(
    example_inputs: Any, example_kwargs: dict[str, Any] | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tuple of positional args (anything else is the single argument) and a kwargs dict."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return args, dict(example_kwargs or {})


def _chain(tracer: str) -> tuple[str, ...]:
    if tracer == "auto":
        return TRACERS
    if tracer in TRACERS:
        return (tracer,)
    raise TraceError(f"unknown tracer {tracer!r}; choose one of 'auto', {', '.join(map(repr, TRACERS))}")


def _trace_with(
    name: str,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    leaf_modules: Sequence[LeafModule],
    free_batch: bool = False,
    dynamic: Mapping[str, Mapping[int, shapes.SymbolicDim]] | None = None,
) -> fx.GraphModule:
    """Trace with one tracer, shape-propagate and check the graph (model already in eval)."""
    if name == "fx":
        gm = _trace_fx(model, args, kwargs, leaf_modules)
    else:
        gm = _trace_export(model, args, kwargs, free_batch, dynamic)
    gm.graph.lint()
    propagate_shapes(gm, args, kwargs)
    if decompose(gm, LeafTracer(leaf_modules).is_user_leaf):
        gm.graph.lint()
        propagate_shapes(gm, args, kwargs)
    gm.meta["lowbit_tracer"] = name
    return gm


def trace(
    model: nn.Module | str | Path,
    example_inputs: Any = None,
    leaf_modules: Sequence[LeafModule] = (),
    tracer: str = "auto",
    example_kwargs: dict[str, Any] | None = None,
    free_batch: bool = False,
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """Trace ``model`` into lowbit's canonical fx.GraphModule.

    ``example_inputs`` is a tuple of positional arguments (a single tensor is accepted),
    ``example_kwargs`` the keyword arguments (``input_ids``, ``attention_mask`` for HF
    models). ``leaf_modules`` (module classes or module paths) stay opaque under the fx
    tracer. ``tracer`` is ``"fx"``, ``"export"`` or ``"auto"`` (fx, then export; build
    transformers causal LMs with ``use_cache=False`` for it). Raises `TraceError` naming
    the module, construct and source line that broke tracing, with a fix. ``free_batch`` lets torch.export leave
    the batch dimension (dim 0 of each tensor input) symbolic where the model allows it, for a graph that runs as
    it is (the torch target); ``gm.meta[FREE_BATCH]`` says whether it did. ``model`` may be the path of an ONNX file
    (`lowbit.interop.onnx_import`; ``example_inputs`` then default to its input shapes). ``dynamic_shapes``
    (`lowbit.ir.shapes`: per input name, ``{axis: (min, max) or torch.export.Dim}``) traces with torch.export, those
    dimensions symbolic; ``gm.meta[shapes.SYMBOLIC_DIMS]`` maps torch's symbols to them.
    """
    chain = _chain("export" if dynamic_shapes is not None else tracer)
    if onnx_import.is_onnx(model):
        imported = onnx_import.load(model, example_inputs)
        model, example_inputs = imported.module, imported.example_inputs
    if not isinstance(model, nn.Module):
        raise TraceError(f"can only trace a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _normalize_inputs(example_inputs, example_kwargs)
    dynamic = shapes.parse(dynamic_shapes, _named_inputs(model, args, kwargs)) if dynamic_shapes is not None else None
    failures: list[_Failure] = []
    with _eval_mode(model):
        for index, name in enumerate(chain):
            try:
                gm = _trace_with(name, model, args, kwargs, leaf_modules, free_batch, dynamic)
            except (UnsupportedOptionError, shapes.SymbolicDimError):
                raise  # the model traced; a layer uses an option with no decomposition, or a dimension is not free
            except Exception as exc:  # noqa: BLE001 - any tracer failure moves on to the next one
                then = f"; trying {chain[index + 1]}" if index + 1 < len(chain) else ""
                logger.info("%s tracer cannot trace %s (%s)%s", name, type(model).__name__, _summary(exc), then)
                failures.append(_Failure(name, exc))
                continue
            logger.info("traced %s with %s: %d nodes", type(model).__name__, name, len(gm.graph.nodes))
            return gm
    primary = _primary(model, failures)
    raise TraceError(_explain(model, failures, primary)) from primary.exc


def _named_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor arguments of a call by ``forward``'s parameter names."""
    names = list(inspect.signature(model.forward).parameters)[: len(args)]
    named = {**dict(zip(names, args)), **kwargs}
    return {name: value for name, value in named.items() if isinstance(value, torch.Tensor)}


@dataclass(frozen=True)
class TraceAttempt:
    """One tracer's result on a model, as reported by `diagnose`."""

    tracer: str
    ok: bool
    seconds: float
    nodes: int
    message: str


def _attempt(
    name: str,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    leaf_modules: Sequence[LeafModule],
) -> TraceAttempt:
    start = time.perf_counter()
    try:
        gm = _trace_with(name, model, args, kwargs, leaf_modules)
    except Exception as exc:  # noqa: BLE001 - the failure is the report
        failure = _Failure(name, exc)
        return TraceAttempt(name, False, time.perf_counter() - start, 0, _explain(model, [failure], failure))
    seconds = time.perf_counter() - start
    layers = sum(1 for n in gm.graph.nodes if n.op == "call_module")
    message = f"{len(gm.graph.nodes)} nodes, {layers} call_module layers"
    return TraceAttempt(name, True, seconds, len(gm.graph.nodes), message)


def diagnose(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    leaf_modules: Sequence[LeafModule] = (),
) -> list[TraceAttempt]:
    """Try every tracer on ``model`` and report, for each, success, time, graph size or the error."""
    args, kwargs = _normalize_inputs(example_inputs, example_kwargs)
    with _eval_mode(model):
        return [_attempt(name, model, args, kwargs, leaf_modules) for name in TRACERS]


__all__ = [
    "TRACERS",
    "LeafTracer",
    "TraceAttempt",
    "diagnose",
    "graph_inputs",
    "propagate_shapes",
    "trace",
    "unbound_defaults",
]
