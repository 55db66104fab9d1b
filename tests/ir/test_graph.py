"""lowbit.ir.graph: attribute lookups, operator names for every spelling, layers with their calls."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from lowbit.errors import LowbitError
from lowbit.ir.graph import attr_path, get_attr, get_attr_tensor, layers, op_name


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.fc(x)) * self.scale
        return self.fc(y).mul(2)[0]


def test_get_attr_follows_nodes_and_dotted_paths() -> None:
    gm = fx.symbolic_trace(Shared())
    (scale,) = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert attr_path(scale) == "scale" and get_attr_tensor(gm, scale) is gm.scale
    assert get_attr(gm, "fc.weight") is gm.fc.weight and get_attr(gm, "fc") is gm.fc
    assert get_attr(gm, "fc.missing", None) is None and get_attr(gm, "nowhere.weight", None) is None
    with pytest.raises(LowbitError, match="no attribute 'fc.missing'"):
        get_attr(gm, "fc.missing")
    with pytest.raises(LowbitError, match="not a tensor"):
        get_attr_tensor(gm, "fc")
    with pytest.raises(LowbitError, match="not a get_attr"):
        attr_path(next(iter(gm.graph.nodes)))


def test_op_name_is_the_same_for_every_spelling() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    spellings = [
        graph.call_function(operator.mul, (x, x)),
        graph.call_function(torch.mul, (x, x)),
        graph.call_method("mul", (x, x)),
        graph.call_function(torch.ops.aten.mul.Tensor, (x, x)),
    ]
    assert {op_name(n) for n in spellings} == {"mul"}
    assert op_name(graph.call_function(operator.getitem, (x, 0))) == "getitem"
    assert op_name(x) == "" and op_name(graph.get_attr("w")) == "" and op_name(graph.call_module("fc", (x,))) == ""


def test_layers_yield_each_module_once_with_all_its_calls() -> None:
    gm = fx.symbolic_trace(Shared())
    found = list(layers(gm, nn.Linear))
    assert [(path, module) for path, module, _ in found] == [("fc", gm.fc)]
    assert [n.name for n in found[0][2]] == ["fc", "fc_1"]
    assert [path for path, _, _ in layers(gm)] == ["fc", "act"]
