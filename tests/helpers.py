"""Small models the tests share, each defined once so a name means one shape everywhere.

The builders seed ``torch`` before creating layers, as the tests that use them always did, so
the weights (and every tolerance tuned on them) stay the same.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from torch import nn


def seeded_mlp(*widths: int, act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    """``Linear(widths[0], widths[1]), act(), Linear(widths[1], widths[2]), ...`` (layers ``"0"``, ``"2"``, ...),
    created right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in pairwise(widths):
        if layers:
            layers.append(act())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def norm_mlp() -> nn.Sequential:
    """Linear 128 → 64, GELU, LayerNorm, Linear 64 → 32, seeded and in eval mode: an MLP with a non-linear layer
    between the linears that every backend must lower."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 32)).eval()


class TwoLayerMLP(nn.Module):
    """``fc1 → relu → fc2``."""

    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class LMHeadMLP(nn.Module):
    """``fc1 → relu → fc2 → relu → lm_head``: the layer names of a language model's tail, whose ``lm_head`` the
    shipped recipes leave in float."""

    def __init__(self, n_in: int, hidden1: int, hidden2: int, n_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.lm_head = nn.Linear(hidden2, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


#: Vocabulary and width of `tiny_llama` and `tiny_bert`.
TINY_VOCAB, TINY_DIM = 96, 64


def tiny_llama(tie: bool = True, **overrides: Any) -> nn.Module:
    """A one-layer transformers Llama (``use_cache=False``, as tracing needs), its lm_head tied to its embedding
    table unless ``tie`` is False; ``overrides`` replace config fields."""
    import transformers

    config = transformers.LlamaConfig(
        **{
            "vocab_size": TINY_VOCAB,
            "hidden_size": TINY_DIM,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "use_cache": False,
            "max_position_embeddings": 64,
            "tie_word_embeddings": tie,
            **overrides,
        }
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert(**overrides: Any) -> nn.Module:
    """A one-layer transformers BERT encoder (word, position and token-type embedding tables); ``overrides``
    replace config fields."""
    import transformers

    config = transformers.BertConfig(
        **{
            "vocab_size": TINY_VOCAB,
            "hidden_size": TINY_DIM,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 64,
            **overrides,
        }
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def token_ids() -> torch.Tensor:
    """A fixed ``(2, 8)`` batch of ids for `tiny_llama` and `tiny_bert`."""
    return torch.randint(0, TINY_VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
