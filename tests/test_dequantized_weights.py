"""`lowbit.dequantized_weights`: the weight each layer of a compressed graph computes with."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.errors import LowbitError
from lowbit.ir import ops
from lowbit.ir.annotations import Sparsity, annotate
from lowbit.ir.packing import dequantize
from lowbit.passes import Pipeline, registry
from lowbit.passes.quant import RTN, QuantizeActivations, Ternary


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(self.fc1(h) + self.fc1(h).relu())  # fc1 is called twice


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def test_plain_graph_gives_copies_of_the_weights(net: Net) -> None:
    weights = lowbit.dequantized_weights(fx.symbolic_trace(net))
    assert list(weights) == ["conv", "fc1", "fc2"]
    assert torch.equal(weights["conv"], net.conv.weight) and torch.equal(weights["fc2"], net.fc2.weight)
    weights["fc2"].zero_()
    assert net.fc2.weight.abs().sum() > 0  # a copy, not a view


def test_packed_layers_are_dequantized_from_their_buffers(net: Net) -> None:
    x = torch.randn(2, 3, 4, 4)
    compiled = lowbit.compile(
        net, (x,), passes=[RTN(bits=4, group_size=16, symmetric=False, ignore=["fc2"])], target="torch"
    )
    weights = lowbit.dequantized_weights(compiled)
    assert list(weights) == ["conv", "fc1", "fc2"]
    fc1 = compiled.graph.get_submodule("fc1")
    assert torch.equal(weights["fc1"], dequantize(fc1.qweight, fc1.scales, fc1.zeros, fc1.g_idx, 4, 16, 64))
    assert torch.equal(weights["fc2"], net.fc2.weight)
    conv = compiled.graph.get_submodule("conv")  # rtn packs convolutions too
    conv_weight = dequantize(conv.qweight, conv.scales, conv.zeros, None, 4, 16, 27).view(4, 3, 3, 3)
    assert torch.equal(weights["conv"], conv_weight)
    with torch.no_grad():
        h = torch.relu(F.conv2d(x, weights["conv"], net.conv.bias, padding=1)).flatten(1)
        first = F.linear(h, weights["fc1"], net.fc1.bias)
        assert torch.equal(compiled(x), net.fc2(first + first.relu()))
    assert lowbit.dequantized_weights(compiled.graph).keys() == weights.keys()


def test_int8_activation_layers_report_their_weight(net: Net) -> None:
    gm = Pipeline([Ternary(), QuantizeActivations()])(fx.symbolic_trace(net))
    weights = lowbit.dequantized_weights(gm)
    gamma = net.fc2.weight.abs().mean()
    assert torch.equal(weights["fc2"], gamma * torch.clamp(torch.round(net.fc2.weight / gamma), -1, 1))


def test_masked_layer_gives_weight_times_mask(net: Net) -> None:
    """A pruned layer (mask buffer ``<layer>.weight_mask``, F.linear on weight·mask) and a packed one."""
    gm = Pipeline([RTN(bits=8, ignore=["fc1"])])(fx.symbolic_trace(net))
    mask = torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    gm.fc1.register_buffer("weight_mask", mask)
    sparsity = Sparsity(1 - mask.float().mean().item(), "unstructured", "fc1.weight_mask", "test")
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "fc1"]:
        with gm.graph.inserting_before(node):
            masked = gm.graph.call_function(
                torch.mul, (gm.graph.get_attr("fc1.weight"), gm.graph.get_attr("fc1.weight_mask"))
            )
            new = gm.graph.call_function(F.linear, (node.args[0], masked, gm.graph.get_attr("fc1.bias")))
        annotate(new, "fc1", sparsity=sparsity)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    packed = next(n for n in gm.graph.nodes if n.target is ops.linear_packed)
    gm.fc2.register_buffer("weight_mask", torch.ones(10, 32, dtype=torch.bool).tril())
    annotate(packed, "fc2", sparsity=Sparsity(0.5, "unstructured", "weight_mask", "test"))  # relative name
    weights = lowbit.dequantized_weights(gm)
    assert list(weights) == ["conv", "fc1", "fc2"]
    assert torch.equal(weights["fc1"], net.fc1.weight * mask)
    fc2 = gm.get_submodule("fc2")
    assert torch.equal(weights["fc2"], dequantize(fc2.qweight, fc2.scales, None, None, 8, 32, 32).tril())


def test_with_the_magnitude_pruning_pass(net: Net) -> None:
    gm = Pipeline([registry.get("prune_magnitude", sparsity=0.5)])(fx.symbolic_trace(net))
    weights = lowbit.dequantized_weights(gm)
    assert 0.45 <= float((weights["fc1"] == 0).float().mean()) <= 0.55


def test_rejects_what_is_not_a_graph() -> None:
    with pytest.raises(LowbitError, match="needs a torch.fx GraphModule or a compiled model, got Linear"):
        lowbit.dequantized_weights(nn.Linear(2, 2))
