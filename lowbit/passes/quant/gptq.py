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

Layers that share an input and their options (q/k/v, gate/up) also share ``H`` and hence
its inverse Cholesky factor and the act-order permutation; since the grid and the error
update act row by row, the pass quantizes them as one weight stacked along the rows,
which gives each of them the same result as quantizing it alone, in one column loop.

Quantizing a layer (Cholesky, column loop, statistics) runs single-threaded
(`lowbit.passes.quant.threads`); the calibration forwards and Hessian products keep
torch's threads.

Options beyond METHODS.md's algorithm, for quality (all off by default, like the
reference): ``act_order`` (columns by decreasing ``H_jj``) with ``static_groups``
(grids from the original weight, so no ``g_idx`` is needed) or with dynamic groups
(one ``g_idx`` entry per column); ``act_group_aware`` (GPTQModel's default, "GAR"):
the natural column groups ordered by their largest ``H_jj`` and the columns inside each
group by decreasing ``H_jj``, so the important columns still go first but every group
stays contiguous (grids fitted on the current columns, no ``g_idx``); ``mse`` > 0 shrinks each group's range to the one whose
rounded weights minimise ``Σ |q − w|^mse`` (GPTQModel's ``mse``, `grid.clipped_group_params`);
``damp_percent`` trades fidelity to the calibration Hessian for stability.

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
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

from lowbit.calibration import CalibrationSet, calibration_set
from lowbit.errors import CalibrationError, LowbitError, PassConfigError
from lowbit.ir import packing
from lowbit.ir.annotations import QuantScheme, get_meta
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import option
from lowbit.passes.quant.grid import (
    QuantizedWeight,
    clipped_group_params,
    effective_group_size,
    grid_codes,
    group_params,
    quantize_weight,
    relative_error,
)
from lowbit.passes.quant.hessian import CalibrationCursor, HessianAccumulator
from lowbit.passes.quant.rewrite import linear_nodes, replace_linear, skip_reason
from lowbit.passes.quant.rtn import RTNConfig
from lowbit.passes.quant.threads import single_thread
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
    act_group_aware: bool = option(False, help="groups by their largest Hessian diagonal, columns by theirs "
                                               "inside each group (GPTQModel's GAR; no g_idx)")
    block_size: int = option(128, min=1, help="columns per lazy-update block (speed only, same result)")
    damp_percent: float = option(0.01, min=0.0, min_exclusive=True, help="damping, as a fraction of mean(diag H)")
    mse: float = option(0.0, min=0.0, help="if > 0, shrink each group's range to minimise sum |q - w|^mse "
                                              "(GPTQModel's mse; 2.4 there)")
    mse_steps: int = option(100, min=1, help="shrink factors 1 - i/mse_steps tried by the mse search")
    mse_max_shrink: float = option(0.8, min=0.0, max=1.0, min_exclusive=True,
                                   help="largest fraction of a group's range the mse search may cut off")

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if self.act_order and self.act_group_aware:
            raise PassConfigError(f"{pass_name}: act_order and act_group_aware are two column orders; choose one")


@dataclass(frozen=True)
class GPTQResult:
    """`gptq_quantize`'s output: packed-ready codes, the weight they stand for, and diagnostics.

    ``weight`` is the quantized weight ``Q`` in the input's dtype and original column
    order; ``loss`` is GPTQ's tracked ``Σ (w − q)² / d² / 2`` and ``row_loss`` its terms
    per output row; ``damp`` the damping fraction that made the Cholesky succeed.
    """

    quantized: QuantizedWeight
    weight: torch.Tensor
    loss: float
    damp: float
    row_loss: torch.Tensor

    def split(self, sizes: list[int]) -> list["GPTQResult"]:
        """The results of the weights stacked along the rows, ``sizes[i]`` rows each."""
        qw, parts = self.quantized, []
        for codes, scales, zeros, weight, loss in zip(
            qw.codes.split(sizes), qw.scales.split(sizes),
            [None] * len(sizes) if qw.zeros is None else qw.zeros.split(sizes),
            self.weight.split(sizes), self.row_loss.split(sizes),
        ):
            parts.append(GPTQResult(replace(qw, codes=codes, scales=scales, zeros=zeros), weight,
                                    float(loss.sum()), self.damp, loss))
        return parts


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = -1,
    symmetric: bool = False,
    *,
    act_order: bool = False,
    static_groups: bool = False,
    act_group_aware: bool = False,
    block_size: int = 128,
    sub_block: int = 16,
    damp_percent: float = 0.01,
    mse: float = 0.0,
    mse_steps: int = 100,
    mse_max_shrink: float = 0.8,
    name: str | None = None,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``weight`` ``(N, K)`` with GPTQ given its input Hessian ``hessian`` ``(K, K)``.

    Computes in float32 (float64 if ``weight`` is float64). ``name`` (the layer's module
    path) is used in errors and log messages. ``mask`` (bool ``(N, K)``, True = kept) fixes
    a pruning pattern: pruned weights quantize to exactly zero while their error still
    flows to later columns (SparseGPT's fixed-mask update). ``mse`` > 0 fits each group's
    grid with `grid.clipped_group_params` (``mse_steps``, ``mse_max_shrink``).
    ``block_size`` and ``sub_block`` (`_quantize_columns`) only change the speed.
    """
    where = f"layer '{name}': " if name else ""
    if block_size < 1 or sub_block < 1:
        raise LowbitError(f"{where}block_size and sub_block must be at least 1, got {block_size} and {sub_block}")
    w = _checked_weight(weight, where)
    h = hessian.detach().to(w).clone()
    columns = w.shape[1]
    group = effective_group_size(group_size, columns)
    static = static_groups and group < columns
    _drop_dead_inputs(w, h)
    clip = (mse, mse_steps, mse_max_shrink) if mse > 0 else None
    grid = _Grid.empty(w, packing.num_groups(columns, group), bits, symmetric, clip)
    if static:
        for g, start in enumerate(range(0, columns, group)):
            grid.fit(g, w[:, start:start + group])
    natural = torch.arange(columns, device=w.device)
    if act_order and act_group_aware:
        raise LowbitError(f"{where}act_order and act_group_aware are two column orders; choose one")
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    elif act_group_aware:
        perm = _group_aware_order(h.diagonal(), group)
    else:
        perm = natural
    w, h = w[:, perm], h[perm][:, perm]
    group_of = (perm if static or act_group_aware else natural) // group
    keep = None if mask is None else mask[:, perm]
    with single_thread():
        u, damp = _inverse_cholesky_factor(h, damp_percent, where)
        codes, row_loss = _quantize_columns(w, u, grid, group_of.tolist(), None if static else group, block_size,
                                            sub_block, keep)
    q = grid.decode(codes, group_of)
    inverse = torch.argsort(perm)
    g_idx = (inverse // group).to(torch.int32) if act_order and not static and group < columns else None
    scales, zeros = grid.per_row()
    quantized = QuantizedWeight(
        codes[:, inverse].to(torch.uint8), scales.float().contiguous(),
        None if zeros is None else zeros.float().contiguous(), g_idx, bits, group,
    )
    return GPTQResult(quantized, q[:, inverse], float(row_loss.sum()), damp, row_loss)


@dataclass
class _Grid:
    """Per-group scales and zero points (None when symmetric), filled in as GPTQ goes.

    Stored group-major, ``(groups, N)``, so that one group's grid is contiguous for the
    column loop; `per_row` gives the format's ``(N, groups)``. ``clip`` is ``(norm, steps,
    max_shrink)`` of `grid.clipped_group_params`, or None for the plain min/max grid.
    """

    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    clip: tuple[float, int, float] | None = None

    @classmethod
    def empty(cls, w: torch.Tensor, groups: int, bits: int, symmetric: bool,
              clip: tuple[float, int, float] | None = None) -> "_Grid":
        scales = w.new_zeros(groups, w.shape[0])
        return cls(scales, None if symmetric else torch.zeros_like(scales), bits, clip)

    def fit(self, g: int, columns: torch.Tensor) -> None:
        """Set group ``g``'s grid from the weight ``columns`` ``(N, width)`` it covers."""
        if self.clip is None:
            scale, zero = group_params(columns, self.bits, self.zeros is None)
        else:
            scale, zero = clipped_group_params(columns, self.bits, self.zeros is None, *self.clip)
        self.scales[g] = scale
        if self.zeros is not None:
            self.zeros[g] = zero

    def codes(self, column: torch.Tensor, g: int, keep: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of ``column`` on group ``g``'s grid; rows where ``keep`` is False get the
        zero point's code, which decodes to exactly 0."""
        zero = self._zero(g)
        codes = grid_codes(column, self.scales[g], zero, self.bits, out=out)
        if keep is not None:
            codes.copy_(torch.where(keep, codes, torch.as_tensor(zero, dtype=codes.dtype, device=codes.device)))
        return codes

    def decode_column(self, codes: torch.Tensor, g: int, out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.sub(codes, self._zero(g), out=out)
        return out.mul_(self.scales[g])

    def decode(self, codes: torch.Tensor, group_of: torch.Tensor) -> torch.Tensor:
        """The values of all ``codes`` ``(N, K)``, column ``j`` on group ``group_of[j]``'s grid."""
        scales, zeros = self.per_row()
        zero = packing.default_zero(self.bits) if zeros is None else zeros[:, group_of]
        return (codes - zero) * scales[:, group_of]

    def per_row(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales and zero points laid out ``(N, groups)``, as the packed format stores them."""
        return self.scales.T, None if self.zeros is None else self.zeros.T

    def _zero(self, g: int) -> torch.Tensor | float:
        return packing.default_zero(self.bits) if self.zeros is None else self.zeros[g]


def _group_aware_order(diagonal: torch.Tensor, group: int) -> torch.Tensor:
    """GPTQModel's group-aware column order: whole groups by decreasing largest ``H_jj``,
    columns inside each by decreasing ``H_jj``; a partial last group stays last."""
    full = diagonal.numel() // group * group
    blocks = diagonal[:full].reshape(-1, group)
    inside = torch.argsort(blocks, dim=1, descending=True, stable=True)
    inside += torch.arange(0, full, group, device=diagonal.device)[:, None]
    order = torch.argsort(blocks.amax(dim=1), descending=True, stable=True)
    tail = full + torch.argsort(diagonal[full:], descending=True, stable=True)
    return torch.cat([inside[order].reshape(-1), tail])


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
    sub_block: int, keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop with lazy updates at two levels (METHODS.md §8 step 7).

    Works on ``wt = wᵀ`` so that a weight column is a contiguous row. Inside a block of
    ``block_size`` columns, each column's error updates only the rest of its
    ``sub_block`` columns one by one; a finished sub-block updates the rest of the
    block, and a finished block the columns after it, both as one matrix product. That is
    the same arithmetic as the column-by-column loop in another order, with most of it in
    matrix products instead of rank-1 updates.

    ``group_of[j]`` is the group of (permuted) column ``j``. With ``dynamic_group``, the
    grid of each group is fitted on its current columns when its first column comes up
    (groups are then ``dynamic_group`` consecutive permuted columns). Returns float codes in
    the (permuted) column order of ``w`` and the tracked loss per row.
    """
    rows, columns = w.shape
    wt = w.T.contiguous()
    codes = torch.zeros_like(wt)
    keep = None if keep is None else keep.T.contiguous()
    row_loss = w.new_zeros(rows)
    inverse_diagonal = (1 / u.diagonal()).tolist()
    decoded = w.new_empty(rows)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        errors = w.new_zeros(end - start, rows)
        for sub in range(start, end, sub_block):
            sub_end = min(sub + sub_block, end)
            for col in range(sub, sub_end):
                if dynamic_group is not None and col % dynamic_group == 0:
                    stop = min(col + dynamic_group, columns)
                    current = _current_columns(wt, errors, u, start, end, sub, sub_end, col, stop)
                    grid.fit(group_of[col], current.T)
                g, error = group_of[col], errors[col - start]
                code = codes[col]
                grid.codes(wt[col], g, None if keep is None else keep[col], out=code)
                grid.decode_column(code, g, out=decoded)
                torch.sub(wt[col], decoded, out=error)
                error.mul_(inverse_diagonal[col])
                wt[col + 1:sub_end].addr_(u[col, col + 1:sub_end], error, alpha=-1)
            wt[sub_end:end].addmm_(u[sub:sub_end, sub_end:end].T, errors[sub - start:sub_end - start], alpha=-1)
        row_loss += errors.square().sum(dim=0) / 2
        wt[end:].addmm_(u[start:end, end:].T, errors, alpha=-1)
    return codes.T, row_loss


def _current_columns(
    wt: torch.Tensor, errors: torch.Tensor, u: torch.Tensor, start: int, end: int, sub: int, sub_end: int, col: int,
    stop: int,
) -> torch.Tensor:
    """The error-updated values (transposed, ``(stop − col, N)``) of columns ``[col, stop)``
    just before column ``col`` is quantized, inside block ``[start, end)`` and sub-block
    ``[sub, sub_end)``.

    Columns of the sub-block are current in ``wt``; the rest of the block still lacks
    the update from the sub-block's columns before ``col``, and columns after the block
    the update from all of the block's columns before ``col``; both are applied here.
    """
    parts = [wt[col:min(stop, sub_end)]]
    if stop > sub_end:
        upto = min(stop, end)
        parts.append(wt[sub_end:upto] - u[sub:col, sub_end:upto].T @ errors[sub - start:col - start])
    if stop > end:
        parts.append(wt[end:stop] - u[start:col, end:stop].T @ errors[:col - start])
    return torch.cat(parts)


def relative_output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """``‖X (W − Q)ᵀ‖_F / ‖X Wᵀ‖_F`` on the calibration inputs, from ``H ∝ XᵀX`` alone."""
    reference, error = _row_energies(weight, [approximation], hessian).sum(dim=1).tolist()
    return _energy_ratio(error, reference)


def _row_energies(weight: torch.Tensor, approximations: list[torch.Tensor], hessian: torch.Tensor) -> torch.Tensor:
    """``r H rᵀ`` for every row ``r`` of ``W`` and of each ``W − A``: shape ``(1 + len(approximations), N)``,
    in one product (GPTQ records the errors of its result and of RTN for every layer)."""
    w = weight.detach().to(hessian)
    rows = torch.stack([w, *(w - a.detach().to(hessian) for a in approximations)])
    return (rows @ hessian * rows).sum(dim=-1)


def _energy_ratio(error: float, reference: float) -> float:
    """``sqrt(error / reference)``, the relative output error, with rounding below 0 clamped."""
    error = max(error, 0.0)
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
            for batch in _stackable(gm, todo):
                if hessian.rows == 0:
                    records.update((path, LayerRecord(path, "skipped", "it received no calibration inputs"))
                                   for (_, path, _), _ in batch)
                else:
                    with single_thread():
                        records.update(self._quantize_layers(gm, batch, hessian.hessian, hessian.rows))
        return [records[path] for _, path, _ in group]

    def _quantize_layers(self, gm: fx.GraphModule, batch: list[tuple[_Layer, GPTQConfig]], hessian: torch.Tensor,
                         rows: int) -> dict[str, LayerRecord]:
        """Run GPTQ on layers with one input and config, stacked along the rows (module doc),
        replace each by its packed form and record its statistics."""
        config = batch[0][1]
        paths = [path for (_, path, _), _ in batch]
        weights = [gm.get_submodule(path).weight.detach() for path in paths]
        meta = get_meta(batch[0][0][0])
        pruned = meta is not None and meta.sparsity is not None  # masks applied: keep the zeros they left
        weight, sizes = torch.cat(weights), [w.shape[0] for w in weights]
        result = gptq_quantize(
            weight, hessian, config.bits, config.group_size, config.symmetric,
            act_order=config.act_order, static_groups=config.static_groups,
            act_group_aware=config.act_group_aware, block_size=config.block_size,
            damp_percent=config.damp_percent, mse=config.mse, mse_steps=config.mse_steps,
            mse_max_shrink=config.mse_max_shrink, name=", ".join(paths), mask=weight != 0 if pruned else None,
        )
        # RTN's grids are per row, so the stacked weight gives every layer its own RTN result.
        rtn = quantize_weight(weight, config.bits, config.group_size, config.symmetric, name=", ".join(paths))
        energies = _row_energies(weight, [result.weight, rtn.dequantize()], hessian).split(sizes, dim=1)
        records = {}
        for ((node, path, _), _), w, result, energy in zip(batch, weights, result.split(sizes), energies):
            reference, error, rtn_error = energy.sum(dim=1).tolist()
            stats = {
                "bits": config.bits,
                "group_size": result.quantized.group_size,
                "act_order": config.act_order,
                "act_group_aware": config.act_group_aware,
                "samples": rows,
                "damp_percent": result.damp,
                "gptq_loss": result.loss,
                "output_error": _energy_ratio(error, reference),
                "rtn_output_error": _energy_ratio(rtn_error, reference),
                "rel_error": relative_error(w, result.weight),
            }
            scheme = QuantScheme(bits=config.bits, group_size=result.quantized.group_size,
                                 symmetric=config.symmetric, method=self.name)
            replace_linear(gm, node, result.quantized, scheme, recompile=False)
            log.debug("gptq: %s -> %s, output error %.3g (rtn %.3g)", path, scheme.describe(),
                      stats["output_error"], stats["rtn_output_error"])
            records[path] = LayerRecord(path, "quantized", stats=stats)
        return records


def _stackable(gm: fx.GraphModule, todo: list[tuple[_Layer, GPTQConfig]]) -> list[list[tuple[_Layer, GPTQConfig]]]:
    """Layers (sharing one input) in runs that GPTQ can quantize as one stacked weight:
    equal configs and weight dtypes; a pruned layer (its mask is its own) runs alone."""
    def key(item: tuple[_Layer, GPTQConfig]) -> Any:
        (node, path, _), config = item
        meta = get_meta(node)
        pruned = meta is not None and meta.sparsity is not None
        return path if pruned else (config, gm.get_submodule(path).weight.dtype)

    runs: list[list[tuple[_Layer, GPTQConfig]]] = []
    for item in todo:
        if runs and key(runs[-1][0]) == key(item):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


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
