"""``prune_channels``: layers and their consumers really shrink, the function is kept where channels were dead."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.prune import PruneChannels


def convnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32),
        nn.GELU(),
        nn.Linear(32, 4),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def test_producers_norms_and_consumers_shrink() -> None:
    net, x = convnet(), torch.randn(2, 3, 8, 8)
    pipe = Pipeline([PruneChannels(sparsity=0.5)])
    out = pipe(lowbit.trace(net, (x,)))
    assert out.get_submodule("0").weight.shape == (8, 3, 3, 3)
    assert out.get_submodule("1").num_features == 8 and out.get_submodule("1").running_var.shape == (8,)
    assert out.get_submodule("3").weight.shape == (8, 8, 3, 3)
    assert out.get_submodule("5").weight.shape == (16, 288) and out.get_submodule("7").weight.shape == (4, 16)
    assert out(x).shape == (2, 4)
    records = {r.layer: r for r in pipe.report.passes[0].layers}
    assert records["0"].stats["channels"] == "8/16" and records["0"].stats["consumer"] == "3"
    assert "Flatten" in records["3"].reason and records["7"].action == "skipped"
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in net.parameters())


def test_consecutive_layers_shrink_on_both_sides() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    out = Pipeline([PruneChannels(sparsity=0.5)])(lowbit.trace(net, (torch.randn(2, 8),)))
    assert [tuple(out.get_submodule(p).weight.shape) for p in ("0", "2", "4")] == [(16, 8), (8, 16), (4, 8)]
    kept = torch.topk(net[0].weight.detach().abs().sum(1), 16).indices.sort().values
    kept2 = torch.topk(net[2].weight.detach()[:, kept].abs().sum(1), 8).indices.sort().values
    torch.testing.assert_close(out.get_submodule("2").weight, net[2].weight[kept2][:, kept])
    assert out(torch.randn(3, 8)).shape == (3, 4)


def test_removing_dead_channels_keeps_the_function_exactly() -> None:
    net, x = convnet(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # half the hidden units of the MLP can never fire: removing them changes nothing
        net[5].weight[::2] *= 0.001
        net[5].bias[::2] = -1e4
    gm = lowbit.trace(net, (x,))
    out = Pipeline([PruneChannels(sparsity=0.5, criterion="l2", overrides={"0": "skip"})])(gm)
    assert out.get_submodule("5").out_features == 16
    torch.testing.assert_close(out(x), net(x), rtol=1e-5, atol=1e-5)


def test_picks_the_lowest_l1_filters() -> None:
    net, x = convnet(), torch.randn(1, 3, 8, 8)
    norms = net[0].weight.detach().abs().flatten(1).sum(1)
    out = Pipeline([PruneChannels(sparsity=0.25)])(lowbit.trace(net, (x,)))
    kept = torch.topk(norms, 12).indices.sort().values
    torch.testing.assert_close(out.get_submodule("0").weight, net[0].weight[kept])
    torch.testing.assert_close(out.get_submodule("3").weight, net[3].weight[:, kept])


def test_residual_and_shared_outputs_are_skipped_with_a_reason() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h) + h

    pipe = Pipeline([PruneChannels(sparsity=0.5)])
    out = pipe(lowbit.trace(Residual(), (torch.randn(2, 8),)))
    reasons = {r.layer: r.reason for r in pipe.report.passes[0].layers}
    assert "2 users" in reasons["a"]
    assert out.get_submodule("a").out_features == 8


def test_exported_mlp_shrinks_through_aten_gelu() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 5, 8)
    gm = lowbit.trace(net, (x,), tracer="export")
    assert any(n.target is torch.ops.aten.gelu.default for n in gm.graph.nodes)
    out = Pipeline([PruneChannels(sparsity=0.25)])(gm)
    assert out.get_submodule("0").out_features == 24 and out.get_submodule("3").in_features == 24
    assert out(x).shape == (2, 5, 8)


@pytest.mark.slow
def test_transformer_mlp_shrinks_through_aten_gelu() -> None:
    from lowbit import zoo

    z = zoo.build("deit_tiny")
    gm = lowbit.trace(z.model, z.example_inputs)
    pipe = Pipeline([PruneChannels(sparsity=0.5, ignore=["re:.*attn.*", "head"])])
    out = pipe(gm)
    fc1 = out.get_submodule("blocks.0.mlp.fc1")
    assert fc1.out_features == gm.get_submodule("blocks.0.mlp.fc1").out_features // 2
    assert out.get_submodule("blocks.0.mlp.fc2").in_features == fc1.out_features
    assert out(*z.example_inputs).shape == z.model(*z.example_inputs).shape


@pytest.mark.parametrize("sparsity", [0.0, 0.99])
def test_keeps_at_least_one_channel(sparsity: float) -> None:
    net, x = convnet(), torch.randn(1, 3, 8, 8)
    out = Pipeline([PruneChannels(sparsity=sparsity)])(lowbit.trace(net, (x,)))
    assert out.get_submodule("5").out_features == (32 if sparsity == 0 else 1)
