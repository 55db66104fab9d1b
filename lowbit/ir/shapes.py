"""Symbolic input dimensions: ``compile(..., dynamic_shapes=...)`` for graphs that serve a range of shapes.

A spec maps an input's name (a ``forward`` argument) to its dimensions, each a ``torch.export.Dim`` or a
``(min, max)`` pair: ``{"input_ids": {0: (1, 32), 1: (1, 128)}}``. A dimension is a `SymbolicDim`, one name and
one inclusive range; Dims of the same name, or pairs of the same axis and range, are one symbol wherever they
appear (``input_ids`` and ``attention_mask`` share their batch and sequence). The traced graph keeps them symbolic
(torch.export), and `SymbolicDim.check` refuses a size outside the range before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import InputShapeError, LowbitError, TraceError

#: ``gm.meta`` key: ``{symbol: SymbolicDim}`` of a graph traced with symbolic dimensions (its placeholders' sizes
#: are those symbols).
SYMBOLIC_DIMS = "lowbit_symbolic_dims"


class SymbolicDimError(TraceError):
    """A dimension given in ``dynamic_shapes`` did not stay symbolic: the model ties it to a size."""


@dataclass(frozen=True)
class SymbolicDim:
    """One symbolic dimension: its name and inclusive range of sizes."""

    name: str
    low: int
    high: int

    def dim(self) -> Any:
        """The ``torch.export.Dim`` of this dimension."""
        return torch.export.Dim(self.name, min=self.low, max=self.high)

    def check(self, size: int, where: str) -> None:
        """`InputShapeError` for a ``size`` outside the range (``where`` names the input and dimension)."""
        if not self.low <= size <= self.high:
            raise InputShapeError(
                f"{where} has size {size}, outside the compiled range {self.low}..{self.high} of dimension "
                f"'{self.name}'; pass sizes in the range, or compile again with a wider range in dynamic_shapes"
            )


def parse(dynamic_shapes: Any, example: Mapping[str, torch.Tensor]) -> dict[str, dict[int, SymbolicDim]]:
    """``dynamic_shapes`` as ``{input: {axis: SymbolicDim}}``, checked against the ``example`` inputs by name."""
    if not isinstance(dynamic_shapes, Mapping):
        raise LowbitError(
            "dynamic_shapes must map input names to their dimensions, e.g. {'input_ids': {0: (1, 32), 1: (1, 128)}}"
        )
    unknown = sorted(str(name) for name in dynamic_shapes if name not in example)
    if unknown:
        raise LowbitError(f"dynamic_shapes names {unknown}; the model's tensor inputs are {sorted(example)}")
    parsed: dict[str, dict[int, SymbolicDim]] = {}
    for name, axes in dynamic_shapes.items():
        if axes is None:
            continue
        if not isinstance(axes, Mapping):
            raise LowbitError(f"dynamic_shapes[{name!r}] must map dimensions to ranges, got {axes!r}")
        value = example[name]
        parsed[name] = {}
        for axis, spec in axes.items():
            if not isinstance(axis, int) or not -value.dim() <= axis < value.dim():
                raise LowbitError(f"dynamic_shapes[{name!r}]: {axis!r} is not a dimension of a {value.dim()}-D input")
            dim = _symbolic(spec, axis % value.dim(), f"dynamic_shapes[{name!r}][{axis}]")
            dim.check(int(value.shape[axis]), f"the example input '{name}' dimension {axis}")
            parsed[name][axis % value.dim()] = dim
    return parsed


def _symbolic(spec: Any, axis: int, where: str) -> SymbolicDim:
    if hasattr(spec, "min") and hasattr(spec, "max") and hasattr(spec, "__name__"):  # torch.export.Dim
        low, high = int(spec.min), int(spec.max)
        if high > 2**31:
            raise LowbitError(f"{where}: Dim {spec.__name__!r} needs a max (the compiled range is finite)")
        return _checked(spec.__name__, low, high, where)
    if isinstance(spec, tuple | list) and len(spec) == 2 and all(isinstance(v, int) for v in spec):
        low, high = spec
        return _checked(f"d{axis}_{low}_{high}", low, high, where)
    raise LowbitError(f"{where} must be (min, max) or a torch.export.Dim, got {spec!r}")


def _checked(name: str, low: int, high: int, where: str) -> SymbolicDim:
    if not 1 <= low <= high:
        raise LowbitError(f"{where}: the range {low}..{high} must satisfy 1 <= min <= max")
    return SymbolicDim(name, low, high)


def export_shapes(parsed: Mapping[str, Mapping[int, SymbolicDim]]) -> dict[str, dict[int, Any]]:
    """torch.export's ``dynamic_shapes`` for ``parsed``, one ``Dim`` object per symbol."""
    dims: dict[str, Any] = {}
    return {
        name: {axis: dims.setdefault(dim.name, dim.dim()) for axis, dim in axes.items()}
        for name, axes in parsed.items()
    }


def symbolic_axes(gm: Any) -> dict[str, dict[int, SymbolicDim]]:
    """Per placeholder of a graph traced with symbolic dimensions (`SYMBOLIC_DIMS`), its symbolic axes."""
    found = gm.meta.get(SYMBOLIC_DIMS, {})
    axes: dict[str, dict[int, SymbolicDim]] = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            symbolic = {axis: found[str(size)] for axis, size in enumerate(value.shape) if str(size) in found}
            if symbolic:
                axes[str(node.target)] = symbolic
    return axes


def check_symbolic(axes: Mapping[str, Mapping[int, SymbolicDim]], values: Mapping[str, torch.Tensor]) -> None:
    """`InputShapeError` for an input whose symbolic dimension is outside its range, or a symbol at two sizes."""
    sizes: dict[str, tuple[int, str]] = {}
    for name, by_axis in axes.items():
        value = values.get(name)
        if value is None:
            continue
        for axis, dim in by_axis.items():
            where = f"input '{name}' dimension {axis}"
            if value.dim() <= axis:
                raise InputShapeError(f"{where} does not exist: the input has shape {tuple(value.shape)}")
            size = int(value.shape[axis])
            dim.check(size, where)
            seen, other = sizes.setdefault(dim.name, (size, where))
            if seen != size:
                raise InputShapeError(
                    f"{where} has size {size}, but {other} has size {seen}; both are dimension '{dim.name}', which "
                    "the model was compiled with equal"
                )


__all__ = [
    "SYMBOLIC_DIMS",
    "SymbolicDim",
    "SymbolicDimError",
    "check_symbolic",
    "export_shapes",
    "parse",
    "symbolic_axes",
]
