"""The decoder families the generation lowering knows, read from a transformers model's config.

A `DecoderSpec` holds what the lowering needs beyond the weights: sizes, the normalization, where each weight of a
block lives (module paths), and the rotary table. Llama, Mistral and Qwen2 share one block (RMSNorm, rotary
grouped-query attention, gated SiLU MLP; Qwen2 adds biases on q/k/v, which the weights carry). Any other model type
is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import GenerationError

#: transformers ``model_type`` → the block the lowering builds.
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama"}
#: The linears of one block, by role → module path under the block.
LLAMA_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
LLAMA_NORMS = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}


@dataclass(frozen=True)
class DecoderSpec:
    """Sizes and layout of a decoder-only causal LM."""

    family: str
    model_type: str
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    norm_eps: float
    max_positions: int
    #: The output projection reuses the embedding table (``tie_word_embeddings``).
    tied: bool = False
    #: Mistral's attention window (None: every earlier position).
    sliding_window: int | None = None
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    def block(self, index: int) -> str:
        return f"model.layers.{index}"

    def linear(self, index: int, role: str) -> str:
        """The module path of one linear of block ``index`` (role ``q``, ``k``, ``v``, ``o``, ``gate``, ``up``,
        ``down``)."""
        return f"{self.block(index)}.{LLAMA_LINEARS[role]}"

    def norm(self, index: int, role: str) -> str:
        return f"{self.block(index)}.{LLAMA_NORMS[role]}"

    def linears(self) -> list[str]:
        """Every linear the lowering reads, block by block, then the output projection."""
        paths = [self.linear(i, role) for i in range(self.layers) for role in LLAMA_LINEARS]
        return [*paths, self.lm_head]

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def decoder_spec(model: torch.nn.Module) -> DecoderSpec:
    """The spec of a transformers causal LM; `GenerationError` naming its type when the lowering does not know it."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise GenerationError(
            f"generation is lowered for the model families {known}; {type(model).__name__} "
            f"(model_type {model_type!r}) is not one of them. Compile it without dynamic_shapes for a "
            "fixed-shape forward"
        )
    activation = getattr(config, "hidden_act", "silu")
    if activation != "silu":
        raise GenerationError(f"{model_type}: hidden_act {activation!r} is not lowered (only 'silu')")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return DecoderSpec(
        family=FAMILIES[model_type],
        model_type=model_type,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        q_heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        norm_eps=float(config.rms_norm_eps),
        max_positions=int(config.max_position_embeddings),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        sliding_window=_window(config),
    )


def _window(config: Any) -> int | None:
    """The attention window, where the model uses one (Qwen2 configs carry a window they switch off)."""
    window = getattr(config, "sliding_window", None)
    return int(window) if window and getattr(config, "use_sliding_window", True) else None


def rotary_table(model: torch.nn.Module, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of every position below ``length``, ``(length, head_dim)`` fp32, as the model's own
    rotary module computes them (its rope type and scaling included)."""
    rotary = model.model.rotary_emb
    positions = torch.arange(length).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    return cos[0].float().contiguous(), sin[0].float().contiguous()


__all__ = ["FAMILIES", "DecoderSpec", "decoder_spec", "rotary_table"]
