"""Calibration data: validated once against the example inputs, then iterated by passes.

Accepted forms: an iterable (list, generator, DataLoader) whose items are a tensor, a
tuple/list of tensors (positional inputs), or a dict (keyword inputs). Each batch must
match the example inputs in count, names, dtype, rank and every dimension but the
batch dimension (dim 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import torch

from lowbit.errors import CalibrationError

Batch = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class CalibrationSet:
    """Validated calibration batches as (args, kwargs) pairs."""

    batches: tuple[Batch, ...]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    @property
    def num_samples(self) -> int:
        """Total rows along the batch dimension over all batches."""
        return sum(_batch_size(args, kwargs) for args, kwargs in self.batches)


def calibration_set(data: Any, example_inputs: tuple, example_kwargs: Mapping[str, Any] | None = None) -> CalibrationSet:
    """Validate ``data`` against the example inputs and materialize it as a `CalibrationSet`."""
    if isinstance(data, CalibrationSet):
        return data
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise CalibrationError(
            f"calibration must be an iterable of input batches (a list of tuples or a DataLoader), not {type(data).__name__}"
        )
    example_kwargs = dict(example_kwargs or {})
    batches = tuple(_check_batch(i, item, example_inputs, example_kwargs) for i, item in enumerate(data))
    if not batches:
        raise CalibrationError("calibration data is empty: give at least one batch of example-shaped inputs")
    return CalibrationSet(batches)


def _check_batch(index: int, item: Any, example_inputs: tuple, example_kwargs: dict[str, Any]) -> Batch:
    if isinstance(item, torch.Tensor):
        args, kwargs = (item,), {}
    elif isinstance(item, (tuple, list)):
        args, kwargs = tuple(item), {}
    elif isinstance(item, Mapping):
        args, kwargs = (), dict(item)
    else:
        raise CalibrationError(f"calibration batch {index} is a {type(item).__name__}; expected a tensor, tuple or dict")
    if len(args) != len(example_inputs):
        raise CalibrationError(
            f"calibration batch {index} has {len(args)} positional inputs, the example inputs have {len(example_inputs)}"
            + (" (drop labels from the batches)" if len(args) > len(example_inputs) else "")
        )
    if set(kwargs) != set(example_kwargs):
        raise CalibrationError(
            f"calibration batch {index} has keyword inputs {sorted(kwargs)}, the example inputs have {sorted(example_kwargs)}"
        )
    for name, value, example in [(str(i), a, e) for i, (a, e) in enumerate(zip(args, example_inputs))] + [
        (k, kwargs[k], v) for k, v in example_kwargs.items()
    ]:
        _check_tensor(index, name, value, example)
    return args, kwargs


def _check_tensor(index: int, name: str, value: Any, example: Any) -> None:
    if not isinstance(example, torch.Tensor):
        return
    where = f"calibration batch {index}, input {name}"
    if not isinstance(value, torch.Tensor):
        raise CalibrationError(f"{where} is a {type(value).__name__}, the example input is a tensor")
    if value.dtype != example.dtype:
        raise CalibrationError(f"{where} has dtype {value.dtype}, the example input has {example.dtype}")
    if value.dim() != example.dim() or value.shape[1:] != example.shape[1:]:
        raise CalibrationError(
            f"{where} has shape {tuple(value.shape)}, which does not match the example input's "
            f"{tuple(example.shape)} beyond the batch dimension"
        )
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise CalibrationError(f"{where} contains NaN or Inf")


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1
