"""``compile(..., dynamic_shapes=...)`` on the x86 target: one compiled module for every shape in range.

A BERT encoder (int8 weights and activations) with a symbolic batch and sequence, a CNN and an MLP with a symbolic
batch equal the torch target at sizes across the range, its ends included; a size outside it is refused by name
before anything runs, and the ranges survive export and load.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from tvm.target import Target

import lowbit
from lowbit.backends.tvm.target import has_features, x86_host_target
from lowbit.errors import BackendError, InputShapeError, LowbitError, TraceError

from helpers import TINY_VOCAB, tiny_bert

BATCH = torch.export.Dim("batch", min=1, max=8)
LENGTH = torch.export.Dim("length", min=2, max=32)
BERT_SHAPES = {"input_ids": {0: BATCH, 1: LENGTH}, "attention_mask": {0: BATCH, 1: LENGTH}}
#: (batch, length) pairs within the range, its ends included; row counts (batch × length) that are not whole blocks of
#: 16 rows among them (15, 17, 33, 51).
SIZES = [(1, 2), (2, 8), (1, 15), (1, 17), (3, 11), (3, 17), (8, 32)]
#: The int8 GEMM of 8-bit linears on symbolic rows on this host: the AMX tiles where the CPU has them, else VNNI.
HOST_GEMM = "a8_amx_x86" if has_features(Target(x86_host_target()), "amx-int8", "amx-tile") else "a8_gemm_x86"


def bert_inputs(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY_VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, length // 2 + 1 :] = 0  # a padded row, as a tokenizer pads to the longest
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def bert() -> tuple[lowbit.CompiledModel, lowbit.CompiledModel]:
    """The tiny BERT compiled with symbolic batch and sequence for the torch and x86 targets (recipe w8a8-x86)."""
    model = tiny_bert()
    example = bert_inputs(2, 8)
    compiled = [
        lowbit.compile(model, (), example_kwargs=example, recipe="w8a8-x86", target=target, dynamic_shapes=BERT_SHAPES)
        for target in ("torch", "x86")
    ]
    return compiled[0], compiled[1]


@pytest.mark.parametrize(("batch", "length"), SIZES)
def test_bert_equals_the_torch_target_at_every_size(bert, batch: int, length: int) -> None:
    reference, compiled = bert
    inputs = bert_inputs(batch, length, seed=batch * 100 + length)
    got, expected = compiled(**inputs), reference(**inputs)
    assert got.last_hidden_state.shape == (batch, length, 64)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_bert_linears_run_the_int8_kernels_on_symbolic_rows(bert) -> None:
    _, compiled = bert
    assert compiled.report.fallbacks == []
    assert {linear.kernel for linear in compiled.runner.linears} == {HOST_GEMM}
    assert all(linear.spec.row_blocks for linear in compiled.runner.linears)
    # The AMX GEMM takes the rows as they are: no layer copies its input into whole blocks or its output back.
    functions = set(re.findall(r"lowbit_\w+", compiled.runner.executable.as_text()))
    row_copies = {"lowbit_pad_rows", "lowbit_first_rows"}
    assert functions & row_copies == (set() if HOST_GEMM == "a8_amx_x86" else row_copies)


@pytest.mark.parametrize("target", ["torch", "x86"])
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((9, 4), "size 9, outside the compiled range 1..8 of dimension 'batch'"),
        ((2, 33), "range 2..32"),
        ((2, 1), "size 1"),
    ],
)
def test_sizes_outside_the_range_are_refused_before_running(bert, target, shape, message) -> None:
    compiled = bert[0] if target == "torch" else bert[1]
    inputs = {"input_ids": torch.zeros(shape, dtype=torch.long), "attention_mask": torch.ones(shape, dtype=torch.long)}
    with pytest.raises(InputShapeError, match=message):
        compiled(**inputs)


def test_one_symbol_at_two_sizes_is_refused(bert) -> None:
    inputs = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with pytest.raises(InputShapeError, match="dimension 'length'"):
        bert[1](**inputs)
    with pytest.raises(InputShapeError, match="dimension 'length'"):
        bert[1].runner(**inputs)  # the runner checks on its own


def test_the_ranges_survive_export_and_load(bert, tmp_path) -> None:
    _, compiled = bert
    loaded = lowbit.load(compiled.export(tmp_path / "bert"))
    inputs = bert_inputs(5, 11)
    assert torch.equal(loaded(**inputs).last_hidden_state, compiled(**inputs).last_hidden_state)
    with pytest.raises(InputShapeError, match="range 1..8"):
        loaded(input_ids=torch.zeros(9, 4, dtype=torch.long), attention_mask=torch.ones(9, 4, dtype=torch.long))


def test_mlp_with_a_batch_range_in_the_simple_form_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    shapes = {"input": {0: (1, 64)}}
    reference = lowbit.compile(model, (torch.randn(4, 64),), recipe="w8a8-x86", target="torch", dynamic_shapes=shapes)
    compiled = lowbit.compile(model, (torch.randn(4, 64),), recipe="w8a8-x86", target="x86", dynamic_shapes=shapes)
    assert {linear.kernel for linear in compiled.runner.linears} == {HOST_GEMM}
    for batch in (1, 15, 16, 17, 33, 64):
        x = torch.randn(batch, 64)
        assert torch.equal(compiled(x), reference(x)), batch
    with pytest.raises(InputShapeError, match="outside the compiled range 1..64"):
        compiled(torch.randn(65, 64))


@pytest.mark.parametrize("recipe", [None, "w8a8-x86"])
def test_cnn_with_a_batch_range_equals_the_torch_target(recipe) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 16),
    ).eval()  # fmt: skip
    shapes = {"input": {0: (1, 16)}}
    calibration = [torch.randn(4, 3, 12, 12) for _ in range(2)] if recipe else None
    compiled = [
        lowbit.compile(
            model, (torch.randn(2, 3, 12, 12),), recipe=recipe, target=target, dynamic_shapes=shapes,
            calibration=calibration,
        )
        for target in ("torch", "x86")
    ]  # fmt: skip
    for batch in (1, 5, 16):
        x = torch.randn(batch, 3, 12, 12)
        torch.testing.assert_close(compiled[1](x), compiled[0](x), rtol=1e-5, atol=1e-5)
    if recipe:  # the int8 convolution kernels take a static batch: the convolutions are listed as fallbacks
        assert any("static batch" in item for item in compiled[1].report.fallbacks)


def test_targets_without_symbolic_shapes_are_refused_by_name() -> None:
    model = nn.Linear(8, 8)
    with pytest.raises(BackendError, match="torch and x86 targets"):
        lowbit.compile(model, (torch.randn(2, 8),), target="arm", dynamic_shapes={"input": {0: (1, 4)}})


def test_bad_specs_and_dimensions_the_model_fixes_are_refused() -> None:
    model = nn.Linear(8, 8)
    with pytest.raises(LowbitError, match="names \\['x'\\]"):
        lowbit.compile(model, (torch.randn(2, 8),), dynamic_shapes={"x": {0: (1, 4)}})
    with pytest.raises(LowbitError, match="outside the compiled range"):
        lowbit.compile(model, (torch.randn(8, 8),), dynamic_shapes={"input": {0: (1, 4)}})
    with pytest.raises(LowbitError, match="\\(min, max\\)"):
        lowbit.compile(model, (torch.randn(2, 8),), dynamic_shapes={"input": {0: 4}})

    class FixedRows(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(2, -1)

    with pytest.raises(TraceError, match="ties to a size or to other dimensions"):
        lowbit.compile(FixedRows(), (torch.randn(2, 8),), dynamic_shapes={"x": {0: (1, 4)}})


def test_attention_over_a_symbolic_number_of_keys_equals_eager() -> None:
    """Keys and values padded to whole vectors at run time, the padded keys masked out (no mask given)."""

    class Attention(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(q, k, v)

    batch, length = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("length", min=2, max=128)
    shapes = {name: {0: batch, 2: length} for name in ("q", "k", "v")}
    example = tuple(torch.randn(2, 4, 16, 32) for _ in range(3))  # distinct tensors: export aliases equal ones
    compiled = lowbit.compile(Attention(), example, target="x86", dynamic_shapes=shapes)
    for size, keys in ((1, 2), (3, 17), (8, 128)):
        q, k, v = (torch.randn(size, 4, keys, 32) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), Attention()(q, k, v), rtol=1e-5, atol=1e-5)
