"""Fast transcendental legalizations: torch's numbers to float32 precision, and no libm call per element."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.backends.tvm import TVMBackend
from lowbit.backends.tvm.lowering import lower
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.toolchains.cpu import CPUToolchain

ACTIVATIONS = {
    "exp": torch.exp,
    "tanh": torch.tanh,
    "erf": torch.erf,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "softmax": lambda x: torch.softmax(x, dim=-1),
}


class Apply(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_fast_activation_matches_torch(name: str) -> None:
    x = torch.linspace(-12.0, 12.0, 4 * 96).reshape(4, 96)
    if name == "exp":
        x = torch.linspace(-80.0, 80.0, 4 * 96).reshape(4, 96)
    model = Apply(ACTIVATIONS[name])
    runner = TVMBackend("x86").compile(lowbit.trace(model, (x,)), (x,))
    torch.testing.assert_close(runner(x), model(x), rtol=2e-6, atol=1e-6)


class MaskedSoftmax(nn.Module):
    """Softmax over scores whose masked positions become -inf inside the model (compiled models take finite inputs)."""

    def forward(self, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores + torch.log(keep), dim=-1)  # log(0) = -inf where masked


def test_softmax_keeps_masked_positions_at_zero() -> None:
    scores = torch.randn(2, 3, 8, 8)
    keep = torch.arange(8) < 5
    keep = keep.expand(2, 3, 8, 8).float().contiguous()
    model = MaskedSoftmax()
    got = TVMBackend("x86").compile(lowbit.trace(model, (scores, keep)), (scores, keep))(scores, keep)
    torch.testing.assert_close(got, model(scores, keep), rtol=2e-6, atol=1e-7)
    assert got[..., 5:].abs().max() < 1e-30


def test_gelu_is_legalized_without_the_erf_intrinsic() -> None:
    x = torch.randn(4, 64)
    gm = lowbit.trace(Apply(F.gelu), (x,))
    toolchain = CPUToolchain(resolve_target("x86"))
    script = toolchain.schedule(lower(gm, (x,), toolchain).mod).script()
    assert "fast_gelu" in script
    assert "T.erf(" not in script
