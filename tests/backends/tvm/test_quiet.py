"""TVM's own C++ warnings a user cannot act on stay off the terminal; other output still gets through."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

import lowbit
from lowbit.backends.tvm.quiet import SILENCED, quiet_tvm


class _Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


def test_embedding_compile_export_and_load_print_no_tvm_noise(tmp_path, capfd, caplog) -> None:
    """nn.Embedding lowers to Relax's ``take`` (its legalization warns of out-of-bounds indices); exporting and
    loading a VM executable logs its memory scopes."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 5))
    model = _Embedder().eval()
    with caplog.at_level(logging.DEBUG):
        compiled = lowbit.compile(model, (ids,), target="x86")
        loaded = lowbit.load(compiled.export(tmp_path / "model"))
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-6)
    out, err = capfd.readouterr()
    for text in ("Fast mode segfaults", "Scope Saving", "Scope Loaded"):
        assert text not in out and text not in err and text not in caplog.text


def test_causal_lm_export_and_load_print_no_tvm_noise(tmp_path, capfd) -> None:
    """A KV-cache decoder's library has a function per step size; exporting and loading it logs their scopes."""
    from tests.llm.llm_models import causal_lm, prompts

    model = causal_lm("llama", layers=1)
    compiled = lowbit.compile(model, (prompts(1, 8),), target="x86", dynamic_shapes={"input_ids": {1: (1, 32)}})
    loaded = lowbit.load(compiled.export(tmp_path / "lm"))
    torch.testing.assert_close(
        loaded.generate(prompts(1, 8), max_new_tokens=4), compiled.generate(prompts(1, 8), max_new_tokens=4)
    )
    out, err = capfd.readouterr()
    for text in ("Scope Saving", "Scope Loaded"):
        assert text not in out and text not in err


def test_other_output_is_written_back(capfd) -> None:
    with quiet_tvm():
        os.write(2, f"[00:00:00] x.cc:1: Warning: {SILENCED[0]}\nkept line\n".encode())
    _, err = capfd.readouterr()
    assert err == "kept line\n"
