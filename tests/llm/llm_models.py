"""Tiny causal LMs of each family the generation lowering knows, a byte-level tokenizer for them, and their
calibration batches (shared by the generation tests)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 256


def causal_lm(model_type: str = "llama", layers: int = 2, tie: bool = True, seed: int = 0) -> torch.nn.Module:
    """A random transformers causal LM of ``model_type``: llama, qwen2, mistral, phi3 (grouped-query attention; Phi-3
    rotates half of each head) or gpt2."""
    if model_type == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=512, tie_word_embeddings=tie,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(config).eval()
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
    )
    config = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "phi3": transformers.Phi3Config,
    }[model_type](**sizes)
    if model_type == "phi3":
        config.rope_parameters["partial_rotary_factor"] = 0.5
        config.pad_token_id = None
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 tokens, one per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def calibration(count: int = 4, length: int = 32) -> list[torch.Tensor]:
    return [prompts(1, length, seed=100 + i) for i in range(count)]
