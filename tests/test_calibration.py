"""Calibration data validation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lowbit.calibration import calibration_set
from lowbit.errors import CalibrationError

EXAMPLE = (torch.randn(1, 3, 8, 8),)


def test_tuples_tensors_and_dataloaders_are_accepted():
    assert len(calibration_set([(torch.randn(2, 3, 8, 8),)] * 3, EXAMPLE)) == 3
    assert calibration_set([torch.randn(4, 3, 8, 8)], EXAMPLE).num_samples == 4
    loader = DataLoader(TensorDataset(torch.randn(10, 3, 8, 8)), batch_size=4)
    calib = calibration_set(loader, EXAMPLE)
    assert len(calib) == 3 and calib.num_samples == 10
    kwargs = {"input_ids": torch.ones(1, 5, dtype=torch.long)}
    assert len(calibration_set([{"input_ids": torch.ones(3, 5, dtype=torch.long)}], (), kwargs)) == 1


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "empty"),
        (iter(()), "empty"),
        (torch.randn(2, 3, 8, 8), "iterable of input batches"),
        (42, "iterable"),
        ([(torch.randn(3, 8, 8),)], r"shape \(3, 8, 8\), of another rank than the example input's \(1, 3, 8, 8\)"),
        ([(torch.randn(2, 3, 8, 8).double(),)], "dtype torch.float64"),
        ([(torch.randn(2, 3, 8, 8), torch.zeros(2))], "drop labels"),
        ([("text",)], "is a str"),
        ([(torch.full((1, 3, 8, 8), float("nan")),)], "NaN"),
        ([{"x": torch.randn(1, 3, 8, 8)}], "0 positional inputs"),
        ([None], "NoneType"),
    ],
)
def test_bad_calibration_is_a_named_error(data, message):
    with pytest.raises(CalibrationError, match=message):
        calibration_set(data, EXAMPLE)


def test_sizes_beyond_the_batch_dimension_are_left_to_the_model():
    """Whether a size runs is the model's to say: `lowbit.ir.variants.add_calibration_variants` names the ones it
    rejects."""
    assert calibration_set([(torch.randn(2, 3, 4, 4),), (torch.randn(3, 3, 12, 9),)], EXAMPLE).num_samples == 5


def test_batches_without_example_inputs_are_a_named_error():
    with pytest.raises(CalibrationError, match="without example inputs"):
        calibration_set([(torch.randn(2, 3, 8, 8),)], ())


def test_error_names_the_batch():
    data = [(torch.randn(1, 3, 8, 8),), (torch.randn(1, 3, 8, 8),), (torch.randn(1, 3, 9),)]
    with pytest.raises(CalibrationError, match="batch 2"):
        calibration_set(data, EXAMPLE)


def test_keyword_inputs_must_match_by_name():
    kwargs = {"input_ids": torch.ones(1, 5, dtype=torch.long)}
    with pytest.raises(CalibrationError, match="keyword inputs"):
        calibration_set([{"ids": torch.ones(1, 5, dtype=torch.long)}], (), kwargs)
