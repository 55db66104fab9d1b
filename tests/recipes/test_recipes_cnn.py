"""The int8-activation recipes on torchvision's ResNet-18: every convolution is packed, and the stem convolution and
the classifier get the precision the recipe gives them by position."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import recipes, zoo
from lowbit.ir import ops, ops_a8, ops_conv
from lowbit.passes import Pipeline

CONVS = 20  # torchvision ResNet-18: the stem, 16 in the basic blocks, 3 downsampling 1x1 convolutions


@pytest.fixture(scope="module")
def resnet() -> tuple:
    entry = zoo.build("resnet18")
    model = entry.model.eval()
    x = entry.example_inputs[0]
    generator = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(x.shape, generator=generator),) for _ in range(2)]
    return model, lowbit.trace(model, (x,)), (x,), calibration


def _run(name: str, resnet: tuple) -> tuple:
    model, gm, example, calibration = resnet
    pipeline = Pipeline(recipes.load(name).build("convert"))
    out = pipeline(gm, calibration=calibration, example_inputs=example)
    counts = {op: sum(n.target is op for n in out.graph.nodes) for op in _OPS}
    folded = pipeline.report.passes[0]
    assert folded.name == "fold_batchnorm" and folded.stats == {"folded": CONVS}  # a BatchNorm after every conv
    records = {r.layer: r for r in pipeline.report.passes[1].layers}
    return out, counts, records


_OPS = (ops.linear_packed, ops_a8.linear_packed_a8, ops_conv.conv_packed, ops_conv.conv_packed_a8)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "w2a8", "w1.58a8"])
def test_every_target_of_an_int8_recipe_quantizes_convs_alike(scheme: str) -> None:
    built = [recipes.load(f"{scheme}-{target}").build("convert") for target in ("x86", "arm", "cuda")]
    assert len({repr(passes) for passes in built}) == 1
    weights = built[0][1]
    assert weights.pattern == "nn.Linear, nn.Conv1d, nn.Conv2d"
    if scheme != "w8a8":
        assert {key for key, _ in weights.overrides.rules} == {"@first:conv", "@last:linear"}


def test_w8a8_packs_every_conv_with_int8_activations(resnet: tuple) -> None:
    out, counts, records = _run("w8a8-x86", resnet)
    assert counts[ops_conv.conv_packed_a8] == CONVS and counts[ops_a8.linear_packed_a8] == 1
    assert records["conv1"].stats["bits"] == 8 and records["fc"].stats["bits"] == 8
    model, _, example, _ = resnet
    with torch.no_grad():
        reference, y = model(*example), out(*example)
    assert float((y - reference).norm() / reference.norm()) < 0.1


def test_w1_58a8_keeps_the_stem_and_classifier_in_floating_point(resnet: tuple) -> None:
    out, counts, records = _run("w1.58a8-x86", resnet)
    assert counts[ops_conv.conv_packed_a8] == CONVS - 1 and counts[ops_a8.linear_packed_a8] == 0
    assert records["conv1"].action == records["fc"].action == "skipped"
    assert records["layer1.0.conv1"].stats["bits"] == 2
    assert isinstance(out.conv1, torch.nn.Conv2d) and isinstance(out.fc, torch.nn.Linear)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "bits"), [("w4a8-x86", 4), ("w2a8-x86", 2)])
def test_gptq_recipes_keep_the_stem_and_classifier_at_8_bits(resnet: tuple, name: str, bits: int) -> None:
    _, counts, records = _run(name, resnet)
    assert counts[ops_conv.conv_packed_a8] == CONVS and counts[ops_a8.linear_packed_a8] == 1
    assert (records["conv1"].stats["bits"], records["conv1"].stats["group_size"]) == (8, 3 * 7 * 7)
    assert (records["fc"].stats["bits"], records["fc"].stats["group_size"]) == (8, 512)
    assert records["layer1.0.conv1"].stats["bits"] == bits
