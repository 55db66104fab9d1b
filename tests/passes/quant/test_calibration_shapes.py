"""Calibration batches of another batch size or length than the example's: graphs specialized by torch.export take
them cut to the traced batch size (rows are tokens, so the statistics are unchanged), shorter sequences with an
attention mask padded to the traced length (padded tokens left out); shapes the model rejects are refused up front,
named (other shapes: tests/passes/quant/test_calibration_variants.py)."""

from __future__ import annotations

import pytest
import torch
import transformers

import lowbit
from lowbit.calibration import calibration_set
from lowbit.errors import CalibrationError
from lowbit.ir.trace import trace
from lowbit.ir.variants import fit_batches
from lowbit.passes.quant.hessian import capture_hessian

from helpers import tiny_bert

VOCAB, LENGTH = 100, 16


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return tiny_bert(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=32)


def _ids(batch: int, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))


@pytest.mark.parametrize("name", ["gptq", "awq"])
def test_calibration_batches_larger_than_the_example_are_accepted(bert, name) -> None:
    calibration = [(_ids(4),), (_ids(2),), (_ids(1),)]
    compiled = lowbit.compile(
        bert, (_ids(1),), passes=[f"{name}:bits=4,group_size=32"], calibration=calibration, target="torch"
    )
    assert compiled.report.pipeline.passes[0].name == name
    assert 0 < compiled.report.rel_error < 0.1
    out = compiled(_ids(1))
    assert isinstance(out, transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions)


def _masked(batch: int, length: int = LENGTH) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(batch, length), "attention_mask": torch.ones(batch, length, dtype=torch.long)}


@pytest.mark.parametrize("name", ["gptq", "awq"])
def test_shorter_masked_sequences_and_larger_batches_are_accepted(bert, name) -> None:
    compiled = lowbit.compile(
        bert,
        (),
        example_kwargs=_masked(1),
        passes=[f"{name}:bits=4,group_size=32"],
        calibration=[_masked(4), _masked(2, 9)],
        target="torch",
    )
    assert 0 < compiled.report.rel_error < 0.1


def test_padded_tokens_are_left_out_of_the_hessian(bert) -> None:
    path = "encoder.layer.0.attention.self.query"
    rows = []
    handle = bert.get_submodule(path).register_forward_pre_hook(lambda _, args: rows.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        bert(**_masked(2, 9))
    handle.remove()
    x = torch.cat(rows)
    gm = trace(bert, (), example_kwargs=_masked(1))
    padded = calibration_set([_masked(2, 9)], (), _masked(1))
    assert padded.batches[0][1]["input_ids"].shape == (2, LENGTH)
    hessian = capture_hessian(gm, path, 1, padded).hessian
    torch.testing.assert_close(hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_a_cut_batch_gives_the_hessian_of_its_rows(bert) -> None:
    gm = trace(bert, (_ids(1),))
    assert gm.meta["lowbit_tracer"] == "export"
    whole = [((_ids(4),), {})]
    parts = [((row[None],), {}) for row in _ids(4)]
    assert [args[0].shape for args, _ in fit_batches(gm, whole)] == [(1, LENGTH)] * 4
    path = "encoder.layer.0.attention.self.query"
    torch.testing.assert_close(capture_hessian(gm, path, 1, whole).hessian, capture_hessian(gm, path, 1, parts).hessian)


def test_shapes_the_model_cannot_run_are_named(bert) -> None:
    with pytest.raises(CalibrationError, match=r"input_ids \(2, 40\)\): the model does not run at this shape"):
        lowbit.compile(bert, (_ids(1),), passes=["gptq:bits=4"], calibration=[(_ids(2, 40),)], target="torch")
    gm = trace(bert, (_ids(2),))
    with pytest.raises(CalibrationError, match=r"input_ids \(3, 16\) does not fit the graph traced by torch.export"):
        fit_batches(gm, [((_ids(3),), {})])
