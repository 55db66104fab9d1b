"""Per-layer quantization sensitivity for mixed precision: which layers need more bits.

`sensitivity` quantizes one ``nn.Linear`` at a time (RTN grid, each candidate bit
width) with every other layer in floating point, runs the calibration data and records
the model's relative output error ``‖y_q − y‖_F / ‖y‖_F`` over all calibration
outputs. `SensitivityReport.table` and `SensitivityReport.plot` show it;
`SensitivityReport.suggest_overrides` picks per-layer bits under an error budget or a
target average bit width and returns the ``overrides`` mapping of a recipe's
``rtn``/``gptq`` pass (``{layer: {"bits": b, "group_size": g}}``).

The joint error of several quantized layers is estimated as ``√Σ e_l²`` (independent
per-layer errors); it is an estimate, the measured joint error can differ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from lowbit.calibration import CalibrationSet, calibration_set
from lowbit.errors import CalibrationError, LowbitError
from lowbit.ir.variants import fit_batches, run_batch
from lowbit.passes.quant.grid import GRID_BITS, quantize_weight
from lowbit.passes.quant.rewrite import linear_nodes, unsupported_reason

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("rtn",)


@dataclass(frozen=True)
class SensitivityReport:
    """Relative model output error per layer (graph order) and candidate bit width.

    ``errors[layer][bits]``; ``weights[layer]`` is the layer's weight count (used to
    average bit widths); ``skipped[layer]`` says why a layer was not measured.
    """

    bits: tuple[int, ...]
    group_size: int
    method: str
    errors: dict[str, dict[int, float]]
    weights: dict[str, int]
    skipped: dict[str, str] = field(default_factory=dict)

    def ranking(self) -> list[str]:
        """Layers from most to least sensitive (error at the lowest candidate width)."""
        low = min(self.bits)
        return sorted(self.errors, key=lambda layer: self.errors[layer][low], reverse=True)

    def table(self) -> str:
        """A fixed-width text table: one row per layer, one error column per bit width, most sensitive first."""
        width = max([len("layer"), *(len(layer) for layer in self.errors)])
        header = f"{'layer':<{width}}  {'weights':>9}  " + "  ".join(f"{f'w{b}':>9}" for b in self.bits)
        rows = [header, "-" * len(header)]
        for layer in self.ranking():
            cells = "  ".join(f"{self.errors[layer][b]:>9.3e}" for b in self.bits)
            rows.append(f"{layer:<{width}}  {self.weights[layer]:>9}  {cells}")
        rows += [f"{layer:<{width}}  skipped: {reason}" for layer, reason in self.skipped.items()]
        title = f"relative output error, one layer quantized ({self.method}, group size {self.group_size})"
        return "\n".join([title, *rows])

    def plot(self, path: str | Path) -> Path:
        """Write a PNG: error (log scale) per layer in graph order, one line per bit width."""
        from matplotlib.figure import Figure

        layers = list(self.errors)
        figure = Figure(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.5), layout="constrained")
        axes = figure.subplots()
        for bits in self.bits:
            values = [max(self.errors[layer][bits], 1e-12) for layer in layers]
            axes.plot(range(len(layers)), values, marker="o", label=f"w{bits}")
        axes.set_yscale("log")
        axes.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
        axes.set_ylabel("relative output error")
        axes.set_title(f"per-layer sensitivity ({self.method}, g{self.group_size})")
        axes.legend()
        path = Path(path)
        figure.savefig(path, dpi=100)
        return path

    def estimated_error(self, choice: dict[str, int]) -> float:
        """``√Σ e_l(b_l)²`` for a bit width per layer (layers not named stay in floating point)."""
        return math.sqrt(sum(self.errors[layer][bits] ** 2 for layer, bits in choice.items()))

    def average_bits(self, choice: dict[str, int]) -> float:
        """Weight-count-weighted mean code width of the measured layers under ``choice``."""
        total = sum(self.weights[layer] for layer in choice)
        return sum(self.weights[layer] * bits for layer, bits in choice.items()) / total

    def suggest_overrides(
        self, *, max_error: float | None = None, average_bits: float | None = None
    ) -> dict[str, dict[str, int]]:
        """Per-layer ``{"bits", "group_size"}`` overrides meeting an error budget or a target average width.

        Give exactly one of ``max_error`` (the estimated joint error, `estimated_error`,
        stays at or below it: as few bits as that allows) or ``average_bits`` (the
        weighted average width drops to it or below, adding as little error as
        possible). Greedy: start every layer at the widest candidate and repeatedly
        narrow the layer whose next width costs the least added squared error per
        weight bit saved.
        """
        if (max_error is None) == (average_bits is None):
            raise LowbitError("suggest_overrides needs exactly one of max_error or average_bits")
        if max_error is not None and not max_error >= 0:
            raise LowbitError(f"max_error must be >= 0, got {max_error!r}")
        if average_bits is not None and average_bits < min(self.bits):
            raise LowbitError(f"average_bits={average_bits} is below the narrowest candidate width {min(self.bits)}")
        widths = sorted(self.bits)
        choice = {layer: widths[-1] for layer in self.errors}
        while average_bits is None or self.average_bits(choice) > average_bits:
            moves = []
            for layer, bits in choice.items():
                index = widths.index(bits)
                if index == 0:
                    continue
                trial = {**choice, layer: widths[index - 1]}
                if max_error is not None and self.estimated_error(trial) > max_error:
                    continue
                added = self.errors[layer][widths[index - 1]] ** 2 - self.errors[layer][bits] ** 2
                moves.append((added / (self.weights[layer] * (bits - widths[index - 1])), layer, widths[index - 1]))
            if not moves:
                break
            _, layer, bits = min(moves)
            choice[layer] = bits
        if max_error is not None and self.estimated_error(choice) > max_error:
            raise LowbitError(
                f"max_error={max_error} cannot be met: the widest candidate ({widths[-1]} bits) on every layer "
                f"already gives an estimated error of {self.estimated_error(choice):.3g}"
            )
        return {layer: {"bits": bits, "group_size": self.group_size} for layer, bits in choice.items()}


def sensitivity(
    gm: fx.GraphModule,
    calibration: Any,
    bits: Iterable[int] = (2, 3, 4, 8),
    group_size: int = 128,
    method: str = "rtn",
) -> SensitivityReport:
    """Measure each ``nn.Linear``'s output error when only it is quantized, at each of ``bits`` (module doc).

    ``calibration`` is a `CalibrationSet` or what `lowbit.calibration.calibration_set`
    accepts (batches shaped like the model's inputs). ``gm`` is restored afterwards.
    """
    widths = tuple(sorted(set(bits)))
    bad = [b for b in widths if b not in GRID_BITS]
    if not widths or bad:
        raise LowbitError(f"sensitivity: bits must be among {', '.join(map(str, GRID_BITS))}, got {tuple(bits)!r}")
    if method not in METHODS:
        raise LowbitError(f"sensitivity: unknown method {method!r}; supported: {', '.join(METHODS)}")
    batches = _batches(calibration)
    training = gm.training
    gm.eval()
    try:
        return _measure(gm, batches, widths, group_size, method)
    finally:
        gm.train(training)


def _measure(
    gm: fx.GraphModule, batches: CalibrationSet, widths: tuple[int, ...], group_size: int, method: str
) -> SensitivityReport:
    reference = _outputs(gm, batches)
    errors: dict[str, dict[int, float]] = {}
    weights: dict[str, int] = {}
    skipped: dict[str, str] = {}
    layers = list(dict.fromkeys(path for _, path, _ in linear_nodes(gm)))
    for index, path in enumerate(layers):
        reason = unsupported_reason(gm, path) or _parametrized(gm, path)
        if reason is not None:
            log.info("sensitivity: skipping %s: %s", path, reason)
            skipped[path] = reason
            continue
        weight = gm.get_submodule(path).weight
        original = weight.detach().clone()
        errors[path] = {}
        try:
            for width in widths:
                quantized = quantize_weight(original, width, group_size, True, name=path).dequantize()
                with torch.no_grad():
                    weight.copy_(quantized.to(weight.dtype))
                errors[path][width] = _relative_error(reference, _outputs(gm, batches))
        finally:
            with torch.no_grad():
                weight.copy_(original)
        weights[path] = original.numel()
        log.info(
            "sensitivity: %d/%d %s %s",
            index + 1,
            len(layers),
            path,
            ", ".join(f"w{b}={e:.3g}" for b, e in errors[path].items()),
        )
    return SensitivityReport(widths, group_size, method, errors, weights, skipped)


def _parametrized(gm: fx.GraphModule, path: str) -> str | None:
    if parametrize.is_parametrized(gm.get_submodule(path), "weight"):
        return "its weight is parametrized (fake-quant or reparameterization); convert or fold it first"
    return None


def _batches(calibration: Any) -> CalibrationSet:
    if isinstance(calibration, CalibrationSet):
        return calibration
    if calibration is None:
        raise CalibrationError("sensitivity needs calibration data")
    items = list(calibration) if isinstance(calibration, Iterable) and not isinstance(calibration, torch.Tensor) else []
    if not items:
        raise CalibrationError("sensitivity: calibration must be a non-empty iterable of input batches")
    first = items[0]
    if isinstance(first, dict):
        return calibration_set(items, (), first)
    return calibration_set(items, (first,) if isinstance(first, torch.Tensor) else tuple(first))


def _outputs(gm: fx.GraphModule, batches: CalibrationSet) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            leaf.detach().float()
            for args, kwargs in fit_batches(gm, batches)
            for leaf in tree_leaves(run_batch(gm, args, kwargs))
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
        ]


def _relative_error(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    diff = sum(float((o - r).pow(2).sum()) for r, o in zip(reference, outputs))
    norm = sum(float(r.pow(2).sum()) for r in reference)
    return math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)


__all__ = ["SensitivityReport", "sensitivity"]
