"""The real model through TVM: all-MiniLM-L6-v2 (exported graph, ATen ops + layers) at w4a16."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import demo, zoo


@pytest.mark.slow
def test_minilm_w4a16_matches_the_torch_graph() -> None:
    minilm = zoo.load_minilm()
    example = demo._encode(minilm.tokenizer, demo.COMPILE_SENTENCES)
    compiled = lowbit.compile(minilm.model, (), example_kwargs=example, recipe="w4a16-x86")
    assert compiled.report.target == "x86"
    assert {linear.kernel for linear in compiled._runner.linears} == {"packed_gemm"}
    held_out = demo._encode(minilm.tokenizer, demo.EVAL_SENTENCES)
    with torch.no_grad():
        expected = compiled.graph(**held_out)
        eager = minilm.model(**held_out)
    got = compiled(**held_out)
    assert type(got) is type(eager) and list(got.keys()) == list(eager.keys())
    pairs = zip((got.last_hidden_state, got.pooler_output), (expected.last_hidden_state, expected.pooler_output))
    for value, reference in pairs:
        assert float((value - reference).norm() / reference.norm()) < 1e-4
