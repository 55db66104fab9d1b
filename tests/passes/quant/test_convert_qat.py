"""convert_qat: the packed graph computes exactly what the trained fake-quant graph computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import PassOrderError
from lowbit.ir import ops
from lowbit.ir.annotations import graph_kinds
from lowbit.passes.base import PassContext
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.registry import get

from helpers import seeded_mlp


def _mlp() -> nn.Module:
    return seeded_mlp(40, 24, 6, act=nn.GELU)


def _train(gm: torch.fx.GraphModule, x: torch.Tensor, steps: int = 5) -> None:
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        gm(x).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "options",
    [
        {"format": "int", "bits": 4, "group_size": 16},
        {"format": "int", "bits": 3, "group_size": -1, "symmetric": False},
        {"format": "int", "bits": 2, "group_size": 16, "scale": "lsq"},
        {"format": "int", "bits": 8, "group_size": 16, "scale": "lsq"},
        {"format": "ternary"},
        {"format": "binary"},
        {"format": "binary", "scale": "fixed", "latent_clip": 0.25},
    ],
)
def test_convert_equals_fake_quant_forward(options: dict) -> None:
    x = torch.randn(8, 40)
    gm = Pipeline([get("fake_quant", **options)])(lowbit.trace(_mlp(), (x,)))
    _train(gm, x)
    gm.eval()
    with torch.no_grad():
        expected = gm(x)
    pipeline = Pipeline(["convert_qat"])
    packed = pipeline(gm)
    assert graph_kinds(packed.graph) == {"quant": ["0", "2"]}
    assert sum(n.target is ops.linear_packed for n in packed.graph.nodes) == 2
    assert torch.equal(packed(x), expected)
    assert pipeline.report.passes[0].stats["quantized"] == 2


def test_convert_handles_statsq_and_mixed_layers() -> None:
    x = torch.randn(8, 40)
    gm = Pipeline([get("statsq", bits=2, ignore=("2",))])(lowbit.trace(_mlp(), (x,)))
    with torch.no_grad():
        expected = gm(x)
    pipeline = Pipeline(["convert_qat"])
    packed = pipeline(gm)
    assert graph_kinds(packed.graph) == {"quant": ["0"]}
    torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-6)
    assert [(r.layer, r.action) for r in pipeline.report.passes[0].layers] == [("0", "quantized")]


def test_prepare_then_compile_through_the_pipeline_order() -> None:
    x = torch.randn(8, 40)
    gm = Pipeline([get("fake_quant", bits=4, group_size=8), "convert_qat"])(lowbit.trace(_mlp(), (x,)))
    assert graph_kinds(gm.graph) == {"quant": ["0", "2"]}
    with pytest.raises(PassOrderError, match="convert_qat"):
        Pipeline(["fake_quant", "rtn"])


def test_skip_override_and_graph_without_fake_quant() -> None:
    x = torch.randn(8, 40)
    gm = Pipeline(["fake_quant"])(lowbit.trace(_mlp(), (x,)))
    pipeline = Pipeline([get("convert_qat", overrides={"2": "skip"})])
    packed = pipeline(gm)
    assert [r.action for r in pipeline.report.passes[0].layers] == ["quantized", "skipped"]
    assert graph_kinds(packed.graph) == {"quant": ["0"], "fake_quant": ["2"]}
    plain = lowbit.trace(_mlp(), (x,))
    result = get("convert_qat").run(plain, PassContext())
    assert not result.changed and result.stats == {"quantized": 0, "skipped": 0}
