"""Small models the tests share, each defined once so a name means one shape everywhere.

The builders seed ``torch`` before creating layers, as the tests that use them always did, so
the weights (and every tolerance tuned on them) stay the same.
"""

from __future__ import annotations

from itertools import pairwise

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
