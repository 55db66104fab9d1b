"""Every target answers what eager answers or raises a named error: index ranges, non-finite inputs, eager's
output structure, and artifacts that keep all of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

import lowbit
from lowbit.backends.tvm.rpc import bind_inputs
from lowbit.errors import InputError, InputShapeError, NonFiniteInputError
from lowbit.interface import Interface, index_ranges, non_finite_count
from lowbit.ir.trace import trace

from helpers import TINY_VOCAB, tiny_bert, tiny_llama

VOCAB = 50


class Embedder(torch.nn.Module):
    """Token ids and a float scale; returns a transformers output, as a Hugging Face model does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor, scale: torch.Tensor) -> BaseModelOutput:
        hidden = self.fc(self.emb(ids)) * scale
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=(hidden, hidden.relu()))


class Functional(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(30, 4))
        self.rows = torch.nn.Parameter(torch.randn(20, 4))

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        first = torch.nn.functional.embedding(a.long(), self.table)
        return first.sum() + torch.index_select(self.rows, 0, b.view(-1)).sum() + c.sum()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randint(0, VOCAB, (2, 5)), torch.full((2, 5, 1), 0.5)


@pytest.fixture(scope="module", params=["torch", "x86"])
def compiled(request) -> lowbit.CompiledModel:
    torch.manual_seed(0)
    return lowbit.compile(Embedder().eval(), _inputs(), target=request.param)


def test_index_ranges_follow_views_and_casts() -> None:
    torch.manual_seed(0)
    args = (torch.zeros(3, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2))
    assert index_ranges(trace(Functional(), args)) == {"a": (0, 30), "b": (0, 20)}
    assert index_ranges(trace(Embedder(), _inputs())) == {"ids": (0, VOCAB)}


@pytest.mark.parametrize("bad", [VOCAB, 5000, -1])
def test_token_ids_outside_the_table_are_refused_on_every_target(compiled, bad) -> None:
    ids, scale = _inputs()
    ids[1, 3] = bad
    with pytest.raises(InputError, match=rf"input 'ids' holds {bad}, outside \[0, {VOCAB}\)"):
        compiled(ids, scale)
    if compiled.graph is not None and compiled.report.target != "torch":  # a TVM runner checks on its own too
        with pytest.raises(InputError, match=f"input 'ids' holds {bad}"):
            compiled.runner(ids, scale)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused_on_every_target(compiled, bad) -> None:
    ids, scale = _inputs()
    scale[0, 2, 0] = bad
    with pytest.raises(NonFiniteInputError, match="input 'scale' holds 1 NaN or Inf"):
        compiled(ids, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_values_are_counted_in_every_float_dtype(dtype) -> None:
    values = torch.randn(4, 300).to(dtype)
    assert non_finite_count(values) == 0
    assert non_finite_count(values.t()) == 0  # a strided view
    values[1, 7], values[2, 9], values[3, 11] = float("nan"), float("inf"), float("-inf")
    assert non_finite_count(values) == 3
    assert non_finite_count(values.t()) == 3


def test_outputs_have_eager_structure_on_every_target(compiled, tmp_path) -> None:
    out = compiled(*_inputs())
    assert isinstance(out, BaseModelOutput) and list(out.keys()) == ["last_hidden_state", "hidden_states"]
    assert isinstance(out.hidden_states, tuple) and len(out.hidden_states) == 2
    loaded = lowbit.load(compiled.export(tmp_path / "model"))
    assert isinstance(loaded, lowbit.CompiledModel) and loaded.report.rel_error == compiled.report.rel_error
    assert (loaded.graph is None) == (compiled.report.target != "torch")
    again = loaded(*_inputs())
    assert isinstance(again, BaseModelOutput)
    torch.testing.assert_close(again.last_hidden_state, out.last_hidden_state)
    copied = lowbit.load(loaded.export(tmp_path / "copy"))  # a loaded artifact is exported as a copy
    torch.testing.assert_close(copied(*_inputs()).last_hidden_state, out.last_hidden_state)
    ids, scale = _inputs()
    ids[0, 0] = -1
    with pytest.raises(InputError, match="input 'ids' holds -1"):
        loaded(ids, scale)
    with pytest.raises(NonFiniteInputError):
        loaded(_inputs()[0], torch.full((2, 5, 1), float("nan")))


class MaskedAttention(torch.nn.Module):
    """Scores plus an additive mask (``-inf``: not attended), and a key padding mask through MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4.0 + mask, dim=-1)
        return self.attn(weights @ x, x, x, key_padding_mask=padding, need_weights=False)[0]


@pytest.fixture(scope="module", params=["torch", "x86"])
def masked(request) -> tuple[torch.nn.Module, lowbit.CompiledModel]:
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    example = (torch.randn(2, 6, 16), torch.zeros(2, 6, 6), torch.zeros(2, 6))
    return model, lowbit.compile(model, example, target=request.param)


def _masks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.zeros(2, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))  # causal
    padding = torch.zeros(2, 6)
    padding[1, 4:] = float("-inf")
    return torch.randn(2, 6, 16), mask, padding


def test_minus_inf_in_an_additive_mask_answers_as_eager_on_every_target(masked, tmp_path) -> None:
    model, compiled = masked
    assert compiled.interface.masks == ("mask", "padding")
    x, mask, padding = _masks()
    with torch.no_grad():
        expected = model(x, mask, padding)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(compiled(x, mask, padding), expected, rtol=1e-5, atol=1e-5)
    if compiled.report.target != "torch":  # a TVM runner checks on its own too
        out = compiled.runner(x, mask, padding)
        torch.testing.assert_close(compiled.interface.rebuild(out), expected, rtol=1e-5, atol=1e-5)
    loaded = lowbit.load(compiled.export(tmp_path / "masked"))
    torch.testing.assert_close(loaded(x, mask, padding), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "where,value,message",
    [
        ("x", float("-inf"), "input 'x' holds 1 NaN or Inf .* only in an additive mask"),
        ("mask", float("inf"), "input 'mask' holds 1 NaN or \\+Inf .* additive softmax mask"),
        ("mask", float("nan"), "input 'mask' holds 1 NaN or \\+Inf"),
        ("padding", float("-inf"), "input 'padding' masks every position of a row with -inf: .* NaN"),
    ],
)
def test_what_eager_answers_nan_for_is_refused_in_a_mask(masked, where, value, message) -> None:
    model, compiled = masked
    inputs = dict(zip(("x", "mask", "padding"), _masks()))
    if where == "padding":
        inputs[where][0] = value  # every key of the first sequence
    else:
        inputs[where][0, 0, 0] = value
    with pytest.raises(NonFiniteInputError, match=message):
        compiled(*inputs.values())


def test_the_torch_target_takes_any_batch_size_of_an_exported_graph(tmp_path) -> None:
    """Compiled at batch 1 (the size torch.export specializes unless told otherwise), called at 3 and 5."""
    model = tiny_bert()
    ids = torch.randint(0, TINY_VOCAB, (5, 16), generator=torch.Generator().manual_seed(0))
    compiled = lowbit.compile(model, (ids[:1],), passes=["rtn"], target="torch")
    assert compiled.report.tracer == "export" and not compiled.interface.batch
    assert compiled.report.bytes_after < compiled.report.bytes_before / 2  # the linears are packed
    got = compiled(ids[:3]).last_hidden_state
    rows = torch.cat([compiled(ids[i : i + 1]).last_hidden_state for i in range(3)])
    torch.testing.assert_close(got, rows, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids[:3]).last_hidden_state, rtol=0, atol=0.1)  # 4-bit weights
    loaded = lowbit.load(compiled.export(tmp_path / "bert"))
    torch.testing.assert_close(loaded(ids).last_hidden_state, compiled(ids).last_hidden_state)


def test_a_causal_lm_on_the_torch_target_answers_as_eager_at_other_batches_or_refuses_them() -> None:
    """transformers' Llama exported at batch 1 with a free batch keeps a batch-1 constant in its mask: the export
    is checked at twice the batch, falls back to the example's batch, and other batches are refused by name."""
    model = tiny_llama()
    ids = torch.randint(0, TINY_VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    compiled = lowbit.compile(model, (ids[:1],), passes=[], target="torch")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids[:1]).logits, model(ids[:1]).logits)
        for batch in (2, 3):
            try:
                got = compiled(ids[:batch]).logits
            except InputShapeError as error:
                assert "fixes its batch dimension (dim 0) at 1" in str(error)
            else:
                torch.testing.assert_close(got, model(ids[:batch]).logits)
        with pytest.raises(InputShapeError, match=r"input 'input_ids' of shape \(1, 5\): .* takes shape \(\*?1?, 8\)"):
            compiled(ids[:1, :5])


class FixesItsBatch(torch.nn.Module):
    """fx cannot trace the item assignment (torch.export does); the sum with ``base`` ties the batch to 2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.register_buffer("base", torch.zeros(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        y[:, 0] = 0.0
        return y + self.base


def test_a_batch_size_the_graph_cannot_take_is_refused_before_running(tmp_path) -> None:
    compiled = lowbit.compile(FixesItsBatch().eval(), (torch.randn(2, 8),), passes=["rtn"], target="torch")
    assert compiled.report.tracer == "export" and compiled.interface.batch == {"x": 2}
    assert compiled(torch.randn(2, 8)).shape == (2, 4)
    loaded = lowbit.load(compiled.export(tmp_path / "fixed"))
    for model in (compiled, loaded):
        with pytest.raises(InputShapeError, match=r"input 'x' of shape \(3, 8\): .* fixes its batch .* at 2"):
            model(torch.randn(3, 8))


def test_an_output_class_that_cannot_be_imported_leaves_outputs_flat(caplog) -> None:
    spec = Interface.of(trace(Embedder(), _inputs()), (torch.ones(1), torch.ones(2))).output
    broken = Interface(output=spec.replace("builtins.tuple", "no_such_module.Output"))
    with caplog.at_level("WARNING"):
        assert broken.rebuild([torch.ones(1)]) == [torch.ones(1)]
    assert "outputs are returned flat" in caplog.text


def test_random_inputs_are_valid_and_checked() -> None:
    specs = [
        {"name": "ids", "shape": [64], "dtype": "int64"},
        {"name": "mask", "shape": [64], "dtype": "bool"},
        {"name": "x", "shape": [4], "dtype": "float32"},
    ]
    interface = Interface(("ids", "mask", "x"), {"ids": (0, 7)}).as_dict()
    ids, mask, x = bind_inputs(specs, None, 0, interface)
    assert ids.min() >= 0 and ids.max() < 7 and len(np.unique(ids)) > 1 and mask.all() and x.dtype == np.float32
    with pytest.raises(InputError, match="input 'ids' holds 9"):
        bind_inputs(specs, [np.full(64, 9), mask, x], 0, interface)
    with pytest.raises(NonFiniteInputError, match="input 'x'"):
        bind_inputs(specs, [ids, mask, np.full(4, np.nan, dtype=np.float32)], 0, interface)


def test_a_causal_lm_on_x86_returns_its_output_class_and_refuses_bad_token_ids() -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        use_cache=False,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (1, 8))
    compiled = lowbit.compile(model, (ids,), target="x86")
    out = compiled(ids)
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    for bad in (5000, -1):
        with pytest.raises(InputError, match=f"input 'input_ids' holds {bad}, outside \\[0, 100\\)"):
            compiled(torch.full_like(ids, bad))
