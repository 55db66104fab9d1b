"""The compile report names every layer the TVM backend ran on a fallback path, with the reason."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit import passes


def test_three_bit_layer_is_reported_as_a_fallback() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    x = torch.randn(4, 64)
    compiled = lowbit.compile(model, (x,), passes=[passes.get("rtn", bits=3, group_size=32)], target="x86")
    assert len(compiled.report.fallbacks) == 2
    assert all("3" in item for item in compiled.report.fallbacks), compiled.report.fallbacks
    assert "fallback" in str(compiled.report)
    torch.testing.assert_close(compiled(x), compiled.graph(x), rtol=1e-5, atol=1e-5)


def test_kernel_layers_are_not_fallbacks() -> None:
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    x = torch.randn(2, 64)
    compiled = lowbit.compile(model, (x,), passes=[passes.get("rtn", bits=4, group_size=32)], target="x86")
    assert compiled.report.fallbacks == []
