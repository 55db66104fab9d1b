"""Grad-mode regions recorded by torch.export are inlined before TVM imports a graph."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit import zoo
from lowbit.backends.tvm import TVMBackend
from lowbit.backends.tvm.inline import inline_wrapped_regions


class NoGradTable(nn.Module):
    """Computes a table under ``torch.no_grad()`` the way rotary embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            table = torch.cos(x * self.freq)
            other = torch.sin(x) * 2.0
        return self.proj(x) * table + other


def _wrapper_calls(gm: torch.fx.GraphModule) -> int:
    return sum(1 for node in gm.graph.nodes if "wrap_with" in getattr(node.target, "__name__", ""))


def test_inlined_graph_has_no_wrappers_and_equal_outputs() -> None:
    model = NoGradTable().eval()
    x = torch.randn(3, 8)
    gm = lowbit.trace(model, (x,), tracer="export")
    assert _wrapper_calls(gm) == 1
    inlined = inline_wrapped_regions(gm)
    assert _wrapper_calls(inlined) == 0
    assert _wrapper_calls(gm) == 1, "the input graph is left as it was"
    torch.testing.assert_close(inlined(x), model(x), rtol=0, atol=0)


def test_graph_without_wrappers_is_returned_unchanged() -> None:
    gm = lowbit.trace(nn.Linear(4, 4), (torch.randn(2, 4),))
    assert inline_wrapped_regions(gm) is gm


def test_llama_rotary_region_compiles_with_tvm() -> None:
    llama = zoo.build("llama-tiny")
    kwargs = llama.example_kwargs
    gm = lowbit.trace(llama.model, (), example_kwargs=kwargs)
    assert _wrapper_calls(gm) >= 1
    runner = TVMBackend("x86").compile(gm, ())
    expected = llama.model(**kwargs).logits
    got = runner(**kwargs)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
