"""Packed embedding tables on TVM (llvm): the gather-dequantize kernel and a tied lm_head equal the torch target."""

from __future__ import annotations

import pytest
import torch

import lowbit

from helpers import tiny_bert, tiny_llama, token_ids


@pytest.mark.parametrize(
    ("build", "passes"),
    [
        (tiny_llama, ["quantize_embeddings"]),
        (tiny_bert, ["quantize_embeddings:bits=4,group_size=16,symmetric=false"]),
    ],
    ids=["tied-llama-w8", "bert-w4-asym"],
)
def test_x86_equals_the_torch_target(build, passes) -> None:
    model = build()
    x = token_ids()
    reference = lowbit.compile(model, (x,), passes=passes, target="torch")
    compiled = lowbit.compile(model, (x,), passes=passes, target="x86")
    assert compiled.report.fallbacks == []
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], reference(x)[0], rtol=1e-5, atol=1e-5)


def test_cuda_binds_the_lookup_and_names_the_tied_head_by_its_own_path() -> None:
    """The gather-dequantize kernel gets GPU threads (compiled, run only where there is a GPU)."""
    model = tiny_llama()
    compiled = lowbit.compile(model, (token_ids(),), passes=["quantize_embeddings"], target="cuda")
    assert [linear.layer for linear in compiled.runner.linears] == ["lm_head"]
