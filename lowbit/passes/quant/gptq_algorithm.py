"""The GPTQ algorithm on one weight and its input Hessian; the math is in docs/methods.md (GPTQ).

`gptq_quantize` quantizes a weight column by column on the project grid
(`lowbit.passes.quant.grid`), spreading each column's rounding error over the columns not
yet quantized through the inverse Hessian's Cholesky factor, so that the layer's output error
on the calibration data is what gets minimised. `GPTQOptions` holds its settings; the
``gptq`` pass (`lowbit.passes.quant.gptq`) captures the Hessians and calls it per layer.

The blocked column loop equals the unblocked column-by-column algorithm for every block and
group size: a dynamic group's grid is fitted on the truly current columns, pending lazy
updates included.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from lowbit.errors import LowbitError
from lowbit.ir import packing
from lowbit.passes.quant.grid import (
    QuantizedWeight,
    clipped_group_params,
    effective_group_size,
    grid_codes,
    group_params,
)
from lowbit.passes.quant.threads import single_thread

log = logging.getLogger(__name__)

#: How many times the damping is multiplied by 10 before a Cholesky failure is an error.
DAMP_RETRIES = 5


@dataclass(frozen=True)
class GPTQOptions:
    """Settings of one `gptq_quantize` call; the defaults are the reference algorithm's.

    ``act_order`` quantizes columns by decreasing ``H_jj`` (a ``g_idx`` per column unless
    ``static_groups`` fits every group's grid on the original weight first);
    ``act_group_aware`` orders whole groups by their largest ``H_jj`` and the columns inside
    each (no ``g_idx``); ``mse`` > 0 fits each group's grid by `grid.clipped_group_params`
    (``mse_steps``, ``mse_max_shrink``); ``damp_percent`` is added to ``H``'s diagonal as a
    fraction of its mean; ``divisible_groups`` and ``scale_dtype`` choose the group width and round the scales
    (`grid.effective_group_size`, `grid.round_scales`) before any code is computed on them. ``block_size`` and
    ``sub_block`` (`_quantize_columns`) only change the speed.
    """

    bits: int
    group_size: int = -1
    symmetric: bool = False
    act_order: bool = False
    static_groups: bool = False
    act_group_aware: bool = False
    block_size: int = 128
    sub_block: int = 16
    damp_percent: float = 0.01
    mse: float = 0.0
    mse_steps: int = 100
    mse_max_shrink: float = 0.8
    divisible_groups: bool = False
    scale_dtype: torch.dtype = torch.float32


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

    def split(self, sizes: list[int]) -> list[GPTQResult]:
        """The results of the weights stacked along the rows, ``sizes[i]`` rows each."""
        qw, parts = self.quantized, []
        for codes, scales, zeros, weight, loss in zip(
            qw.codes.split(sizes),
            qw.scales.split(sizes),
            [None] * len(sizes) if qw.zeros is None else qw.zeros.split(sizes),
            self.weight.split(sizes),
            self.row_loss.split(sizes),
        ):
            parts.append(
                GPTQResult(
                    replace(qw, codes=codes, scales=scales, zeros=zeros), weight, float(loss.sum()), self.damp, loss
                )
            )
        return parts


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    options: GPTQOptions,
    *,
    name: str | None = None,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``weight`` ``(N, K)`` with GPTQ given its input Hessian ``hessian`` ``(K, K)``.

    Computes in float32 (float64 if ``weight`` is float64). ``name`` (the layer's module
    path) is used in errors and log messages. ``mask`` (bool ``(N, K)``, True = kept) fixes
    a pruning pattern: pruned weights quantize to exactly zero while their error still
    flows to later columns (SparseGPT's fixed-mask update).
    """
    o, where = options, f"layer '{name}': " if name else ""
    if o.block_size < 1 or o.sub_block < 1:
        raise LowbitError(f"{where}block_size and sub_block must be at least 1, got {o.block_size} and {o.sub_block}")
    if o.act_order and o.act_group_aware:
        raise LowbitError(f"{where}act_order and act_group_aware are two column orders; choose one")
    w = _checked_weight(weight, where)
    h = hessian.detach().to(w).clone()
    columns = w.shape[1]
    group = effective_group_size(o.group_size, columns, o.divisible_groups)
    static = o.static_groups and group < columns
    _drop_dead_inputs(w, h)
    clip = (o.mse, o.mse_steps, o.mse_max_shrink) if o.mse > 0 else None
    grid = _Grid.empty(w, packing.num_groups(columns, group), o.bits, o.symmetric, clip, o.scale_dtype)
    if static:
        for g, start in enumerate(range(0, columns, group)):
            grid.fit(g, w[:, start : start + group])
    natural = torch.arange(columns, device=w.device)
    if o.act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    elif o.act_group_aware:
        perm = _group_aware_order(h.diagonal(), group)
    else:
        perm = natural
    w, h = w[:, perm], h[perm][:, perm]
    group_of = (perm if static or o.act_group_aware else natural) // group
    keep = None if mask is None else mask[:, perm]
    with single_thread():
        u, damp = _inverse_cholesky_factor(h, o.damp_percent, where)
        codes, row_loss = _quantize_columns(
            w, u, grid, group_of.tolist(), None if static else group, o.block_size, o.sub_block, keep
        )
    q = grid.decode(codes, group_of)
    inverse = torch.argsort(perm)
    g_idx = (inverse // group).to(torch.int32) if o.act_order and not static and group < columns else None
    scales, zeros = grid.per_row()
    quantized = QuantizedWeight(
        codes[:, inverse].to(torch.uint8),
        scales.float().contiguous(),
        None if zeros is None else zeros.float().contiguous(),
        g_idx,
        o.bits,
        group,
    )
    return GPTQResult(quantized, q[:, inverse], float(row_loss.sum()), damp, row_loss)


@dataclass
class _Grid:
    """Per-group scales and zero points (None when symmetric), filled in as GPTQ goes.

    Stored group-major, ``(groups, N)``, so that one group's grid is contiguous for the
    column loop; `per_row` gives the format's ``(N, groups)``. ``clip`` is ``(norm, steps,
    max_shrink)`` of `grid.clipped_group_params`, or None for the plain min/max grid; the scales take
    ``scale_dtype``'s values (`grid.round_scales`).
    """

    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    clip: tuple[float, int, float] | None = None
    scale_dtype: torch.dtype = torch.float32

    @classmethod
    def empty(
        cls,
        w: torch.Tensor,
        groups: int,
        bits: int,
        symmetric: bool,
        clip: tuple[float, int, float] | None = None,
        scale_dtype: torch.dtype = torch.float32,
    ) -> _Grid:
        scales = w.new_zeros(groups, w.shape[0])
        return cls(scales, None if symmetric else torch.zeros_like(scales), bits, clip, scale_dtype)

    def fit(self, g: int, columns: torch.Tensor) -> None:
        """Set group ``g``'s grid from the weight ``columns`` ``(N, width)`` it covers."""
        if self.clip is None:
            scale, zero = group_params(columns, self.bits, self.zeros is None, self.scale_dtype)
        else:
            scale, zero = clipped_group_params(
                columns, self.bits, self.zeros is None, *self.clip, scale_dtype=self.scale_dtype
            )
        self.scales[g] = scale
        if self.zeros is not None:
            self.zeros[g] = zero

    def codes(
        self, column: torch.Tensor, g: int, keep: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
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
        log.warning(
            "%sthe damped Hessian is not positive definite at damp_percent=%g; retrying with %g", where, damp, damp * 10
        )
        damp *= 10
    raise LowbitError(
        f"{where}the Hessian stays numerically singular up to damp_percent={damp / 10:g}; "
        "use more calibration samples or ignore this layer"
    )


def _quantize_columns(
    w: torch.Tensor,
    u: torch.Tensor,
    grid: _Grid,
    group_of: list[int],
    dynamic_group: int | None,
    block_size: int,
    sub_block: int,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop with lazy updates at two levels; docs/methods.md (GPTQ).

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
                wt[col + 1 : sub_end].addr_(u[col, col + 1 : sub_end], error, alpha=-1)
            wt[sub_end:end].addmm_(u[sub:sub_end, sub_end:end].T, errors[sub - start : sub_end - start], alpha=-1)
        row_loss += errors.square().sum(dim=0) / 2
        wt[end:].addmm_(u[start:end, end:].T, errors, alpha=-1)
    return codes.T, row_loss


def _current_columns(
    wt: torch.Tensor,
    errors: torch.Tensor,
    u: torch.Tensor,
    start: int,
    end: int,
    sub: int,
    sub_end: int,
    col: int,
    stop: int,
) -> torch.Tensor:
    """The error-updated values (transposed, ``(stop − col, N)``) of columns ``[col, stop)``
    just before column ``col`` is quantized, inside block ``[start, end)`` and sub-block
    ``[sub, sub_end)``.

    Columns of the sub-block are current in ``wt``; the rest of the block still lacks
    the update from the sub-block's columns before ``col``, and columns after the block
    the update from all of the block's columns before ``col``; both are applied here.
    """
    parts = [wt[col : min(stop, sub_end)]]
    if stop > sub_end:
        upto = min(stop, end)
        parts.append(wt[sub_end:upto] - u[sub:col, sub_end:upto].T @ errors[sub - start : col - start])
    if stop > end:
        parts.append(wt[end:stop] - u[start:col, end:stop].T @ errors[: col - start])
    return torch.cat(parts)


def relative_output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """``‖X (W − Q)ᵀ‖_F / ‖X Wᵀ‖_F`` on the calibration inputs, from ``H ∝ XᵀX`` alone."""
    reference, error = row_energies(weight, [approximation], hessian).sum(dim=1).tolist()
    return energy_ratio(error, reference)


def row_energies(weight: torch.Tensor, approximations: list[torch.Tensor], hessian: torch.Tensor) -> torch.Tensor:
    """``r H rᵀ`` for every row ``r`` of ``W`` and of each ``W − A``: shape ``(1 + len(approximations), N)``,
    in one product (GPTQ records the errors of its result and of RTN for every layer)."""
    w = weight.detach().to(hessian)
    rows = torch.stack([w, *(w - a.detach().to(hessian) for a in approximations)])
    return (rows @ hessian * rows).sum(dim=-1)


def energy_ratio(error: float, reference: float) -> float:
    """``sqrt(error / reference)``, the relative output error, with rounding below 0 clamped."""
    error = max(error, 0.0)
    if reference <= 0:
        return 0.0 if error == 0 else math.inf
    return math.sqrt(error / reference)


__all__ = [
    "DAMP_RETRIES",
    "GPTQOptions",
    "GPTQResult",
    "energy_ratio",
    "gptq_quantize",
    "relative_output_error",
    "row_energies",
]
