"""statsq / convert_statsq: OFQ's levels, straight-through gradient, detached scale, exact packing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import PassConfigError, PassOrderError
from lowbit.ir import ops
from lowbit.ir.annotations import graph_kinds
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.registry import get
from lowbit.passes.reparam import StatsQ, statsq_quantize

from helpers import seeded_mlp

LEVELS = {
    2: [-0.75, -0.25, 0.25, 0.75],
    3: [(k + 0.5) / 4 for k in range(-4, 4)],
    4: [(k + 0.5) / 8 for k in range(-8, 8)],
}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_are_offset_by_half_with_no_zero(bits: int) -> None:
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(bits))
    q = statsq_quantize(w, bits)
    s = 2 * w.abs().mean(dim=1, keepdim=True)
    assert set((q / s).flatten().round(decimals=5).unique().tolist()) == set(LEVELS[bits])
    clipped = (w / s).clamp(-1, 1 - 1e-6)
    torch.testing.assert_close(q, s * (torch.round(clipped * 2 ** (bits - 1) - 0.5) + 0.5) / 2 ** (bits - 1))


def test_straight_through_gradient_and_detached_scale() -> None:
    w = (torch.randn(4, 8) * 3).requires_grad_(True)  # some weights far outside the clip range
    upstream = torch.randn(4, 8)
    (StatsQ(2)(w) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream)  # identity everywhere: no clip mask, nothing through s


def _mlp() -> nn.Module:
    return seeded_mlp(12, 24, 5, act=nn.GELU).eval()


def test_convert_packs_exactly_what_qat_computed() -> None:
    x = torch.randn(6, 12)
    pipeline = Pipeline([get("statsq", bits=2, ignore=("2",))])
    gm = pipeline(lowbit.trace(_mlp(), (x,)))
    assert graph_kinds(gm.graph) == {"fake_quant": ["0"]}
    assert [r.action for r in pipeline.report.passes[0].layers] == ["fake_quantized", "skipped"]
    with torch.no_grad():
        expected = gm(x)
    packed = Pipeline(["convert_statsq"])(gm)
    assert graph_kinds(packed.graph) == {"quant": ["0"]}
    assert sum(n.target is ops.linear_packed for n in packed.graph.nodes) == 1
    torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-6)


def test_ordering_and_bad_options() -> None:
    with pytest.raises(PassOrderError, match="fake-quantized.*convert_qat"):
        Pipeline(["statsq", "rtn"])
    with pytest.raises(PassOrderError, match="reparameterizations.*fold_reparam"):
        Pipeline(["qkr", "statsq", "convert_statsq"])
    with pytest.raises(PassConfigError, match="bits=5 is not supported"):
        get("statsq", bits=5)
