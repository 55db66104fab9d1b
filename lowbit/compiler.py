"""`compile` and `prepare`: trace a model, run a recipe's (or the given) passes, hand the graph to a backend.

Everything that can be checked without tracing (recipe, pass order, target,
calibration) is checked first, so a bad call fails in milliseconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from lowbit import artifact, recipes
from lowbit.backends import Runner, check_target, get_backend
from lowbit.errors import ArtifactError, BackendError, LowbitError
from lowbit.interface import Interface, output_spec
from lowbit.ir.trace import trace
from lowbit.ir.variants import add_calibration_variants
from lowbit.passes.base import Pass
from lowbit.passes.pipeline import Pipeline, PipelineReport

log = logging.getLogger("lowbit.compile")

#: Relative error to eager (on the example inputs) above which the report warns.
MAX_REL_ERROR = 0.1
#: The report fields an artifact's manifest keeps (`CompileReport.summary`, `CompileReport.from_summary`).
_SUMMARY_FIELDS = (
    "recipe", "tracer", "parameters", "bytes_before", "bytes_after", "max_abs_diff", "rel_error",
    "trace_s", "passes_s", "backend_s", "fallbacks", "max_rel_error",
)  # fmt: skip


@dataclass
class CompileReport:
    """What compile did: sizes, agreement with eager on the example inputs, and timings."""

    target: Any
    recipe: str | None
    tracer: str
    parameters: int
    bytes_before: int
    bytes_after: int
    max_abs_diff: float
    rel_error: float
    trace_s: float
    passes_s: float
    backend_s: float
    pipeline: PipelineReport = field(default_factory=PipelineReport)
    #: Layers the backend ran on a slower correct path instead of its low-bit kernel: "layer: reason".
    fallbacks: list[str] = field(default_factory=list)
    #: TVM kernel tuning: one `TuningResult` (kernel, spec, knobs, times, trials measured now) per kernel signature.
    tuning: list[Any] = field(default_factory=list)
    #: `warnings` flags a relative error to eager above this.
    max_rel_error: float = MAX_REL_ERROR

    @property
    def warnings(self) -> list[str]:
        """What a user should look at before trusting the compiled model."""
        if self.rel_error > self.max_rel_error:  # False for NaN (not measured)
            return [
                f"relative error to eager {self.rel_error:.3g} exceeds {self.max_rel_error:g}: the compiled model "
                "does not reproduce the original (too few bits, or a pass or kernel bug); check it on real data"
            ]
        return []

    def summary(self) -> dict[str, Any]:
        """The fields an artifact's manifest keeps (JSON types)."""
        return {name: getattr(self, name) for name in _SUMMARY_FIELDS}

    @classmethod
    def from_summary(cls, target: Any, summary: Mapping[str, Any]) -> CompileReport:
        """The report of a loaded artifact: what its manifest kept (`summary`), no pass table or tuning."""
        absent = {"recipe": None, "tracer": "?", "parameters": 0, "bytes_before": 0, "bytes_after": 0}
        absent |= {"fallbacks": [], "max_rel_error": MAX_REL_ERROR}
        values = {name: summary.get(name, absent.get(name, float("nan"))) for name in _SUMMARY_FIELDS}
        return cls(target=target, **values)

    @property
    def compression(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    def __str__(self) -> str:
        lines = [
            f"target            {self.target}" + (f" (recipe {self.recipe})" if self.recipe else ""),
            f"tracer            {self.tracer}",
            f"parameters        {self.parameters:,}",
            f"size              {_mb(self.bytes_before)} -> {_mb(self.bytes_after)} ({self.compression:.2f}x smaller)",
            "vs eager          "
            + (
                "not measured (cross-compiled: cannot run here)"
                if math.isnan(self.max_abs_diff)
                else f"max abs diff {self.max_abs_diff:.3g}, relative error {self.rel_error:.3g}"
            ),
            f"time              trace {self.trace_s:.2f}s, passes {self.passes_s:.2f}s, backend {self.backend_s:.2f}s",
        ]
        lines += [f"fallback          {item}" for item in self.fallbacks]
        lines += [f"WARNING           {item}" for item in self.warnings]
        if self.tuning:
            measured = sum(result.measured_now for result in self.tuning)
            lines.append(
                f"tuning            {len(self.tuning)} kernel signature(s) from the tuning database, "
                f"{measured} candidate(s) measured by this compile"
            )
        if self.pipeline.passes:
            lines += ["", self.pipeline.table()]
        return "\n".join(lines)


class CompiledModel:
    """A compiled model: call it like the original; ``graph`` is the transformed GraphModule (None for a loaded
    TVM artifact).

    Every call checks its inputs first (`lowbit.interface.Interface`: finite floats, indices within their
    tables) and returns eager's output structure.
    """

    def __init__(
        self,
        graph: fx.GraphModule | None,
        runner: Runner,
        report: CompileReport,
        info: dict[str, Any],
        interface: Interface | None = None,
        source: Path | None = None,
    ) -> None:
        self.graph = graph
        #: The artifact directory this model was loaded from (None: compiled in this process).
        self.source = source
        self.report = report
        self.interface = interface or Interface()
        self._runner = runner
        self._info = info

    @property
    def runner(self) -> Runner:
        """The backend's runner (a TVM `Runner`, or the GraphModule itself on the torch target)."""
        return self._runner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.interface.check(args, kwargs)
        with torch.no_grad():
            return self.interface.rebuild(self._runner(*args, **kwargs))

    def export(
        self, path: str | Path, overwrite: bool = False, format: str = "lowbit", int8: str | None = None
    ) -> Path:
        """Write the compiled model, its weights and ``manifest.json`` to the directory ``path`` (a loaded artifact
        is copied); ``format="onnx"`` writes the graph as ``model.onnx`` for ONNX Runtime instead
        (`lowbit.interop.onnx_export`), its int8-activation linears ``int8="fast"`` (the default: ONNX Runtime's int8
        ``MatMulNBits``) or ``"exact"`` (lowbit's arithmetic bit for bit; docs/onnx.md)."""
        if format == "onnx":
            from lowbit.interop import onnx_export

            mode = onnx_export.DEFAULT_INT8 if int8 is None else int8
            onnx_export.check_int8(mode)
            if self.graph is None:
                raise ArtifactError("ONNX export needs the compiled graph; a loaded TVM artifact has none")
            inputs = onnx_export.example_inputs(self.graph, self._info.get("inputs", []))
            info = {**self._info, "interface": self.interface.as_dict(), "report": self.report.summary()}
            return onnx_export.write(self.graph, inputs, path, info, overwrite=overwrite, int8=mode)
        if format != "lowbit":
            raise ArtifactError(f"unknown export format {format!r}; known: 'lowbit', 'onnx'")
        if int8 is not None:
            raise ArtifactError(f"int8={int8!r} applies to format='onnx' only")
        if self.source is not None:
            return artifact.copy(self.source, path, overwrite=overwrite)
        info = {**self._info, "interface": self.interface.as_dict(), "report": self.report.summary()}
        return artifact.write(path, self.report.target, self._runner, info, overwrite=overwrite)


def compile(
    model: torch.nn.Module | str | Path,
    example_inputs: Any = None,
    *,
    recipe: str | Path | recipes.Recipe | None = None,
    passes: Sequence[Pass | str] | None = None,
    target: Any = None,
    calibration: Any = None,
    cache_dir: str | Path | None = None,
    tune: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
    leaf_modules: Sequence[Any] = (),
    verify: bool = True,
    dump_dir: str | Path | None = None,
    max_rel_error: float = MAX_REL_ERROR,
    strict: bool = False,
    dynamic_shapes: Any = None,
    tokenizer: Any = None,
) -> CompiledModel:
    """Trace ``model``, run the convert-stage passes of ``recipe`` (or ``passes``), compile for ``target``.

    ``model`` may also be a graph returned by `prepare` (trained or not): it is not traced again.

    ``target`` defaults to the recipe's target, else ``"torch"`` (the reference backend).
    ``calibration`` is an iterable of input batches like ``example_inputs``, of any batch size and sequence length
    the model takes (where the traced graph is specialized to the example's shapes, the model is traced again at
    each other calibration shape, `lowbit.ir.variants`); a shape the model rejects is a `CalibrationError`.
    ``tune`` (TVM targets): None uses tuning records already in ``cache_dir`` (default
    ``$LOWBIT_CACHE_DIR`` or ``~/.cache/lowbit/tvm``) and the shipped database; False uses
    the hand schedules; True tunes with the recipe's ``tune`` settings; a mapping
    overrides some of them (e.g. ``{"trials": 8}``).
    The report warns (and logs a warning) when the relative error to eager exceeds ``max_rel_error``.
    Low-bit layers the target's kernels cannot serve (3-bit codes, uneven groups...) run dequantized: each is
    logged as a warning before the build, with the nearest supported setting; ``strict=True`` raises
    `UnsupportedLayerError` for them instead. Progress goes to the ``lowbit`` logger at INFO level.

    ``dynamic_shapes``: the ranges of input dimensions one compiled model serves, per input name ``{axis: (min,
    max)}`` or with ``torch.export.Dim`` values: ``{"input_ids": {0: (1, 32), 1: (1, 128)}, "attention_mask": ...}``
    (`lowbit.ir.shapes`). The graph is traced and compiled with those dimensions symbolic (torch and x86 targets);
    a call outside a range raises `InputShapeError` before anything runs. For transformers causal LMs of the families
    `lowbit.llm.family` knows, the batch and sequence ranges of ``input_ids`` instead give a
    `lowbit.llm.model.CompiledCausalLM` with a KV-cache decoder and ``generate``; ``tokenizer`` is saved with its
    artifact.

    ``model`` may be the path of an ONNX file: it is imported into the same graph IR (`lowbit.interop.onnx_import`),
    with ``example_inputs`` defaulting to the shapes of its inputs.
    """
    model, example_inputs = _imported(model, example_inputs)
    example_inputs = _as_tuple(example_inputs)
    recipe_obj, pipeline = build_pipeline(recipe, passes, "convert", verify, dump_dir)
    target = check_target(target if target is not None else (recipe_obj.target if recipe_obj else "torch"))
    backend = get_backend(target)
    calib = pipeline.calibration_set(calibration, example_inputs, example_kwargs)
    causal_lm = None
    if dynamic_shapes is not None and _generates(model):
        from lowbit.llm.compile import CausalLMCompile

        causal_lm = CausalLMCompile.check(model, dynamic_shapes, example_inputs, example_kwargs, backend)
    symbolic = dynamic_shapes if dynamic_shapes is not None and not causal_lm else None
    if symbolic is not None:
        _check_symbolic_target(backend, target)

    start = time.perf_counter()
    log.info("tracing %s", type(model).__name__)
    with causal_lm.tracing() if causal_lm else contextlib.nullcontext():
        free_batch = backend.name == "torch" and not causal_lm and symbolic is None
        gm = _graph_of(model, example_inputs, leaf_modules, example_kwargs, free_batch, symbolic)
        if calib is not None and gm is not model:
            add_calibration_variants(model, gm, calib, leaf_modules)
    interface = Interface.of(gm)  # before the passes, which may replace the embedding tables
    trace_s = time.perf_counter() - start
    graph = pipeline(gm, calibration=calib, example_inputs=example_inputs, example_kwargs=example_kwargs)
    passes_s = time.perf_counter() - start - trace_s
    log.info("building for target %s", target)
    if causal_lm:
        runner = causal_lm.build(graph, backend, cache_dir, _tune_settings(tune, recipe_obj), strict)
    else:
        if backend.name != "torch":
            _flatten_output(graph)
        runner = backend.compile(
            graph, example_inputs, cache_dir=cache_dir, tune=_tune_settings(tune, recipe_obj), strict=strict
        )
    backend_s = time.perf_counter() - start - trace_s - passes_s

    with causal_lm.tracing() if causal_lm else contextlib.nullcontext():
        expected = _eager(model, example_inputs, example_kwargs)
    interface = dataclasses.replace(interface, output=output_spec(expected))
    runner.interface = interface  # TVM runners also check inputs themselves and save it with the library
    if runner.runnable:
        with torch.no_grad():
            actual = (
                causal_lm.run(runner)
                if causal_lm
                else interface.rebuild(runner(*example_inputs, **(example_kwargs or {})))
            )
        attended = attended_positions(interface.names, example_inputs, example_kwargs)
        max_abs, rel = output_agreement(expected, actual, attended)
    else:
        log.info("the compiled model cannot run on this machine (cross-compiled); agreement with eager not measured")
        max_abs = rel = float("nan")
    report = CompileReport(
        target=target,
        recipe=recipe_obj.name if recipe_obj else None,
        tracer=gm.meta.get("lowbit_tracer", "?"),
        parameters=sum(p.numel() for p in model.parameters()),
        bytes_before=state_bytes(model),
        bytes_after=state_bytes(graph),
        max_abs_diff=max_abs,
        rel_error=rel,
        trace_s=trace_s,
        passes_s=passes_s,
        backend_s=backend_s,
        pipeline=pipeline.report,
        fallbacks=[item.describe() for item in runner.fallbacks],
        tuning=list(runner.tuning),
        max_rel_error=max_rel_error,
    )
    for warning in report.warnings:
        log.warning(warning)
    info = {
        "recipe": report.recipe,
        "passes": [{"pass": p.name, **p.config.as_dict()} for p in pipeline.passes],
        "inputs": _signature(example_inputs, example_kwargs),
    }
    if causal_lm:
        return causal_lm.compiled(graph, runner, report, info, interface, tokenizer)
    return CompiledModel(graph, runner, report, info, interface)


def prepare(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    recipe: str | Path | recipes.Recipe | None = None,
    passes: Sequence[Pass | str] | None = None,
    calibration: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
    leaf_modules: Sequence[Any] = (),
    verify: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` and run the prepare-stage (training-time) passes; returns a trainable GraphModule."""
    example_inputs = _as_tuple(example_inputs)
    _, pipeline = build_pipeline(recipe, passes, "prepare", verify, None)
    calib = pipeline.calibration_set(calibration, example_inputs, example_kwargs)
    gm = _graph_of(model, example_inputs, leaf_modules, example_kwargs, free_batch=False)
    if calib is not None and gm is not model:
        add_calibration_variants(model, gm, calib, leaf_modules)
    graph = pipeline(gm, calibration=calib, example_inputs=example_inputs, example_kwargs=example_kwargs)
    return graph.train(model.training)


def _imported(model: Any, example_inputs: Any) -> tuple[torch.nn.Module, Any]:
    """``model`` and its example inputs, an ONNX file imported as a torch module."""
    from lowbit.interop import onnx_import

    if not onnx_import.is_onnx(model):
        if example_inputs is None:
            raise LowbitError("example_inputs are required (only an ONNX file has its own input shapes)")
        return model, example_inputs
    imported = onnx_import.load(model, example_inputs)
    return imported.module, imported.example_inputs


def _eager(model: torch.nn.Module, example_inputs: tuple, example_kwargs: Mapping[str, Any] | None) -> Any:
    """The original model's output on the example inputs (in eval mode, without autograd)."""
    was_training = model.training
    with torch.no_grad():
        expected = model.eval()(*example_inputs, **(example_kwargs or {}))
    model.train(was_training)
    return expected


def output_agreement(expected: Any, actual: Any, attended: torch.Tensor | None = None) -> tuple[float, float]:
    """Max abs difference and relative (Frobenius) error over all floating tensors of two outputs; with an
    ``attended`` [batch, tokens] boolean, only the attended token positions of outputs that lead with those two
    dimensions count (a padded position's state is not defined by the model, and no consumer reads it)."""
    pairs = list(zip(_tensors(expected), _tensors(actual)))
    floats = [_attended(e.float(), a.float(), attended) for e, a in pairs if e.is_floating_point()]
    if not floats:
        return 0.0, 0.0
    max_abs = max((e - a).abs().max().item() if e.numel() else 0.0 for e, a in floats)
    num = sum(((e - a) ** 2).sum().item() for e, a in floats)
    den = sum((e**2).sum().item() for e, _ in floats)
    return max_abs, (num / den) ** 0.5 if den else 0.0


def attended_positions(names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> Any:
    """The token positions a transformers-style ``attention_mask`` input (2-D, ones and zeros) attends, or None."""
    named = dict(zip(names, args)) | dict(kwargs or {})
    mask = named.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if not bool(((mask == 0) | (mask == 1)).all()) or bool((mask != 0).all()):
        return None
    return mask != 0


def _attended(expected: torch.Tensor, actual: torch.Tensor, attended: torch.Tensor | None) -> tuple[Any, Any]:
    if attended is None or expected.shape[:2] != attended.shape or actual.shape != expected.shape:
        return expected, actual
    return expected[attended], actual[attended]


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def build_pipeline(
    recipe: Any,
    passes: Sequence[Pass | str] | None,
    stage: str,
    verify: bool = True,
    dump_dir: str | Path | None = None,
) -> tuple[recipes.Recipe | None, Pipeline]:
    """The recipe (loaded if named) and a pipeline of its ``stage`` passes, or of ``passes``."""
    if recipe is not None and passes is not None:
        raise LowbitError("give either recipe= or passes=, not both (copy the recipe and edit its passes instead)")
    recipe_obj = recipe if isinstance(recipe, recipes.Recipe) or recipe is None else recipes.load(recipe)
    pass_list = recipe_obj.build(stage) if recipe_obj else list(passes or [])
    return recipe_obj, Pipeline(pass_list, verify=verify, dump_dir=dump_dir)


def _graph_of(
    model: torch.nn.Module,
    example_inputs: tuple,
    leaf_modules: Sequence[Any],
    example_kwargs: Mapping[str, Any] | None,
    free_batch: bool,
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """A graph lowbit traced before (e.g. from `prepare`, then trained) is used as it is; anything else is traced,
    with a free batch dimension where the graph runs as it is (``free_batch``: the torch target), or with the
    symbolic dimensions of ``dynamic_shapes``."""
    if isinstance(model, fx.GraphModule) and "lowbit_tracer" in model.meta:
        if dynamic_shapes is not None:
            raise LowbitError("dynamic_shapes apply when a model is traced; a prepared graph keeps its shapes")
        return model
    return trace(
        model,
        example_inputs,
        leaf_modules=tuple(leaf_modules),
        example_kwargs=example_kwargs,
        free_batch=free_batch,
        dynamic_shapes=dynamic_shapes,
    )


def _generates(model: Any) -> bool:
    """Whether ``model`` is a transformers model that generates text (a causal LM), which ``dynamic_shapes``
    compiles to a KV-cache decoder (`lowbit.llm`)."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def _check_symbolic_target(backend: Any, target: Any) -> None:
    """`BackendError` unless ``backend`` compiles symbolic dimensions: the torch target and x86 CPUs."""
    if backend.name == "torch" or getattr(backend.toolchain, "arch", None) == "x86_64":
        return
    raise BackendError(
        f"dynamic_shapes are compiled for the torch and x86 targets, not {target!r}: compile for fixed shapes "
        "(without dynamic_shapes), once per shape to serve"
    )


def _flatten_output(gm: fx.GraphModule) -> None:
    """Make ``gm`` return a flat tuple of its output's leaves (as graphs from torch.export do): backends other than
    torch return tensors only, and `Interface.rebuild` restores eager's structure (a ``ModelOutput``, a dict)."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    value = output.args[0]
    if isinstance(value, fx.Node) or (isinstance(value, tuple) and all(isinstance(v, fx.Node) for v in value)):
        return
    output.args = (tuple(torch.utils._pytree.tree_leaves(value)),)
    gm.recompile()


def _tune_settings(tune: Any, recipe: recipes.Recipe | None) -> Any:
    """``tune`` with the recipe's ``tune`` block underneath: True takes it whole, a mapping overrides keys of it."""
    if not tune or recipe is None:
        return tune
    settings = dataclasses.asdict(recipe.tune)
    if tune is True:
        return settings
    return {**settings, **tune} if isinstance(tune, Mapping) else tune


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _tensors(value: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _signature(args: tuple, kwargs: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    named = [(str(i), a) for i, a in enumerate(args)] + list((kwargs or {}).items())
    return [
        {"name": name, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for name, v in named
        if isinstance(v, torch.Tensor)
    ]


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
