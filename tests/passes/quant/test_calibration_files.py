"""Calibration batches read from files (`lowbit.calibration.load_calibration`) and the
``lowbit compile --calibration`` option; padding masks left out of activation statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from lowbit.calibration import load_calibration, padding_mask
from lowbit.cli import main
from lowbit.errors import CalibrationError
from lowbit.passes.quant.hessian import HessianAccumulator

IDS = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.ones(2, 6, dtype=torch.long)}


class WordTokenizer:
    """A stand-in for a transformers tokenizer: one id per word, [CLS]=1 ... [SEP]=2 around a window."""

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [10 + len(word) for word in text.split()]}

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        return [1, *ids, 2]


def factory():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), (torch.randn(2, 8),)


def test_npz_samples_are_cut_into_batches_of_the_example_size(tmp_path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, input_ids=np.ones((5, 6), dtype=np.int64), attention_mask=np.ones((5, 6), dtype=np.int64))
    calibration = load_calibration(path, (), IDS)
    assert [kwargs["input_ids"].shape[0] for _, kwargs in calibration] == [2, 2, 1]
    assert calibration.num_samples == 5


def test_pt_files_hold_batches_or_positional_samples(tmp_path) -> None:
    batches = tmp_path / "batches.pt"
    torch.save([(torch.randn(3, 8),), (torch.randn(1, 8),)], batches)
    assert load_calibration(batches, (torch.randn(2, 8),)).num_samples == 4
    samples = tmp_path / "samples.pt"
    torch.save(torch.randn(7, 8), samples)
    assert len(load_calibration(samples, (torch.randn(2, 8),))) == 4


def test_text_is_tokenized_into_windows_with_special_tokens(tmp_path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("a bb ccc dddd\n eeeee f gg hhh iiii jjjjj k")  # 11 words: two windows of 4 + [CLS]/[SEP]
    calibration = load_calibration(path, (), IDS, WordTokenizer())
    ((args, kwargs),) = calibration
    assert args == () and kwargs["input_ids"].tolist() == [[1, 11, 12, 13, 14, 2], [1, 15, 11, 12, 13, 2]]
    assert kwargs["attention_mask"].eq(1).all()


@pytest.mark.parametrize(
    ("name", "content", "example", "message"),
    [
        ("missing.npz", None, IDS, "does not exist"),
        ("broken.npz", b"not a zip", IDS, "cannot read calibration file"),
        (
            "names.npz",
            {"input_ids": np.ones((2, 6), dtype=np.int64)},
            IDS,
            r"the model's inputs are \['attention_mask'",
        ),
        (
            "counts.npz",
            {"input_ids": np.ones((2, 6), dtype=np.int64), "attention_mask": np.ones((3, 6), dtype=np.int64)},
            IDS,
            "same number of samples",
        ),
        (
            "shape.npz",
            {"input_ids": np.ones((2, 6, 1), dtype=np.int64), "attention_mask": np.ones((2, 6), dtype=np.int64)},
            IDS,
            "of another rank than the example input",
        ),
        ("text.txt", "some words", {"x": torch.zeros(2, 3)}, "needs a model with a tokenizer"),
    ],
)
def test_bad_files_are_named_errors(tmp_path, name, content, example, message) -> None:
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(path, (), example, WordTokenizer())


def test_too_short_text_is_an_error(tmp_path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("two words")
    with pytest.raises(CalibrationError, match="fewer than one window of 6"):
        load_calibration(path, (), IDS, WordTokenizer())


def test_cli_compile_takes_a_calibration_file(tmp_path, capsys) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, arr_0=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    spec = f"{__name__}:factory"
    assert main(["-q", "compile", spec, "--pass", "gptq:bits=4,group_size=-1", "--calibration", str(path)]) == 0
    assert "gptq" in capsys.readouterr().out
    assert main(["-q", "compile", spec, "--pass", "gptq:bits=4", "--calibration", str(tmp_path / "none.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    text = tmp_path / "calib.txt"
    text.write_text("words " * 40)
    assert main(["-q", "compile", spec, "--pass", "gptq:bits=4", "--calibration", str(text)]) == 2
    assert "needs a model with a tokenizer" in capsys.readouterr().err


def test_padded_tokens_are_left_out_of_the_hessian() -> None:
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    x = torch.randn(2, 4, 3)
    x[keep == 0] = 1e3  # padding activations would dominate the statistics
    masked = HessianAccumulator.empty("layer", 3, torch.device("cpu"))
    masked.add(x, padding_mask((), {"attention_mask": keep}))
    real = HessianAccumulator.empty("layer", 3, torch.device("cpu"))
    real.add(x[keep == 1])
    assert masked.rows == 5 and torch.allclose(masked.hessian, real.hessian)
    assert padding_mask((), {"input_ids": torch.zeros(2, 4)}) is None
