"""Fast transcendental legalizations: torch's numbers to float32 precision, and no libm call per element."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import te, topi

import lowbit
from lowbit.backends.tvm import TVMBackend, fastmath
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


def test_silu_of_one_value_is_the_legalized_silu() -> None:
    """`fastmath.silu_of`, the SiLU of one value that an int8 kernel's output stage applies, computes the values of
    the ``silu`` legalization bit for bit, here after an add as after a convolution's bias."""
    x = te.placeholder((4096,), "float32", name="x")
    one_value = te.compute(x.shape, lambda i: fastmath.silu_of(x[i] + 0.5), name="y")
    legalized = fastmath._silu(topi.add(x, 0.5))
    target = resolve_target("x86")
    values = torch.linspace(-90.0, 90.0, 4096)
    outputs = []
    for y in (one_value, legalized):
        module = tvm.compile(te.create_prim_func([x, y]).with_attr("global_symbol", "main"), target=target)
        out = tvm.runtime.tensor(torch.zeros(4096).numpy())
        module["main"](tvm.runtime.tensor(values.numpy()), out)
        outputs.append(torch.from_numpy(out.numpy()))
    assert torch.equal(outputs[0], outputs[1])
    above = values + 0.5 > -68.0  # methods.md's bound: 7 ulps down to -88, where fast_exp clamps its argument
    torch.testing.assert_close(outputs[0][above], F.silu(values + 0.5)[above], rtol=7 * 2.0**-23, atol=0.0)
