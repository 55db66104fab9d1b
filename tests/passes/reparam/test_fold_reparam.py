"""fold_reparam: exact folding of every reparameterization, ordering before quantizers, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lowbit
from lowbit.errors import PassOrderError
from lowbit.ir.annotations import Reparam, annotate, graph_kinds
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.registry import get
from lowbit.passes.reparam import ReparamError, StatsQ

X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=4, embed_dim=16, depth=1, num_heads=2
    ).eval()


def _train_a_little(gm: torch.fx.GraphModule) -> None:
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    gm.train()
    for _ in range(2):
        optimizer.zero_grad()
        gm(X).square().mean().backward()
        optimizer.step()
    gm.eval()


@pytest.mark.parametrize(
    "passes",
    [
        ["weight_norm"],
        [get("weight_norm", dim=None)],
        [get("weight_compander", learnable=True)],
        ["qkr"],
        ["qkr", "weight_compander"],
    ],
)
def test_fold_is_exact_after_training(passes: list) -> None:
    gm = Pipeline(passes)(lowbit.trace(_vit(), (X,)))
    _train_a_little(gm)
    pipeline = Pipeline(["fold_reparam"])
    folded = pipeline(gm)
    assert "reparam" not in graph_kinds(folded.graph)
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    records = pipeline.report.passes[0].layers
    assert records and all(r.stats["max_rel_weight_diff"] <= 1e-6 for r in records)
    with torch.no_grad():
        torch.testing.assert_close(folded(X), gm(X), rtol=0, atol=1e-6 * gm(X).abs().max().item())
        gm(X)  # the copied-from graph still works (parametrized classes are not shared with the fold)


def test_fold_keeps_the_fake_quantizer_on_top() -> None:
    gm = Pipeline(["qkr", "weight_norm", get("statsq", ignore=("head",))])(lowbit.trace(_vit(), (X,)))
    folded = Pipeline(["fold_reparam"])(gm)
    fc1 = folded.get_submodule("blocks.0.mlp.fc1")
    assert [type(p) for p in fc1.parametrizations.weight] == [StatsQ]
    assert isinstance(folded.get_submodule("blocks.0.attn.qk").parametrizations.weight[0], StatsQ)
    assert set(graph_kinds(folded.graph)) == {"fake_quant"}
    with torch.no_grad():
        torch.testing.assert_close(folded(X), gm(X), rtol=0, atol=1e-6)


def test_quantizers_must_come_after_the_fold() -> None:
    with pytest.raises(PassOrderError, match="unfolded reparameterizations.*add 'fold_reparam' before 'rtn'"):
        Pipeline(["weight_norm", "rtn"])
    gm = lowbit.trace(_vit(), (X,))
    with pytest.raises(PassOrderError, match="fold_reparam"):
        Pipeline(["rtn"])(Pipeline(["weight_compander"])(gm))
    packed = Pipeline(["weight_norm", "fold_reparam", get("rtn", bits=8, group_size=-1)])(gm)
    assert set(graph_kinds(packed.graph)) == {"quant"}


def test_nothing_to_fold_and_a_stray_annotation() -> None:
    pipeline = Pipeline(["fold_reparam"])
    pipeline(lowbit.trace(_vit(), (X,)))
    assert pipeline.report.passes[0].stats == {"folded": 0}
    gm = lowbit.trace(_vit(), (X,))
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "head")
    annotate(node, "head", reparam=Reparam("weight_norm"))
    with pytest.raises(ReparamError, match="layer 'head' is annotated 'weight_norm' but carries no reparameterization"):
        Pipeline(["fold_reparam"])(gm)
