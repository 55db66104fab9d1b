"""Calibration data: validated once against the example inputs, then iterated by passes.

Accepted forms: an iterable (list, generator, DataLoader) whose items are a tensor, a
tuple/list of tensors (positional inputs), or a dict (keyword inputs). Each batch must
match the example inputs in count, names, dtype and rank; its sizes are any the model takes
(a batch of another batch size or sequence length runs through the traced graph as
`lowbit.ir.variants` describes, and a size the model rejects is named when the model is traced).

`load_calibration` reads batches from a file (the ``lowbit compile --calibration`` option):
a text file tokenized into windows shaped like the example's ``input_ids``, or arrays
(``.npz``, ``.pt``) of samples cut into batches of the example's batch size.

A batch with a 2-D ``attention_mask`` keyword input marks padding tokens (0):
`padding_mask` returns it, and calibrating passes leave the padded positions out of
their activation statistics, since the model's outputs never read those positions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import CalibrationError

log = logging.getLogger(__name__)

Batch = tuple[tuple[Any, ...], dict[str, Any]]
#: File suffixes `load_calibration` reads as arrays; anything else is read as text.
ARRAY_SUFFIXES = (".npz", ".pt", ".pth")


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


def calibration_set(
    data: Any, example_inputs: tuple, example_kwargs: Mapping[str, Any] | None = None
) -> CalibrationSet:
    """Validate ``data`` against the example inputs and materialize it as a `CalibrationSet`."""
    if isinstance(data, CalibrationSet):
        return data
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise CalibrationError(
            "calibration must be an iterable of input batches (a list of tuples or a DataLoader), "
            f"not {type(data).__name__}"
        )
    example_kwargs = dict(example_kwargs or {})
    if not example_inputs and not example_kwargs:
        raise CalibrationError(
            "calibration batches cannot be checked without example inputs: pass example_inputs= "
            "(or a set built by lowbit.calibration.calibration_set(batches, example_inputs))"
        )
    batches = tuple(_check_batch(i, item, example_inputs, example_kwargs) for i, item in enumerate(data))
    if not batches:
        raise CalibrationError("calibration data is empty: give at least one batch of example-shaped inputs")
    return CalibrationSet(batches)


def load_calibration(
    path: str | Path,
    example_inputs: tuple,
    example_kwargs: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
) -> CalibrationSet:
    """Calibration batches from ``path``, validated against the example inputs.

    - ``.npz``: one array per input, by keyword name (or ``arr_0``, ``arr_1``, … for
      positional inputs, as ``numpy.savez`` names them), every array holding the same
      number of samples along dim 0; cut into batches of the example's batch size.
    - ``.pt`` / ``.pth``: a ``torch.save``'d list of batches (anything `calibration_set`
      accepts), or a dict or tuple of sample tensors read like an ``.npz``.
    - any other file: UTF-8 text for a model whose example has ``input_ids`` of shape
      ``(batch, length)``; ``tokenizer`` (a transformers tokenizer) turns it into
      consecutive ``length``-token windows (its special tokens, such as ``[CLS]`` and
      ``[SEP]``, included), with an all-ones ``attention_mask`` and
      ``token_type_ids`` of zeros when the example has them.
    """
    path = Path(path)
    example_kwargs = dict(example_kwargs or {})
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    if path.suffix in ARRAY_SUFFIXES:
        data = _read_arrays(path)
        if isinstance(data, (list, CalibrationSet)):
            return calibration_set(data, example_inputs, example_kwargs)
        batches = _split_samples(path, data, example_inputs, example_kwargs)
    else:
        batches = _text_batches(path, tokenizer, example_inputs, example_kwargs)
    calibration = calibration_set(batches, example_inputs, example_kwargs)
    log.info("calibration: %d batches, %d samples from %s", len(calibration), calibration.num_samples, path)
    return calibration


def _read_arrays(path: Path) -> Any:
    """The arrays (or batches) stored in an ``.npz`` or ``.pt`` file, as torch tensors."""
    try:
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path) as data:
                return {name: torch.from_numpy(data[name]) for name in data.files}
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad calibration file
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc


def _split_samples(path: Path, data: Any, example_inputs: tuple, example_kwargs: dict[str, Any]) -> list[Any]:
    """Cut per-input sample tensors into batches of the example's batch size."""
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, tuple):
        data = {f"arr_{i}": value for i, value in enumerate(data)}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CalibrationError(
            f"calibration file {path} must hold a list of batches or sample tensors by input name, "
            f"not {type(data).__name__}"
        )
    positional = [f"arr_{i}" for i in range(len(example_inputs))]
    expected = positional + list(example_kwargs)
    if sorted(data) != sorted(expected):
        raise CalibrationError(
            f"calibration file {path} has arrays {sorted(data)}; the model's inputs are {sorted(expected)} "
            "(positional inputs are arr_0, arr_1, ...)"
        )
    counts = {name: value.shape[0] if value.dim() else 0 for name, value in data.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise CalibrationError(f"calibration file {path}: every array needs the same number of samples, got {counts}")
    if positional and example_kwargs:
        raise CalibrationError(
            f"calibration file {path}: models with both positional and keyword inputs need a "
            ".pt file holding a list of batches"
        )
    size = _batch_size(tuple(example_inputs), example_kwargs)
    chunks = {name: value.split(size) for name, value in data.items()}
    return [
        tuple(chunks[n][i] for n in positional) if positional else {n: chunks[n][i] for n in example_kwargs}
        for i in range(len(chunks[expected[0]]))
    ]


def _text_batches(path: Path, tokenizer: Any, example_inputs: tuple, example_kwargs: dict[str, Any]) -> list[Any]:
    """Consecutive token windows of a text file, shaped like the example's ``input_ids``."""
    example = example_kwargs.get("input_ids")
    if tokenizer is None or example_inputs or not isinstance(example, torch.Tensor) or example.dim() != 2:
        raise CalibrationError(
            f"calibration file {path} is read as text, which needs a model with a tokenizer and an "
            "input_ids keyword input of shape (batch, length); give an .npz or .pt file of input batches instead"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration text {path}: {exc}") from exc
    length = example.shape[1]
    ids = tokenizer(" ".join(text.split()), add_special_tokens=False, verbose=False)["input_ids"]
    body = length - len(tokenizer.build_inputs_with_special_tokens([]))  # room left by [CLS]/[SEP] and the like
    windows = len(ids) // body if body > 0 else 0
    if windows == 0:
        raise CalibrationError(f"calibration text {path} has {len(ids)} tokens, fewer than one window of {length}")
    rows = [tokenizer.build_inputs_with_special_tokens(ids[i * body : (i + 1) * body]) for i in range(windows)]
    samples = {"input_ids": torch.tensor(rows, dtype=example.dtype)}
    for name, fill in (("attention_mask", 1), ("token_type_ids", 0)):
        if isinstance(example_kwargs.get(name), torch.Tensor):
            samples[name] = torch.full((windows, length), fill, dtype=example_kwargs[name].dtype)
    return _split_samples(path, samples, (), example_kwargs)


def padding_mask(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The batch's ``(batch, tokens)`` bool mask of real (not padding) tokens, from its
    ``attention_mask`` keyword input; None when the batch has no 2-D attention mask."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask != 0
    return None


def _check_batch(index: int, item: Any, example_inputs: tuple, example_kwargs: dict[str, Any]) -> Batch:
    if isinstance(item, torch.Tensor):
        args, kwargs = (item,), {}
    elif isinstance(item, (tuple, list)):
        args, kwargs = tuple(item), {}
    elif isinstance(item, Mapping):
        args, kwargs = (), dict(item)
    else:
        raise CalibrationError(
            f"calibration batch {index} is a {type(item).__name__}; expected a tensor, tuple or dict"
        )
    if len(args) != len(example_inputs):
        raise CalibrationError(
            f"calibration batch {index} has {len(args)} positional inputs, "
            f"the example inputs have {len(example_inputs)}"
            + (" (drop labels from the batches)" if len(args) > len(example_inputs) else "")
        )
    if set(kwargs) != set(example_kwargs):
        raise CalibrationError(
            f"calibration batch {index} has keyword inputs {sorted(kwargs)}, "
            f"the example inputs have {sorted(example_kwargs)}"
        )
    args, kwargs = _pad_tokens(args, kwargs, example_kwargs.get("attention_mask"))
    for name, value, example in [(str(i), a, e) for i, (a, e) in enumerate(zip(args, example_inputs))] + [
        (k, kwargs[k], v) for k, v in example_kwargs.items()
    ]:
        _check_tensor(index, name, value, example)
    return args, kwargs


def _pad_tokens(args: tuple, kwargs: dict[str, Any], example_mask: Any) -> tuple[tuple, dict[str, Any]]:
    """A batch of sequences shorter than the example's, with an ``attention_mask``, padded at the end to the
    example's length with zeros (mask 0): the model never reads the padded tokens (`padding_mask`), and a graph
    traced by torch.export then runs them at the shape it was traced at."""
    mask = kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and isinstance(example_mask, torch.Tensor)):
        return args, kwargs
    if mask.dim() != 2 or example_mask.dim() != 2 or mask.shape[1] >= example_mask.shape[1]:
        return args, kwargs
    short, long = mask.shape[1], example_mask.shape[1]

    def pad(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == short:
            return torch.cat([value, value.new_zeros(value.shape[0], long - short, *value.shape[2:])], dim=1)
        return value

    return tuple(pad(a) for a in args), {k: pad(v) for k, v in kwargs.items()}


def _check_tensor(index: int, name: str, value: Any, example: Any) -> None:
    if not isinstance(example, torch.Tensor):
        return
    where = f"calibration batch {index}, input {name}"
    if not isinstance(value, torch.Tensor):
        raise CalibrationError(f"{where} is a {type(value).__name__}, the example input is a tensor")
    if value.dtype != example.dtype:
        raise CalibrationError(f"{where} has dtype {value.dtype}, the example input has {example.dtype}")
    if value.dim() != example.dim():
        raise CalibrationError(
            f"{where} has shape {tuple(value.shape)}, of another rank than the example input's {tuple(example.shape)}"
        )
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise CalibrationError(f"{where} contains NaN or Inf")


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1
