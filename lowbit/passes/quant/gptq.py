"""``gptq``: GPTQ weight quantization (Frantar et al. 2022; METHODS.md §8).

Each ``nn.Linear`` is quantized column by column on the project grid
(`lowbit.passes.quant.grid`), and every column's rounding error is spread over the
columns not yet quantized, weighted by the inverse of the layer-input Hessian
``H = 2/N · Σ x xᵀ``. That minimises the layer's output error on the calibration data
instead of its weight error, which is what makes 3- and 2-bit weights usable.

Layers are processed one at a time in graph order, and the calibration batches move
through the graph with them (`lowbit.passes.quant.hessian.CalibrationCursor`): each
layer's ``H`` is accumulated from the inputs that reach it through the graph *as it is
now*, so layers after the first see the outputs of already-quantized layers (GPTQ's
"propagate quantized outputs"; for a transformer this is the block-by-block, true
sequential order q/k/v → o → gate/up → down). Every batch runs through the graph once
in all, and only the values crossing the current layer are held. Layers that read the
same input node (q/k/v, gate/up) share one capture, which changes nothing: quantizing
one of them cannot change the others' input. A layer called more than once (shared
weights) gets one Hessian over all of its calls; a later call whose input depends on
layers after the first call sees those layers still in floating point.

`gptq_quantize` is the algorithm on one weight and its Hessian; the `GPTQ` pass wraps
it. It follows METHODS.md §8 steps 3–8, with one refinement: a dynamic group's grid is
computed from the truly current, error-updated columns, including the pending lazy
updates of columns beyond the current block, so the blocked loop equals the unblocked
column-by-column algorithm for every block and group size (IST-DASLab's code reads the
block-start values there, which differs when a group starts inside a block).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from lowbit.calibration import CalibrationSet, calibration_set
from lowbit.errors import CalibrationError, LowbitError
from lowbit.ir import packing
from lowbit.ir.annotations import QuantScheme, get_meta
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import option
from lowbit.passes.quant.grid import (
    QuantizedWeight,
    effective_group_size,
    grid_codes,
    group_params,
    quantize_weight,
    relative_error,
)
from lowbit.passes.quant.hessian import CalibrationCursor, HessianAccumulator
from lowbit.passes.quant.rewrite import linear_nodes, replace_linear, skip_reason
from lowbit.passes.quant.rtn import RTNConfig
from lowbit.passes.registry import register

log = logging.getLogger(__name__)

#: How many times the damping is multiplied by 10 before a Cholesky failure is an error.
DAMP_RETRIES = 5

#: One ``nn.Linear``: its first call node, module path and number of call sites.
_Layer = tuple[fx.Node, str, int]


@dataclass(frozen=True)
class GPTQConfig(RTNConfig):
    """Options of the ``gptq`` pass: rtn's grid options (asymmetric by default) plus GPTQ's."""

    symmetric: bool = option(False, help="symmetric grid (no stored zero points); GPTQ's default is asymmetric")
    act_order: bool = option(False, help="quantize columns in order of decreasing Hessian diagonal")
    static_groups: bool = option(False, help="group grids from the original weight (no g_idx with act_order)")
    block_size: int = option(128, min=1, help="columns per lazy-update block (speed only, same result)")
    damp_percent: float = option(0.01, min=0.0, min_exclusive=True, help="damping, as a fraction of mean(diag H)")


@dataclass(frozen=True)
class GPTQResult:
    """`gptq_quantize`'s output: packed-ready codes, the weight they stand for, and diagnostics.

    ``weight`` is the quantized weight ``Q`` in the input's dtype and original column
    order; ``loss`` is GPTQ's tracked ``Σ (w − q)² / d² / 2``; ``damp`` the damping
    fraction that made the Cholesky succeed.
    """

    quantized: QuantizedWeight
    weight: torch.Tensor
    loss: float
    damp: float


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = -1,
    symmetric: bool = False,
    *,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp_percent: float = 0.01,
    name: str | None = None,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``weight`` ``(N, K)`` with GPTQ given its input Hessian ``hessian`` ``(K, K)``.

    Computes in float32 (float64 if ``weight`` is float64). ``name`` (the layer's module
    path) is used in errors and log messages. ``mask`` (bool ``(N, K)``, True = kept) fixes
    a pruning pattern: pruned weights quantize to exactly zero while their error still
    flows to later columns (SparseGPT's fixed-mask update).
    """
    where = f"layer '{name}': " if name else ""
    w = _checked_weight(weight, where)
    h = hessian.detach().to(w).clone()
    columns = w.shape[1]
    group = effective_group_size(group_size, columns)
    static = static_groups and group < columns
    _drop_dead_inputs(w, h)
    grid = _Grid.empty(w, packing.num_groups(columns, group), bits, symmetric)
    if static:
        for g, start in enumerate(range(0, columns, group)):
            grid.fit(g, w[:, start:start + group])
    natural = torch.arange(columns, device=w.device)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else natural
    w, h = w[:, perm], h[perm][:, perm]
    u, damp = _inverse_cholesky_factor(h, damp_percent, where)
    group_of = (perm if static else natural) // group
    keep = None if mask is None else mask[:, perm]
    codes, q, loss = _quantize_columns(w, u, grid, group_of.tolist(), None if static else group, block_size, keep)
    inverse = torch.argsort(perm)
    g_idx = (inverse // group).to(torch.int32) if act_order and not static and group < columns else None
    quantized = QuantizedWeight(
        codes[:, inverse].to(torch.uint8), grid.scales.float(),
        None if grid.zeros is None else grid.zeros.float(), g_idx, bits, group,
    )
    return GPTQResult(quantized, q[:, inverse], loss, damp)


@dataclass
class _Grid:
    """Per-group scales and zero points (None when symmetric), filled in as GPTQ goes."""

    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int

    @classmethod
    def empty(cls, w: torch.Tensor, groups: int, bits: int, symmetric: bool) -> "_Grid":
        scales = w.new_zeros(w.shape[0], groups)
        return cls(scales, None if symmetric else torch.zeros_like(scales), bits)

    def fit(self, g: int, columns: torch.Tensor) -> None:
        """Set group ``g``'s grid from the weight ``columns`` ``(N, width)`` it covers."""
        scale, zero = group_params(columns, self.bits, self.zeros is None)
        self.scales[:, g] = scale
        if self.zeros is not None:
            self.zeros[:, g] = zero

    def quantize(self, column: torch.Tensor, g: int, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of ``column`` on group ``g``'s grid, and the values they decode to.

        Rows where ``keep`` is False get the zero point's code, which decodes to exactly 0.
        """
        scale = self.scales[:, g]
        zero = packing.default_zero(self.bits) if self.zeros is None else self.zeros[:, g]
        codes = grid_codes(column, scale, zero, self.bits)
        if keep is not None:
            codes = torch.where(keep, codes, torch.as_tensor(zero, dtype=codes.dtype, device=codes.device))
        return codes, (codes - zero) * scale


def _checked_weight(weight: torch.Tensor, where: str) -> torch.Tensor:
    """A float32/float64 working copy of ``weight``; NaN or Inf is an error naming the layer."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise LowbitError(f"{where}expected a 2-D floating-point weight, got {weight.dtype} {tuple(weight.shape)}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()
    if not torch.isfinite(w).all():
        raise LowbitError(f"{where}weight contains NaN or Inf; it cannot be quantized")
    return w


def _drop_dead_inputs(w: torch.Tensor, h: torch.Tensor) -> None:
    """Inputs that were always zero (``H_jj = 0``): set ``H_jj = 1`` and zero their weights."""
    dead = torch.nonzero(h.diagonal() == 0).squeeze(1)
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if len(dead):
        log.debug("%d of %d inputs are dead (always zero)", len(dead), h.shape[0])


def _inverse_cholesky_factor(h: torch.Tensor, damp_percent: float, where: str) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U``), with ``λ = damp · mean(diag H)``.

    When a factorization fails the damping grows tenfold, with a warning, up to
    `DAMP_RETRIES` times.
    """
    mean = h.diagonal().mean()
    identity = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = damp_percent
    for _ in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean * identity)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper, damp
        log.warning("%sthe damped Hessian is not positive definite at damp_percent=%g; retrying with %g",
                    where, damp, damp * 10)
        damp *= 10
    raise LowbitError(
        f"{where}the Hessian stays numerically singular up to damp_percent={damp / 10:g}; "
        "use more calibration samples or ignore this layer"
    )


def _quantize_columns(
    w: torch.Tensor, u: torch.Tensor, grid: _Grid, group_of: list[int], dynamic_group: int | None, block_size: int,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GPTQ's column loop in blocks with lazy updates (METHODS.md §8 step 7); updates ``w``.

    ``group_of[j]`` is the group of (permuted) column ``j``. With ``dynamic_group``, the
    grid of each group is fitted when its first column comes up. Returns float codes, the
    decoded weight and the tracked loss, all in the (permuted) column order of ``w``.
    """
    columns = w.shape[1]
    codes, q = torch.zeros_like(w), torch.zeros_like(w)
    loss = w.new_zeros(())
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, errors = w[:, start:end].clone(), w.new_zeros(w.shape[0], end - start)
        for j in range(end - start):
            col = start + j
            if dynamic_group is not None and col % dynamic_group == 0:
                stop = min(col + dynamic_group, columns)
                grid.fit(col // dynamic_group, _current_columns(w, block, errors, u, start, j, stop))
            codes[:, col], q[:, col] = grid.quantize(block[:, j], group_of[col], None if keep is None else keep[:, col])
            errors[:, j] = (block[:, j] - q[:, col]) / u[col, col]
            loss += errors[:, j].square().sum() / 2
            block[:, j:] -= errors[:, j, None] * u[col, col:end]
        w[:, end:] -= errors @ u[start:end, end:]
    return codes, q, float(loss)


def _current_columns(
    w: torch.Tensor, block: torch.Tensor, errors: torch.Tensor, u: torch.Tensor, start: int, j: int, stop: int
) -> torch.Tensor:
    """The error-updated values of columns ``[start + j, stop)`` before column ``start + j`` is quantized.

    Columns inside the block are current in ``block``; later ones still lack the lazy
    update from this block's first ``j`` columns, which is applied here.
    """
    end = start + block.shape[1]
    inside = block[:, j:min(stop, end) - start]
    if stop <= end:
        return inside
    outside = w[:, end:stop] - errors[:, :j] @ u[start:start + j, end:stop]
    return torch.cat([inside, outside], dim=1)


def relative_output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """``‖X (W − Q)ᵀ‖_F / ‖X Wᵀ‖_F`` on the calibration inputs, from ``H ∝ XᵀX`` alone."""
    w = weight.detach().to(hessian)
    delta = w - approximation.detach().to(hessian)
    reference = float((w @ hessian * w).sum())
    error = max(float((delta @ hessian * delta).sum()), 0.0)
    if reference <= 0:
        return 0.0 if error == 0 else math.inf
    return math.sqrt(error / reference)


@register
class GPTQ(Pass):
    """GPTQ quantization of every ``nn.Linear`` not ignored or skipped, using calibration data."""

    name = "gptq"
    Config = GPTQConfig
    stage = "convert"
    requires_calibration = True
    produces = frozenset({"quant"})
    forbids = frozenset({"adapter", "reparam", "fake_quant", "sparsity"})
    after_pack = True
    pattern = "nn.Linear"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cursor = CalibrationCursor(gm, _calibration(ctx))
        groups = _input_groups(gm)
        self.warn_unused_overrides([path for group in groups for _, path, _ in group])
        records: list[LayerRecord] = []
        for group in ctx.progress(groups, desc="gptq"):
            records.extend(self._quantize_group(gm, group, cursor))
        gm.graph.lint()
        gm.recompile()
        quantized = sum(r.action == "quantized" for r in records)
        return PassResult(
            changed=quantized > 0,
            layers=records,
            stats={"quantized": quantized, "skipped": len(records) - quantized, "captures": len(groups)},
        )

    def _quantize_group(self, gm: fx.GraphModule, group: list[_Layer], cursor: CalibrationCursor) -> list[LayerRecord]:
        """Capture one Hessian for layers that share an input, then quantize each of them."""
        records: dict[str, LayerRecord] = {}
        todo: list[tuple[_Layer, GPTQConfig]] = []
        for layer in group:
            path = layer[1]
            reason = skip_reason(gm, path, self.config.ignore)
            config = None if reason else self.config_for(path)
            if config is None:
                records[path] = LayerRecord(path, "skipped", reason or "skipped by a per-layer override")
            elif not torch.isfinite(gm.get_submodule(path).weight).all():
                raise LowbitError(f"layer '{path}': weight contains NaN or Inf; it cannot be quantized")
            else:
                todo.append((layer, config))
        if todo:
            (_, first, _), _ = todo[0]
            linear = gm.get_submodule(first)
            hessian = HessianAccumulator.empty(first, linear.in_features, linear.weight.device)
            cursor.capture([n for n in gm.graph.nodes if n.op == "call_module" and n.target == first], hessian.add)
            for (node, path, _), config in todo:
                if hessian.rows == 0:
                    records[path] = LayerRecord(path, "skipped", "it received no calibration inputs")
                else:
                    records[path] = self._quantize_layer(gm, node, path, config, hessian.hessian, hessian.rows)
        return [records[path] for _, path, _ in group]

    def _quantize_layer(self, gm: fx.GraphModule, node: fx.Node, path: str, config: GPTQConfig,
                        hessian: torch.Tensor, rows: int) -> LayerRecord:
        """Run GPTQ on one layer, replace it by its packed form and record the statistics."""
        weight = gm.get_submodule(path).weight.detach()
        meta = get_meta(node)
        pruned = meta is not None and meta.sparsity is not None  # masks applied: keep the zeros they left
        result = gptq_quantize(
            weight, hessian, config.bits, config.group_size, config.symmetric,
            act_order=config.act_order, static_groups=config.static_groups,
            block_size=config.block_size, damp_percent=config.damp_percent, name=path,
            mask=weight != 0 if pruned else None,
        )
        rtn = quantize_weight(weight, config.bits, config.group_size, config.symmetric, name=path).dequantize()
        stats = {
            "bits": config.bits,
            "group_size": result.quantized.group_size,
            "act_order": config.act_order,
            "samples": rows,
            "damp_percent": result.damp,
            "gptq_loss": result.loss,
            "output_error": relative_output_error(weight, result.weight, hessian),
            "rtn_output_error": relative_output_error(weight, rtn, hessian),
            "rel_error": relative_error(weight, result.weight),
        }
        scheme = QuantScheme(bits=config.bits, group_size=result.quantized.group_size,
                             symmetric=config.symmetric, method=self.name)
        replace_linear(gm, node, result.quantized, scheme, recompile=False)
        log.debug("gptq: %s -> %s, output error %.3g (rtn %.3g)", path, scheme.describe(),
                  stats["output_error"], stats["rtn_output_error"])
        return LayerRecord(path, "quantized", stats=stats)


def _input_groups(gm: fx.GraphModule) -> list[list[_Layer]]:
    """The ``nn.Linear`` layers in graph order, grouped when they are called once on the same input."""
    calls: dict[str, list[fx.Node]] = {}
    for node, path, _ in linear_nodes(gm):
        calls.setdefault(path, []).append(node)
    groups: dict[Any, list[_Layer]] = {}
    for path, nodes in calls.items():
        node = nodes[0]
        shares_input = len(nodes) == 1 and len(node.args) == 1 and not node.kwargs
        groups.setdefault(node.args[0] if shares_input else path, []).append((node, path, len(nodes)))
    return list(groups.values())


def _calibration(ctx: PassContext) -> CalibrationSet:
    """The calibration batches, validated against the example inputs unless already a `CalibrationSet`."""
    if ctx.calibration is None:
        raise CalibrationError("gptq needs calibration data: pass calibration= batches shaped like the example inputs")
    if isinstance(ctx.calibration, CalibrationSet):
        return ctx.calibration
    if not ctx.example_inputs and not ctx.example_kwargs:
        raise CalibrationError(
            "gptq cannot check raw calibration batches without example inputs: pass "
            "lowbit.calibration.calibration_set(batches, example_inputs), or example_inputs= to the pipeline"
        )
    return calibration_set(ctx.calibration, ctx.example_inputs, ctx.example_kwargs)


__all__ = ["GPTQ", "GPTQConfig", "GPTQResult", "gptq_quantize", "relative_output_error"]
