"""Random small models and inputs: every target answers what eager answers, or raises a named error where eager
raises or would answer NaN (bounded: a few examples per target)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.errors import InputError, NonFiniteInputError


class TokenMLP(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(depth))

    def forward(self, ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) * scale
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@st.composite
def cases(draw: st.DrawFn) -> tuple[TokenMLP, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    vocab, hidden = draw(st.integers(2, 30)), draw(st.integers(1, 12))
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = TokenMLP(vocab, hidden, draw(st.integers(0, 2))).eval()
    calls = []
    for _ in range(3):
        ids = torch.tensor(draw(st.lists(st.integers(-3, vocab + 3), min_size=batch * length, max_size=batch * length)))
        scale = torch.tensor(draw(st.sampled_from([1.0, 0.5, float("nan"), float("inf")])))
        calls.append((ids.view(batch, length), scale.expand(batch, length, 1).clone()))
    return model, torch.randint(0, vocab, (batch, length)), calls


def _same_as_eager_or_named_error(target: str, case) -> None:
    model, example, calls = case
    compiled = lowbit.compile(model, (example, torch.ones(*example.shape, 1)), target=target)
    for ids, scale in calls:
        try:
            with torch.no_grad():
                expected = model(ids, scale)
        except IndexError:
            with pytest.raises(InputError):
                compiled(ids, scale)
            continue
        if not torch.isfinite(scale).all():
            with pytest.raises(NonFiniteInputError):
                compiled(ids, scale)
            continue
        torch.testing.assert_close(compiled(ids, scale), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_torch_target_is_eager_or_a_named_error(case) -> None:
    _same_as_eager_or_named_error("torch", case)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_x86_target_is_eager_or_a_named_error(case) -> None:
    _same_as_eager_or_named_error("x86", case)


@pytest.mark.parametrize("target", ["torch", "x86"])
def test_int8_activations_keep_rows_of_tiny_values(target: str) -> None:
    """A token with absmax 1e-7 keeps its own scale (it is not flushed to zero); an all-zero token gives zero."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16, bias=False)).eval()
    compiled = lowbit.compile(
        model, (torch.randn(3, 64),), passes=[lowbit.passes.get("rtn", bits=8), "quantize_activations"], target=target
    )
    assert compiled.report.bytes_after < compiled.report.bytes_before, "the linear is packed"
    x = torch.randn(3, 64)
    x[1] *= 1e-7 / x[1].abs().max()
    x[2] = 0.0
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    # int8 weights and int8 activations: a few quantization steps of each, relative to the row's size
    for row in (0, 1):
        assert (got[row] - expected[row]).abs().max() <= 0.02 * expected[row].abs().max(), row
    assert torch.equal(got[2], torch.zeros(16))
