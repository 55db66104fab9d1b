"""Compiling a causal LM for generation: shape limits, the decoder on the chosen target, its check against the graph.

``lowbit.compile(llm, example_inputs, dynamic_shapes=...)`` runs the passes on the traced graph as usual, then reads
the decoder's weights from the transformed graph (`weights.read_weights`) and builds it for the target: the torch
reference decoder, or the Relax module of `lower` for CPU TVM targets. Before anything is returned, the torch
decoder's logits on the example inputs are compared with the transformed graph's: a pass that added computation
the decoder does not read (an unmerged adapter, a rotation left in the graph) is refused by name instead of
generating silently wrong text.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from lowbit.errors import GenerationError
from lowbit.interface import Interface
from lowbit.llm.family import DecoderSpec, check_rotary, decoder_spec, rotary_table
from lowbit.llm.generate import Decoder, all_logits
from lowbit.llm.reference import TorchDecoder
from lowbit.llm.runtime import DecoderLayout
from lowbit.llm.weights import FloatActivations, read_weights

log = logging.getLogger("lowbit.compile")

#: Tokens per prefill step, besides the one-token decode step (a prompt runs in the largest that fit, padded).
PREFILL_CHUNKS = (16, 128)
#: Relative error of the torch decoder to the transformed graph above which the lowering refuses the model.
MAX_GRAPH_ERROR = 1e-4


@dataclass(frozen=True)
class ShapeLimits:
    """The batch and sequence ranges one compiled decoder serves (from ``dynamic_shapes``)."""

    max_batch: int
    max_context: int


def shape_limits(dynamic_shapes: Any, example_ids: torch.Tensor, spec: DecoderSpec) -> ShapeLimits:
    """The limits of ``dynamic_shapes`` for the token ids (keyed ``"input_ids"`` or 0): per dimension a
    ``(min, max)`` pair or a ``torch.export.Dim``; an absent dimension stays at the example's size."""
    if not isinstance(dynamic_shapes, Mapping):
        raise GenerationError(
            "dynamic_shapes must map the input name to its dimensions, e.g. {'input_ids': {0: (1, 4), 1: (1, 2048)}}"
        )
    unknown = sorted(str(key) for key in dynamic_shapes if key not in ("input_ids", 0, "attention_mask"))
    if unknown:
        raise GenerationError(f"dynamic_shapes names {unknown}; a causal LM takes 'input_ids' (and 'attention_mask')")
    dims = dynamic_shapes.get("input_ids", dynamic_shapes.get(0)) or {}
    if not isinstance(dims, Mapping) or any(dim not in (0, 1) for dim in dims):
        raise GenerationError(f"dynamic_shapes['input_ids'] must map dimensions 0 and/or 1 to ranges, got {dims!r}")
    batch, length = example_ids.shape
    low_batch, max_batch = _range(dims.get(0), batch, "batch (dimension 0)")
    low_length, max_context = _range(dims.get(1), length, "sequence (dimension 1)")
    if not low_batch <= batch <= max_batch or not low_length <= length <= max_context:
        raise GenerationError(
            f"the example input_ids {tuple(example_ids.shape)} lie outside dynamic_shapes "
            f"(batch {low_batch}..{max_batch}, sequence {low_length}..{max_context})"
        )
    if max_context > spec.max_positions:
        raise GenerationError(
            f"a context of {max_context} tokens exceeds the model's max_position_embeddings={spec.max_positions}"
        )
    if spec.sliding_window is not None and max_context > spec.sliding_window:
        raise GenerationError(
            f"{spec.model_type} attends within a window of {spec.sliding_window} tokens, which the cache lowering "
            f"does not implement: compile with a context of at most {spec.sliding_window}"
        )
    return ShapeLimits(max_batch, max_context)


def _range(value: Any, example: int, what: str) -> tuple[int, int]:
    if value is None:
        return example, example
    if hasattr(value, "min") and hasattr(value, "max"):  # torch.export.Dim
        low, high = int(value.min), int(value.max)
    elif isinstance(value, tuple | list) and len(value) == 2:
        low, high = int(value[0]), int(value[1])
    else:
        raise GenerationError(f"the {what} range must be (min, max) or a torch.export.Dim, got {value!r}")
    if not 1 <= low <= high or high >= 1 << 20:
        raise GenerationError(f"the {what} range ({low}, {high}) must satisfy 1 <= min <= max < 2**20")
    return low, high


def torch_decoder(model: torch.nn.Module, graph: fx.GraphModule, limits: ShapeLimits) -> TorchDecoder:
    """The torch decoder with the transformed graph's weights."""
    spec = decoder_spec(model)
    cos, sin = rotary_table(model, limits.max_context)
    return TorchDecoder(spec, read_weights(graph, spec), cos, sin, limits.max_batch)


def check_against_graph(decoder: TorchDecoder, graph: fx.GraphModule, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """`GenerationError` unless the decoder reproduces the transformed graph's logits on the example inputs.

    Both run with float activations (`weights.FloatActivations`): int8 activation codes round differently after
    float differences of one ulp, which compound over the blocks and would hide what this checks, that the
    decoder reads every weight the graph computes with and computes the same function.
    """
    ids, mask = _ids_and_mask(args, kwargs)
    with torch.no_grad():
        names = [str(node.target) for node in graph.graph.nodes if node.op == "placeholder"]
        inputs = [*args, *(kwargs[name] for name in names[len(args) :])]
        expected = _logits(FloatActivations(graph).run(*inputs))
    floating = TorchDecoder(decoder.spec, decoder.weights.float_activations(), decoder.cos, decoder.sin, ids.shape[0])
    actual = all_logits(floating, ids, mask)
    error = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    log.info("decoder against the transformed graph: relative error %.2e", error)
    if not error <= MAX_GRAPH_ERROR:
        raise GenerationError(
            f"the decoder built from the transformed graph's weights differs from the graph by {error:.3g} "
            "(relative): a pass left computation in the graph that the generation lowering does not read "
            "(e.g. unmerged adapters or an inserted transform); merge it into the weights, or compile without "
            "dynamic_shapes for a fixed-shape forward"
        )


@dataclass
class DecoderRunner:
    """What the compile of a causal LM built: the decoder (None where it cannot run here), its TVM library (None
    on the torch target), layout and kernel tuning; the `lowbit.backends.Runner` fields the report reads."""

    decoder: Decoder | None
    library: Any
    layout: DecoderLayout
    tuning: list[Any] = field(default_factory=list)
    interface: Interface = field(default_factory=Interface)

    @property
    def runnable(self) -> bool:
        return self.decoder is not None

    @property
    def fallbacks(self) -> list[Any]:
        return self.library.fallbacks if self.library is not None else []


class CausalLMCompile:
    """The causal-LM branch of `lowbit.compile`: checks before tracing, tracing without a cache object, the
    decoder build and its check, the compiled model."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any], limits: ShapeLimits) -> None:
        self.model = model
        self.args = args
        self.kwargs = dict(kwargs)
        self.limits = limits

    @classmethod
    def check(
        cls, model: torch.nn.Module, dynamic_shapes: Any, args: tuple, kwargs: Mapping[str, Any] | None, backend: Any
    ) -> CausalLMCompile:
        """Everything checkable before tracing: the family, the limits, a target the decoder is lowered for."""
        spec = decoder_spec(model)
        kwargs = dict(kwargs or {})
        ids, _ = _ids_and_mask(args, kwargs)
        if backend.name != "torch":
            from lowbit.backends.tvm.toolchains.cpu import CPUToolchain

            if not isinstance(backend.toolchain, CPUToolchain):
                raise GenerationError(
                    f"generation is lowered for the torch and CPU targets (x86, arm), not {backend.toolchain.name}; "
                    "compile without dynamic_shapes for a fixed-shape forward"
                )
        limits = shape_limits(dynamic_shapes, ids, spec)
        check_rotary(model, limits.max_context)
        return cls(model, args, kwargs, limits)

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """The model with ``use_cache`` off (its cache object cannot be traced; the decoder has its own)."""
        config = self.model.config
        saved = getattr(config, "use_cache", None)
        config.use_cache = False
        try:
            yield
        finally:
            config.use_cache = saved

    def build(self, graph: fx.GraphModule, backend: Any, cache_dir: Any, tune: Any, strict: bool) -> DecoderRunner:
        """The decoder for ``backend``, checked against the transformed graph first."""
        reference = torch_decoder(self.model, graph, self.limits)
        check_against_graph(reference, graph, self.args, self.kwargs)
        if backend.name == "torch":
            return DecoderRunner(reference, None, DecoderLayout(reference.spec, *self._limits(), ()))
        from lowbit.backends.tvm.toolchains.cpu import features
        from lowbit.llm.library import DecoderLibrary

        tuner = backend.tuner(cache_dir, tune)
        try:
            executable, linears, layout = build_tvm_decoder(reference, backend.toolchain, self.limits, tuner, strict)
        finally:
            if tuner is not None:
                tuner.close()
        library = DecoderLibrary(executable, backend.toolchain.arch, features(backend.toolchain.target), linears)
        return DecoderRunner(library.decoder(layout), library, layout, list(tuner.results) if tuner else [])

    def run(self, runner: DecoderRunner) -> torch.Tensor:
        """The compiled decoder's logits on the example inputs."""
        return all_logits(runner.decoder, *_ids_and_mask(self.args, self.kwargs))

    def compiled(
        self, graph: fx.GraphModule, runner: DecoderRunner, report: Any, info: dict[str, Any], interface: Interface,
        tokenizer: Any,
    ) -> Any:  # fmt: skip
        from lowbit.llm.model import CompiledCausalLM

        generation = getattr(self.model, "generation_config", None)
        settings = generation.to_dict() if generation is not None else {}
        keep = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
                "bos_token_id")  # fmt: skip
        generation = {key: settings[key] for key in keep if settings.get(key) is not None}
        return CompiledCausalLM(
            graph, runner.decoder, report, info, interface, runner.layout, generation, tokenizer, runner.library
        )

    def _limits(self) -> tuple[int, int]:
        return self.limits.max_batch, self.limits.max_context


def _ids_and_mask(args: tuple, kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The example token ids (first positional input or ``input_ids``) and attention mask (or None)."""
    ids = args[0] if args else kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise GenerationError("a causal LM compiles from example input_ids of shape (batch, length)")
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    return ids, mask


def build_tvm_decoder(
    torch_side: TorchDecoder, toolchain: Any, limits: ShapeLimits, tuner: Any, strict: bool
) -> tuple[Any, list[Any], DecoderLayout]:
    """The compiled decoder library (a VM executable), its lowered linears and layout."""
    from lowbit.backends.tvm.quiet import quiet_tvm
    from lowbit.backends.tvm.toolchains.cpu import CPUToolchain
    from lowbit.llm.lower import DecoderBuilder

    if not isinstance(toolchain, CPUToolchain):
        raise GenerationError(
            f"generation is lowered for CPU targets (x86, arm), not {toolchain.name}; "
            "compile without dynamic_shapes for a fixed-shape forward"
        )
    chunks = tuple(c for c in PREFILL_CHUNKS if c <= limits.max_context)
    layout = DecoderLayout(torch_side.spec, limits.max_batch, limits.max_context, chunks)
    builder = DecoderBuilder(
        torch_side.spec, torch_side.weights, (torch_side.cos, torch_side.sin), toolchain, limits.max_batch, tuner
    )
    mod = builder.build(chunks, strict)
    with quiet_tvm():
        executable = toolchain.compile_module(mod)
    return executable, builder.linears, layout


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]
    return leaves[0]


__all__ = [
    "PREFILL_CHUNKS",
    "CausalLMCompile",
    "DecoderRunner",
    "ShapeLimits",
    "build_tvm_decoder",
    "check_against_graph",
    "shape_limits",
    "torch_decoder",
]
