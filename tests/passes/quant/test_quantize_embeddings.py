"""``quantize_embeddings``: packed tables for nn.Embedding lookups, a tied lm_head on the same tensors, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lowbit.compiler import state_bytes
from lowbit.errors import PassConfigError
from lowbit.interface import index_ranges
from lowbit.ir import ops, ops_embedding
from lowbit.ir.annotations import get_meta
from lowbit.ir.trace import trace
from lowbit.passes import Pipeline, get
from lowbit.passes.quant import PackedEmbedding, PackedLinear
from lowbit.passes.quant.embeddings import UnsupportedEmbeddingError

from helpers import TINY_DIM, TINY_VOCAB, tiny_bert, tiny_llama, token_ids

VOCAB, DIM = TINY_VOCAB, TINY_DIM
#: Relative output error of 8-bit RTN tables (groups of 32) on these random models; they measure 0.5-0.7%.
ERROR_BOUND = 0.01


def first_tensor(output: object) -> torch.Tensor:
    """The logits or last hidden state of a transformers output."""
    return output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))


def relative_error(model: nn.Module, gm: nn.Module) -> float:
    with torch.no_grad():
        expected, actual = first_tensor(model(token_ids())), first_tensor(gm(token_ids()))
    return float((actual - expected).norm() / expected.norm())


def packed_nodes(gm: torch.fx.GraphModule, target: object) -> list[torch.fx.Node]:
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is target]


def test_tied_lm_head_runs_linear_packed_on_the_tables_own_constants() -> None:
    model = tiny_llama()
    gm = trace(model, (token_ids(),))
    pipeline = Pipeline(["quantize_embeddings"])
    out = pipeline(gm)
    (lookup,) = packed_nodes(out, ops_embedding.embedding_packed)
    (head,) = packed_nodes(out, ops.linear_packed)
    assert [a.target for a in lookup.args[1:3]] == ["model.embed_tokens.qweight", "model.embed_tokens.scales"]
    assert [a.target for a in head.args[1:3]] == [a.target for a in lookup.args[1:3]]
    assert lookup.args[3] is None and head.args[3:6] == (None, None, None) and head.args[6:] == (8, 32, DIM)
    assert get_meta(head).layer == "lm_head" and get_meta(lookup).layer == "model.embed_tokens"
    table, linear = out.get_submodule("model.embed_tokens"), out.get_submodule("lm_head")
    assert isinstance(table, PackedEmbedding) and isinstance(linear, PackedLinear)
    assert linear.qweight is table.qweight and linear.scales is table.scales
    # One copy: fp32 (4 bytes per weight) -> 8-bit codes (1 byte) and one fp32 scale per 32 weights.
    assert state_bytes(gm) - state_bytes(out) == VOCAB * DIM * 4 - (VOCAB * DIM + VOCAB * DIM // 32 * 4)
    assert relative_error(model, out) < ERROR_BOUND
    assert pipeline.report.passes[0].stats == {"quantized": 1, "tied": 1, "skipped": 0}
    assert index_ranges(out) == index_ranges(gm) == {"input_ids": (0, VOCAB)}


def test_tied_output_false_leaves_lm_head_in_float() -> None:
    model = tiny_llama()
    out = Pipeline([get("quantize_embeddings", tied_output=False)])(trace(model, (token_ids(),)))
    assert isinstance(out.get_submodule("lm_head"), nn.Linear) and not packed_nodes(out, ops.linear_packed)
    assert len(packed_nodes(out, ops_embedding.embedding_packed)) == 1
    assert relative_error(model, out) < ERROR_BOUND


def test_untied_lm_head_stays_a_float_linear() -> None:
    model = tiny_llama(tie=False)
    out = Pipeline(["quantize_embeddings"])(trace(model, (token_ids(),)))
    assert isinstance(out.get_submodule("lm_head"), nn.Linear) and not packed_nodes(out, ops.linear_packed)


def test_bert_tables_are_packed_within_the_error_of_8_bit_rtn() -> None:
    model = tiny_bert()
    gm = trace(model, (token_ids(),))
    out = Pipeline(["quantize_embeddings"])(gm)
    lookups = {get_meta(n).layer for n in packed_nodes(out, ops_embedding.embedding_packed)}
    assert lookups == {f"embeddings.{name}_embeddings" for name in ("word", "position", "token_type")}
    assert relative_error(model, out) < ERROR_BOUND
    assert index_ranges(out) == index_ranges(gm)


def test_4_bit_asymmetric_tables_and_ignore() -> None:
    model = tiny_bert()
    options = {"bits": 4, "group_size": 16, "symmetric": False, "ignore": "*position*"}
    out = Pipeline([get("quantize_embeddings", **options)])(trace(model, (token_ids(),)))
    lookups = packed_nodes(out, ops_embedding.embedding_packed)
    assert {get_meta(n).layer for n in lookups} == {"embeddings.word_embeddings", "embeddings.token_type_embeddings"}
    assert all(n.args[3] is not None and n.args[4:] == (4, 16, DIM) for n in lookups)
    assert isinstance(out.get_submodule("embeddings.position_embeddings"), nn.Embedding)
    assert relative_error(model, out) < 0.1


def test_float16_scales_are_float16_numbers_on_the_table_and_its_tied_head() -> None:
    """``scale_dtype: float16`` (llama.cpp's Q8_0 stores its block scales so): every scale is a float16 number,
    within the error bound of the float32 grid."""
    model = tiny_llama()
    out = Pipeline([get("quantize_embeddings", scale_dtype="float16")])(trace(model, (token_ids(),)))
    table, linear = out.get_submodule("model.embed_tokens"), out.get_submodule("lm_head")
    assert linear.scales is table.scales and table.scales.dtype == torch.float32
    assert torch.equal(table.scales.half().float(), table.scales)
    assert relative_error(model, out) < ERROR_BOUND


def test_bad_options_and_layers_raise_named_errors() -> None:
    with pytest.raises(PassConfigError, match="bits=3 is not supported"):
        get("quantize_embeddings", bits=3)
    with pytest.raises(PassConfigError, match="group_size=24 does not divide the embedding dim 64"):
        Pipeline([get("quantize_embeddings", group_size=24)])(trace(tiny_bert(), (token_ids(),)))
    model = nn.Sequential(nn.Embedding(10, 32, max_norm=1.0))
    with pytest.raises(UnsupportedEmbeddingError, match="max_norm=1.0"):
        Pipeline(["quantize_embeddings"])(trace(model, (torch.tensor([[1, 2]]),)))
    out = Pipeline(["quantize_embeddings:ignore=[0]"])(trace(model, (torch.tensor([[1, 2]]),)))
    assert isinstance(out.get_submodule("0"), nn.Embedding)


def test_padding_idx_needs_nothing_at_inference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 32, padding_idx=0)).eval()
    x = torch.tensor([[0, 3, 9]])
    out = Pipeline(["quantize_embeddings"])(trace(model, (x,)))
    assert torch.equal(out(x)[0, 0], torch.zeros(32))
    # Round to nearest: every value within half a step of its group.
    half_step = float(out.get_submodule("0").scales.max()) / 2
    torch.testing.assert_close(out(x), model(x), rtol=0, atol=half_step * (1 + 1e-6))
