"""The decoder families the generation lowering knows, each a declarative `Family`, and a model's `DecoderSpec`.

A `Family` says where a block's weights live and which variant of each part it uses: the normalization (RMSNorm or
LayerNorm with bias), the positions (rotary, possibly on part of each head, or a learned table added to the
embedding), the MLP (gated SiLU or GELU), and the projections as the graph holds them, each split into the roles
``q k v o gate up down`` (fused projections such as Phi-3's ``qkv_proj`` or GPT-2's ``c_attn`` list several roles).
Llama, Mistral and Qwen2 share one family; GPT-2 and Phi-3 have their own. Any other model type is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import GenerationError

#: The roles whose projections read the normed block input, and those that read the normed attention output.
ATTENTION_INPUT = ("q", "k", "v")
MLP_INPUT = ("gate", "up")


@dataclass(frozen=True)
class Projection:
    """One linear of a block as the graph holds it: its path under the block and the roles its output rows hold,
    in order."""

    path: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """Where a decoder's weights live and which variant of each part its blocks use."""

    #: Module path of the block list (blocks are ``{blocks}.{index}``).
    blocks: str
    embed: str
    final_norm: str
    lm_head: str
    #: Norm paths under a block: before attention, before the MLP.
    attn_norm: str
    mlp_norm: str
    projections: tuple[Projection, ...]
    #: ``"rms"`` (weight only) or ``"layer"`` (LayerNorm: weight and bias).
    norm: str = "rms"
    #: ``"rotary"`` (the model's rotary module) or ``"learned"`` (a table at ``position_embed`` added to the
    #: token embedding).
    position: str = "rotary"
    position_embed: str | None = None
    #: ``"gated_silu"`` (down(silu(gate) * up)) or ``"gelu_tanh"`` (down(gelu_tanh(up))).
    mlp: str = "gated_silu"
    #: The block projections' fp32 weights are stored ``(in, out)`` (transformers' Conv1D).
    transposed: bool = False
    #: The config attribute naming the MLP activation.
    activation_setting: str = "hidden_act"
    #: Config settings the lowering implements only at these values (name, value).
    fixed_settings: tuple[tuple[str, Any], ...] = ()


LLAMA = Family(
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    projections=(
        Projection("self_attn.q_proj", ("q",)),
        Projection("self_attn.k_proj", ("k",)),
        Projection("self_attn.v_proj", ("v",)),
        Projection("self_attn.o_proj", ("o",)),
        Projection("mlp.gate_proj", ("gate",)),
        Projection("mlp.up_proj", ("up",)),
        Projection("mlp.down_proj", ("down",)),
    ),
)
PHI3 = Family(
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    projections=(
        Projection("self_attn.qkv_proj", ("q", "k", "v")),
        Projection("self_attn.o_proj", ("o",)),
        Projection("mlp.gate_up_proj", ("gate", "up")),
        Projection("mlp.down_proj", ("down",)),
    ),
)
GPT2 = Family(
    blocks="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    attn_norm="ln_1",
    mlp_norm="ln_2",
    projections=(
        Projection("attn.c_attn", ("q", "k", "v")),
        Projection("attn.c_proj", ("o",)),
        Projection("mlp.c_fc", ("up",)),
        Projection("mlp.c_proj", ("down",)),
    ),
    norm="layer",
    position="learned",
    position_embed="transformer.wpe",
    mlp="gelu_tanh",
    transposed=True,
    activation_setting="activation_function",
    fixed_settings=(
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
    ),
)
#: Family name → description.
FAMILIES = {"llama": LLAMA, "phi3": PHI3, "gpt2": GPT2}
#: transformers ``model_type`` → family name.
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "phi3": "phi3", "gpt2": "gpt2"}
#: Activations each MLP kind accepts, by the config's name for them.
ACTIVATIONS = {"gated_silu": ("silu",), "gelu_tanh": ("gelu_new", "gelu_pytorch_tanh")}


@dataclass(frozen=True)
class DecoderSpec:
    """Sizes and layout of a decoder-only causal LM (`Family` by name, so the spec serializes)."""

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

    @property
    def description(self) -> Family:
        """The family's `Family`."""
        return FAMILIES[self.family]

    @property
    def embed(self) -> str:
        return self.description.embed

    @property
    def final_norm(self) -> str:
        return self.description.final_norm

    @property
    def lm_head(self) -> str:
        return self.description.lm_head

    def block(self, index: int) -> str:
        return f"{self.description.blocks}.{index}"

    def norm(self, index: int, role: str) -> str:
        """The module path of a block's norm before ``"attn"`` or ``"mlp"``."""
        under = self.description.attn_norm if role == "attn" else self.description.mlp_norm
        return f"{self.block(index)}.{under}"

    def projections(self, index: int, roles: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
        """The projections of block ``index`` whose outputs hold ``roles``: (module path, roles) each."""
        return [
            (f"{self.block(index)}.{p.path}", p.roles)
            for p in self.description.projections
            if set(p.roles) <= set(roles)
        ]

    def widths(self, roles: tuple[str, ...], total: int) -> list[int]:
        """The output widths of ``roles`` in a projection of ``total`` rows: the attention heads' sizes, and equal
        shares of the rest for the MLP roles (Phi-3's ``gate_up_proj``)."""
        heads = {"q": self.q_heads * self.head_dim, "k": self.kv_heads * self.head_dim,
                 "v": self.kv_heads * self.head_dim}  # fmt: skip
        known = sum(heads.get(role, 0) for role in roles)
        others = [role for role in roles if role not in heads]
        share = (total - known) // len(others) if others else 0
        return [heads.get(role, share) for role in roles]

    def linears(self) -> list[str]:
        """Every linear the lowering reads, block by block, then the output projection."""
        paths = [f"{self.block(i)}.{p.path}" for i in range(self.layers) for p in self.description.projections]
        return [*paths, self.lm_head]

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def decoder_spec(model: torch.nn.Module) -> DecoderSpec:
    """The spec of a transformers causal LM; `GenerationError` naming its type, or the setting, the lowering does
    not implement."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        known = ", ".join(sorted(MODEL_TYPES))
        raise GenerationError(
            f"generation is lowered for the model families {known}; {type(model).__name__} "
            f"(model_type {model_type!r}) is not one of them. Compile it without dynamic_shapes for a "
            "fixed-shape forward"
        )
    family = FAMILIES[MODEL_TYPES[model_type]]
    activation = getattr(config, family.activation_setting, None)
    if activation not in ACTIVATIONS[family.mlp]:
        raise GenerationError(
            f"{model_type}: activation {activation!r} is not lowered (only {', '.join(ACTIVATIONS[family.mlp])})"
        )
    changed = [name for name, value in family.fixed_settings if getattr(config, name, value) != value]
    if changed:
        raise GenerationError(f"{model_type}: the settings {changed} are lowered only at their defaults")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = config.layer_norm_epsilon if family.norm == "layer" else config.rms_norm_eps
    return DecoderSpec(
        family=MODEL_TYPES[model_type],
        model_type=model_type,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        q_heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        norm_eps=float(eps),
        max_positions=int(config.max_position_embeddings),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        sliding_window=_window(config),
    )


def _window(config: Any) -> int | None:
    """The attention window, where the model uses one (Qwen2 configs carry a window they switch off)."""
    window = getattr(config, "sliding_window", None)
    return int(window) if window and getattr(config, "use_sliding_window", True) else None


def check_rotary(model: torch.nn.Module, length: int) -> None:
    """`GenerationError` where the model's rotary frequencies change within a context of ``length`` tokens:
    ``longrope`` switches to its long factors once a sequence passes the original context (transformers then
    recomputes the whole cache), which one rotary table does not implement."""
    config = model.config
    parameters = getattr(config, "rope_parameters", None) or {}
    if parameters.get("rope_type") != "longrope":
        return
    original = parameters.get("original_max_position_embeddings")
    original = int(original or getattr(config, "original_max_position_embeddings", 0) or config.max_position_embeddings)
    if length > original:
        raise GenerationError(
            f"{config.model_type}: rope_type 'longrope' switches to its long factors past {original} positions, which "
            f"the cache lowering does not implement: compile with a context of at most {original}"
        )


def rotary_table(model: torch.nn.Module, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of every position below ``length``, ``(length, rotary_dim)`` fp32, as the model's own
    rotary module computes them (its rope type, scaling and partial rotary factor included); ``(length, 0)`` for
    learned positions."""
    if FAMILIES[MODEL_TYPES[model.config.model_type]].position != "rotary":
        empty = torch.zeros(length, 0)
        return empty, empty.clone()
    rotary = model.model.rotary_emb
    positions = torch.arange(length).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    return cos[0].float().contiguous(), sin[0].float().contiguous()


__all__ = [
    "FAMILIES",
    "MODEL_TYPES",
    "DecoderSpec",
    "Family",
    "Projection",
    "check_rotary",
    "decoder_spec",
    "rotary_table",
]
