"""The ``bone`` pass in both forms: ``balance`` (today's Bone / MiSS) and ``bat`` (the original W·B + B)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.errors import PassConfigError
from lowbit.ir.annotations import get_meta
from lowbit.passes import Pipeline, get
from lowbit.passes.adapters import AdapterError, Bone


@pytest.fixture()
def model():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(30, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(2, 3, 30)
    return module, lowbit.trace(module, (x,)), x


def test_balance_adds_the_tiled_block(model) -> None:
    module, gm, x = model
    adapted = Pipeline([Bone(rank=4, targets=("0",))])(gm)
    assert get_meta(next(n for n in adapted.graph.nodes if n.target == "0")).adapter.describe() == "bone[balance] r4"
    torch.testing.assert_close(adapted(x), module(x))
    bone = adapted.get_submodule("0.bone")
    assert bone.D.shape == (4, 16)
    with torch.no_grad():
        bone.D.normal_()
    # W'[p, c·r + q] = W[p, c·r + q] + D[q, p]; 30 = 7·4 + 2, the last block uses D[:2].
    w = module[0].weight.detach().clone()
    for col in range(30):
        w[:, col] += bone.D[col % 4]
    expected = module[2](module[1](nn.functional.linear(x, w, module[0].bias)))
    torch.testing.assert_close(adapted(x), expected, atol=1e-5, rtol=1e-5)


def test_bat_is_block_affine(model) -> None:
    module, gm, x = model
    adapted = Pipeline([Bone(rank=4, variant="bat", targets=("2",))])(gm)
    bone = adapted.get_submodule("2.bone")
    assert bone.B.shape == (2, 4, 4)
    torch.testing.assert_close(adapted(x), module(x))
    with torch.no_grad():
        bone.B.normal_(std=0.3)
    w = module[2].weight.detach()
    merged = torch.empty_like(w)
    for a in range(2):
        for c in range(4):
            block = w[a * 4 : (a + 1) * 4, c * 4 : (c + 1) * 4]
            merged[a * 4 : (a + 1) * 4, c * 4 : (c + 1) * 4] = block @ (torch.eye(4) + bone.B[a]) + bone.B[a]
    expected = nn.functional.linear(module[1](module[0](x)), merged, module[2].bias)
    torch.testing.assert_close(adapted(x), expected, atol=1e-5, rtol=1e-5)
    # the weight feeds the branch; it stays frozen
    assert not adapted.get_submodule("2").weight.requires_grad
    loss = adapted(x).square().mean()
    loss.backward()
    assert bone.B.grad is not None and adapted.get_submodule("2").weight.grad is None


def test_balance_on_a_packed_base(model) -> None:
    _, gm, x = model
    quantized = Pipeline([get("rtn", bits=4, group_size=8)])(gm)
    adapted = Pipeline([Bone(rank=4)])(quantized)
    torch.testing.assert_close(adapted(x), quantized(x))
    with pytest.raises(AdapterError, match="'0' is packed"):
        Pipeline([Bone(rank=4, variant="bat", targets=("0",))])(quantized)


def test_bad_inputs(model) -> None:
    _, gm, _ = model
    with pytest.raises(AdapterError, match="variant 'bat' needs rank 4 to divide both sides of layer '0'"):
        Pipeline([Bone(rank=4, variant="bat", targets=("0",))])(gm)
    with pytest.raises(AdapterError, match=r"rank 9 is larger than min\(in, out\) = 8 of layer '2'"):
        Pipeline([Bone(rank=9)])(gm)
    with pytest.raises(PassConfigError, match="variant='block'"):
        Bone(variant="block")
    with pytest.raises(PassConfigError, match="no dropout"):
        Bone(variant="bat", dropout=0.1)
