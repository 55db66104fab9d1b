"""``awq``: activation-aware weight quantization (Lin et al. 2023).

Weights that meet large activations matter most, so each group of linears reading one input
(`lowbit.passes.quant.awq_groups`) gets its input columns scaled by ``s = s_X^α`` (the input
divided by ``s``, folded upstream when the graph allows it, else an explicit multiply), then a
clipping range per output channel and group, then the asymmetric project grid. Scale and clip
losses come from the group's input Gram matrix over real (unpadded) tokens, captured as the
calibration batches advance through the graph with the pass, so all groups cost about one
forward per batch. Unlike the reference, losses are measured at the linears' outputs (a traced
graph has no block boundary) and the grid always includes 0. A convolution (``groups=1``) is
scaled per input channel: the columns of its weight matrix that belong to one channel share that
channel's scale, and the losses use the Gram matrix of its unfolded input patches. The math:
docs/methods.md (AWQ, Convolutions).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lowbit.calibration import CalibrationSet, calibration_set
from lowbit.errors import LowbitError
from lowbit.ir import packing
from lowbit.ir.annotations import QuantScheme
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import option
from lowbit.passes.quant.awq_groups import Producer, ScaleGroup, describe_node, find_producer, scale_groups
from lowbit.passes.quant.gptq_algorithm import relative_output_error
from lowbit.passes.quant.grid import QuantizedWeight, effective_group_size, grid_codes, group_params, quantize_weight
from lowbit.passes.quant.hessian import (
    CalibrationCursor,
    ConvHessianAccumulator,
    HessianAccumulator,
    capture_inputs,
    token_rows,
)
from lowbit.passes.quant.rewrite import ConvGeometry, is_conv, layer_nodes, replace_layer, skip_reason, weight_matrix
from lowbit.passes.quant.rtn import RTNConfig
from lowbit.passes.quant.threads import single_thread
from lowbit.passes.registry import register

log = logging.getLogger(__name__)

#: Layer names (last path component) whose clipping is not searched, as in llm-awq.
CLIP_SKIP = ("q_", "k_", "query", "key", "Wqkv")
#: Relative tolerance of the numerical check of a fold.
FOLD_TOLERANCE = 1e-4


@dataclass(frozen=True)
class AWQConfig(RTNConfig):
    """Options of the ``awq`` pass: rtn's grid options (asymmetric by default) plus AWQ's searches."""

    symmetric: bool = option(False, help="symmetric grid (no stored zero points); AWQ uses a zero point")
    n_grid: int = option(20, min=1, help="grid points of the scale search (α = i/n_grid) and the clip search")
    max_shrink: float = option(0.5, min=0.0, max=1.0, help="largest fraction of max|w| the clip search may cut off")
    clip: bool = option(True, help="search a clipping range per output channel and group")


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """``w`` rounded to its per-group grid and decoded (equals `quantize_weight(...).dequantize()`)."""
    rows, width = w.shape
    group = effective_group_size(group_size, width)
    groups = (F.pad(w, (0, -width % group)) if width % group else w).reshape(-1, group)
    scale, zero = group_params(groups, bits, symmetric)
    offset = packing.default_zero(bits) if zero is None else zero[:, None]
    decoded = grid_codes(groups, scale[:, None], offset, bits).sub_(offset).mul_(scale[:, None])
    return decoded.reshape(rows, -1)[:, :width]


def search_scale(
    weights: list[tuple[torch.Tensor, AWQConfig]], x_mean: torch.Tensor, h: torch.Tensor, n_grid: int
) -> tuple[torch.Tensor, float, list[float]]:
    """The best scale ``s`` for linears sharing one input, its α, and the loss at every α.

    ``x_mean`` is ``mean |x|`` per input channel and ``h`` the input Gram ``mean x xᵀ``.
    """
    outputs = sum(w.shape[0] for w, _ in weights)
    losses, best = [], (math.inf, torch.ones_like(x_mean), 0.0)
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, config in weights:
            delta = torch.sub(w, fake_quantize(w * s, config.bits, config.group_size, config.symmetric).div_(s))
            loss += float((delta @ h).mul_(delta).sum())
        losses.append(loss / outputs)
        if losses[-1] < best[0]:
            best = (losses[-1], s, alpha)
    return best[1], best[2], losses


def search_clip(w: torch.Tensor, h: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """Per output channel and group, the clipping bound ``m`` that minimises ``δᵀ H_gg δ`` (module doc).

    Returns ``(N, n_groups)`` bounds; the first candidate, ``max|w|``, is no clipping.
    """
    rows, width = w.shape
    group = effective_group_size(config.group_size, width)
    pad = -width % group
    groups = (F.pad(w, (0, pad)) if pad else w).reshape(rows, -1, group)
    count = groups.shape[1]
    blocks = (F.pad(h, (0, pad, 0, pad)) if pad else h).reshape(count, group, count, group).diagonal(dim1=0, dim2=2)
    blocks = blocks.permute(2, 0, 1)
    original = groups.abs().amax(dim=-1, keepdim=True)
    best_bound, best_error = original.clone(), torch.full(original.shape, math.inf, device=w.device)
    for i in range(int(config.max_shrink * config.n_grid)):
        bound = original * (1 - i / config.n_grid)
        clipped = torch.maximum(torch.minimum(groups, bound), -bound)
        q = fake_quantize(clipped.reshape(rows * count, group), config.bits, -1, config.symmetric)
        delta = q.reshape(rows, count, group) - groups
        error = torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta).unsqueeze(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_bound = torch.where(better, bound, best_bound)
    return best_bound.squeeze(-1)


def apply_clip(w: torch.Tensor, bounds: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` clamped to ``±bounds[n, g]`` per output channel ``n`` and group ``g``."""
    group = effective_group_size(group_size, w.shape[1])
    per_column = bounds.repeat_interleave(group, dim=1)[:, : w.shape[1]]
    return torch.maximum(torch.minimum(w, per_column), -per_column)


@dataclass
class _InputStats:
    """Running ``mean |x|`` per channel and ``H = 2/N Σ x xᵀ`` of a group's input, plus one sample."""

    layer: str
    abs_sum: torch.Tensor
    hessian: HessianAccumulator
    sample: torch.Tensor | None = None

    @classmethod
    def empty(cls, layer: str, width: int, device: torch.device) -> _InputStats:
        return cls(layer, torch.zeros(width, device=device), HessianAccumulator.empty(layer, width, device))

    def add(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Fold one input into the statistics, without padded tokens (`hessian.token_rows`)."""
        rows = token_rows(x.detach(), keep).float()
        if not torch.isfinite(rows).all():
            raise LowbitError(
                f"layer '{self.layer}': its calibration inputs contain NaN or Inf, so AWQ's activation "
                "statistics are undefined; check the calibration data and the layers before it"
            )
        if self.sample is None:
            self.sample = x.detach().clone()
        self.abs_sum += rows.abs().sum(dim=0)
        self.hessian.add(rows)

    @property
    def rows(self) -> int:
        return self.hessian.rows

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    @property
    def gram(self) -> torch.Tensor:
        """``mean x xᵀ`` (the accumulator holds twice that)."""
        return self.hessian.hessian / 2


@dataclass
class _ConvInputStats:
    """A convolution's input statistics: ``mean |x|`` per input channel and the Gram of its unfolded patches,
    both per weight-matrix column (a channel's columns share its value), plus one sample."""

    layer: str
    abs_sum: torch.Tensor
    hessian: ConvHessianAccumulator
    taps: int
    pixels: int = 0
    sample: torch.Tensor | None = None

    @classmethod
    def empty(cls, layer: str, conv: nn.Module, device: torch.device) -> _ConvInputStats:
        geometry = ConvGeometry.of(conv)
        taps = math.prod(geometry.kernel_size)
        width = conv.in_channels * taps
        hessian = ConvHessianAccumulator.empty(layer, geometry.args(), width, device)
        return cls(layer, torch.zeros(conv.in_channels, device=device), hessian, taps)

    def add(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Fold one input ``(B, C, *spatial)`` into the statistics."""
        x = x.detach()
        if not torch.isfinite(x).all():
            raise LowbitError(
                f"layer '{self.layer}': its calibration inputs contain NaN or Inf, so AWQ's activation "
                "statistics are undefined; check the calibration data and the layers before it"
            )
        if self.sample is None:
            self.sample = x.clone()
        self.abs_sum += x.float().abs().transpose(0, 1).reshape(x.shape[1], -1).sum(dim=1)
        self.pixels += x.numel() // x.shape[1]
        self.hessian.add(x)

    @property
    def rows(self) -> int:
        return self.hessian.rows

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.pixels, 1)).repeat_interleave(self.taps)

    @property
    def gram(self) -> torch.Tensor:
        return self.hessian.hessian[0] / 2


@dataclass
class _GroupState:
    """A group's progress through scale search, clip search and quantization."""

    group: ScaleGroup
    configs: list[AWQConfig]
    producer: Producer | None
    no_fold_reason: str
    info: dict[str, Any] = field(default_factory=dict)
    scale: torch.Tensor | None = None
    gram: torch.Tensor | None = None  # of the scaled input, kept until the clip search
    quantized: list[QuantizedWeight] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)


@register
class AWQ(Pass):
    """AWQ quantization of every linear and (ungrouped) convolution not ignored or skipped, using calibration data."""

    name = "awq"
    Config = AWQConfig
    stage = "convert"
    requires_calibration = True
    produces = frozenset({"quant"})
    # Masked layers are not nn.Linear calls: quantizing around them would silently skip them.
    forbids = frozenset({"adapter", "reparam", "fake_quant", "sparsity"})
    after_pack = True
    pattern = "nn.Linear, nn.Conv1d, nn.Conv2d"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        batches = ctx.require_calibration(self.name)
        paths, records, states, counts = self._search(gm, batches, ctx, quantize=True)
        for state in states:
            for node, path, qw, config, stats in zip(
                state.group.nodes, state.group.paths, state.quantized, state.configs, state.stats
            ):
                scheme = QuantScheme(
                    bits=qw.bits, group_size=qw.group_size, symmetric=config.symmetric, method=self.name
                )
                replace_layer(gm, node, qw, scheme, recompile=False)
                records[path] = LayerRecord(path, "quantized", stats={**stats, **state.info})
        gm.graph.lint()
        gm.recompile()
        layers = [records[p] for p in paths]
        quantized = sum(r.action == "quantized" for r in layers)
        return PassResult(
            changed=quantized > 0,
            layers=layers,
            stats={"quantized": quantized, "skipped": len(layers) - quantized, "groups": len(states), **counts},
        )

    def apply_scales(self, gm: fx.GraphModule, calibration: Any, example_inputs: tuple = ()) -> list[dict[str, Any]]:
        """Search and apply AWQ's scales on ``gm`` in place, without clipping or rounding.

        The float model computes the same function afterwards (up to float rounding):
        steps 1–3 of the pass, to inspect them or to combine them with another quantizer.
        Returns each group's report entry (group, prev_op, scale, alpha, losses).
        """
        batches = calibration_set(calibration, example_inputs)
        _, _, states, _ = self._search(gm, batches, PassContext(example_inputs, calibration=batches), quantize=False)
        return [state.info for state in states]

    def _search(
        self, gm: fx.GraphModule, batches: CalibrationSet, ctx: PassContext, quantize: bool
    ) -> tuple[list[str], dict[str, LayerRecord], list[_GroupState], dict[str, int]]:
        """Scale every group in graph order and, if ``quantize``, clip and round each group once
        no later group can fold into it. Layers left out get "skipped" records."""
        paths = list(dict.fromkeys(path for _, path, _ in layer_nodes(gm)))
        self.bind_layers(gm, paths)
        records: dict[str, LayerRecord] = {}
        todo: dict[str, AWQConfig] = {}
        for path in paths:
            reason = skip_reason(gm, path, self.config.ignore) or _grouped_reason(gm.get_submodule(path))
            config = None if reason else self.config_for(path)
            if config is None:
                records[path] = LayerRecord(path, "skipped", reason or "skipped by a per-layer override")
                log.info("awq: skipping %s: %s", path, records[path].reason)
            elif not torch.isfinite(gm.get_submodule(path).weight).all():
                raise LowbitError(f"layer '{path}': weight contains NaN or Inf; it cannot be quantized")
            else:
                todo[path] = config
        states = [
            _GroupState(g, [todo[p] for p in g.paths], *find_producer(gm, g)) for g in scale_groups(gm, list(todo))
        ]
        counts = {"folded": 0, "explicit_scales": 0}
        cursor = CalibrationCursor(gm, batches)
        for index, state in enumerate(ctx.progress(states, desc="awq")):
            self._scale_group(gm, state, cursor, next(iter(batches)), counts)
            if state.scale is None:
                for path in state.group.paths:
                    records[path] = LayerRecord(path, "skipped", state.info["reason"], stats=dict(state.info))
            if not quantize:
                state.gram = None
            for earlier in states[: index + 1] if quantize else ():
                if earlier.gram is not None and not _pending_fold(earlier, states[index + 1 :]):
                    with single_thread():
                        _clip_and_quantize(gm, earlier)
        return paths, records, states, counts

    def _scale_group(
        self,
        gm: fx.GraphModule,
        state: _GroupState,
        cursor: CalibrationCursor,
        first_batch: Any,
        counts: dict[str, int],
    ) -> None:
        """Capture the group's input statistics, search its scale and apply it (module doc, steps 1–3)."""
        group, config = state.group, state.configs[0]
        first = gm.get_submodule(group.paths[0])
        stats = (
            _ConvInputStats.empty(group.paths[0], first, first.weight.device)
            if is_conv(first)
            else _InputStats.empty(group.paths[0], first.in_features, first.weight.device)
        )
        cursor.capture(group.nodes if group.calls > 1 else group.nodes[:1], stats.add)  # one read of X
        producer, reason = state.producer, state.no_fold_reason
        prev = producer.describe(gm) if producer else describe_node(gm, group.input)
        state.info = {"group": group.name, "prev_op": prev, "samples": stats.rows}
        if stats.rows == 0:
            state.info["reason"] = "it received no calibration inputs"
            return
        weights = [weight_matrix(gm.get_submodule(p)).float() for p in group.paths]
        with single_thread():
            s, alpha, losses = search_scale(
                list(zip(weights, state.configs)), stats.mean_abs, stats.gram, config.n_grid
            )
        for path, w in zip(group.paths, weights):
            module = gm.get_submodule(path)
            _set_tensor(module, "weight", (w * s).view_as(module.weight))
        # The scale of each input channel, shaped to broadcast over the input (channels on dim 1 for a convolution).
        channel = s[:: stats.taps].reshape(-1, *[1] * (first.weight.dim() - 2)) if is_conv(first) else s
        if producer is not None and not _fold_is_exact(gm, group, producer, stats.sample, first_batch):
            reason = f"folding into {prev} does not divide the input channel by channel"
            producer = None
        if producer is not None:
            _fold(gm, producer, channel.flatten())
            cursor.update(group.input, lambda x: x / channel.to(x))
            counts["folded"] += 1
            state.info["scale"] = f"folded into {prev}"
        else:
            name = _insert_explicit_scale(gm, group, 1 / channel)
            counts["explicit_scales"] += 1
            state.info["scale"] = f"explicit x / s ({name}): {reason}"
        state.info.update(alpha=alpha, search_loss=min(losses), unscaled_loss=losses[0])
        state.scale, state.gram = s, stats.gram / s[:, None] / s[None, :]
        log.debug(
            "awq: %s: prev %s, alpha %.2f, loss %.3g (unscaled %.3g); %s",
            group.name,
            prev,
            alpha,
            min(losses),
            losses[0],
            state.info["scale"],
        )


def _clip_and_quantize(gm: fx.GraphModule, state: _GroupState) -> None:
    """Search each linear's clipping on the scaled input, then round it (module doc, step 4)."""
    assert state.gram is not None and state.scale is not None
    for path, config in zip(state.group.paths, state.configs):
        w = weight_matrix(gm.get_submodule(path)).float()
        clipped = config.clip and not any(token in path.rpartition(".")[2] for token in CLIP_SKIP)
        bounds = search_clip(w, state.gram, config) if clipped else None
        final = w if bounds is None else apply_clip(w, bounds, config.group_size)
        qw = quantize_weight(final, config.bits, config.group_size, config.symmetric, name=path)
        unscaled = w / state.scale
        rtn = quantize_weight(unscaled, config.bits, config.group_size, config.symmetric, name=path).dequantize()
        stats: dict[str, Any] = {"bits": qw.bits, "group_size": qw.group_size, "clip": clipped}
        if bounds is not None:
            stats["clip_shrink"] = float((1 - bounds / _group_max(w, qw.group_size).clamp(min=1e-30)).mean())
        stats["output_error"] = relative_output_error(w, qw.dequantize(), state.gram)
        stats["rtn_output_error"] = relative_output_error(
            unscaled, rtn, state.gram * state.scale[:, None] * state.scale[None, :]
        )
        state.quantized.append(qw)
        state.stats.append(stats)
    state.gram = None


def _group_max(w: torch.Tensor, group_size: int) -> torch.Tensor:
    group = effective_group_size(group_size, w.shape[1])
    return F.pad(w.abs(), (0, -w.shape[1] % group)).reshape(w.shape[0], -1, group).amax(dim=-1)


def _pending_fold(state: _GroupState, later: list[_GroupState]) -> bool:
    """Whether a later group may still fold its scale into rows of one of ``state``'s linears."""
    return any(
        s.producer is not None and s.producer.kind == "linear" and s.producer.target in state.group.paths for s in later
    )


def _fold(gm: fx.GraphModule, producer: Producer, s: torch.Tensor) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Divide the producer's output channels by ``s``; returns what it replaced, for `_restore`."""
    replaced = []
    for owner, name in producer.tensors(gm):
        old = getattr(owner, name)
        new = old.detach().clone()
        if producer.kind == "linear":
            new[-s.shape[0] :] /= s.to(new).reshape(-1, *([1] * (new.dim() - 1)))
        else:
            new /= s.to(new)
        replaced.append((owner, name, _set_tensor(owner, name, new)))
    return replaced


def _restore(replaced: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    for owner, name, old in replaced:
        _set_tensor(owner, name, old)


def _set_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Rebind ``owner.name`` to ``value`` (a new tensor, so weights tied elsewhere keep theirs); return the old one."""
    old = getattr(owner, name)
    if name in owner._parameters:
        owner._parameters[name] = (
            value
            if isinstance(value, nn.Parameter)
            else nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad)
        )
    elif name in owner._buffers:
        owner._buffers[name] = value.to(old.dtype)
    else:
        setattr(owner, name, value.to(old.dtype))
    return old


def _fold_is_exact(
    gm: fx.GraphModule, group: ScaleGroup, producer: Producer, reference: torch.Tensor | None, batch: Any
) -> bool:
    """Whether folding a random positive scale into ``producer`` divides the group's input by it (channel by
    channel: the last dimension of a linear's input, dimension 1 of a convolution's)."""
    if reference is None:
        return False
    generator = torch.Generator().manual_seed(0)
    conv = is_conv(gm.get_submodule(group.paths[0]))
    width = reference.shape[1] if conv else reference.shape[-1]
    s = torch.exp((torch.rand(width, generator=generator) * 2 - 1) * math.log(2)).to(reference.device)
    seen: list[torch.Tensor] = []
    replaced = _fold(gm, producer, s)
    try:
        capture_inputs(gm, group.paths[0], 1, [batch], lambda x, _: seen.append(x.detach().clone()))
    finally:
        _restore(replaced)
    if not seen or seen[0].shape != reference.shape:
        return False
    expected = reference.float() / (s.reshape(-1, *[1] * (reference.dim() - 2)) if conv else s)
    error = torch.linalg.vector_norm(seen[0].float() - expected)
    return bool(error <= FOLD_TOLERANCE * torch.linalg.vector_norm(expected))


def _grouped_reason(module: nn.Module) -> str | None:
    """Why AWQ leaves a grouped convolution alone (its input channels each reach only one group's rows)."""
    if is_conv(module) and getattr(module, "groups", 1) > 1:
        return (
            f"grouped convolution (groups={module.groups}): AWQ scales an input channel across every output, "
            "so it leaves grouped and depthwise convolutions to rtn or gptq"
        )
    return None


def _insert_explicit_scale(gm: fx.GraphModule, group: ScaleGroup, inverse: torch.Tensor) -> str:
    """Insert ``x * (1/s)`` before each of the group's calls; returns the buffer's name."""
    index = 0
    while hasattr(gm, f"awq_inv_scale_{index}"):
        index += 1
    name = f"awq_inv_scale_{index}"
    gm.register_buffer(name, inverse.to(device=gm.get_submodule(group.paths[0]).weight.device))
    for node in group.nodes:
        x = node.args[0]
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, attr))
        scaled.meta = {k: v for k, v in x.meta.items() if k in ("val", "tensor_meta")}
        node.replace_input_with(x, scaled)
    gm.graph.lint()
    gm.recompile()
    return name


__all__ = ["AWQ", "AWQConfig", "apply_clip", "fake_quantize", "search_clip", "search_scale"]
