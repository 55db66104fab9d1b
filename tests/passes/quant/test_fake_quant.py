"""fake_quant: STE gradients (clipped vs identity), LSQ step gradient scale, BinaryConnect clip, QAT training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import PassConfigError, PassOrderError
from lowbit.ir.annotations import graph_kinds
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.quant import WeightFakeQuant, attach_latent_clip, clip_latent_weights, quantize_weight
from lowbit.passes.quant.qat import fake_quantizer_of, straight_through
from lowbit.passes.registry import get

from helpers import seeded_mlp


def _mlp(hidden: int = 32) -> nn.Module:
    return seeded_mlp(64, hidden, 10)


def _quantizer(w: torch.Tensor, **kw) -> WeightFakeQuant:
    args = {
        "fmt": "int",
        "bits": 4,
        "group_size": 16,
        "symmetric": True,
        "scale": "stat",
        "latent_clip": 1.0,
        "name": "layer",
    } | kw
    return WeightFakeQuant(w, **args)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int_forward_is_the_rtn_grid_and_gradient_is_clipped(symmetric: bool) -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    q = _quantizer(w, symmetric=symmetric)
    out = q(w)
    assert torch.equal(out, quantize_weight(w.detach(), 4, 16, symmetric).dequantize())
    upstream = torch.randn(8, 32)
    (out * upstream).sum().backward()
    qw = q.quantized(w)
    scale = qw.scales.repeat_interleave(16, dim=1)
    zero = 8.0 if qw.zeros is None else qw.zeros.repeat_interleave(16, dim=1)
    raw = torch.round(w.detach() / scale) + zero
    inside = (raw >= 0) & (raw <= 15)
    torch.testing.assert_close(w.grad, upstream * inside)
    if symmetric:  # the largest positive weight of a symmetric group rounds past 2^b − 1: its gradient is clipped
        assert not inside.all()


def test_clipped_ste_masks_values_outside_the_grid() -> None:
    w = torch.tensor([-3.0, -0.5, 0.2, 4.0], requires_grad=True)
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    straight_through(w, w.detach().clamp(-1, 1), mask).sum().backward()
    assert torch.equal(w.grad, mask)


@pytest.mark.parametrize("fmt", ["ternary", "binary"])
def test_ternary_and_binary_use_identity_ste(fmt: str) -> None:
    w = (torch.randn(6, 20) * 3).requires_grad_(True)
    q = _quantizer(w, fmt=fmt)
    out = q(w)
    levels = out / q.quantized(w).dequantize().abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    assert set(levels.round(decimals=5).unique().tolist()) <= {-1.0, 0.0, 1.0}
    if fmt == "ternary":  # BitNet absmean: γ = mean|W| per tensor
        gamma = w.detach().abs().mean()
        assert torch.equal(out, gamma * torch.clamp(torch.round(w.detach() / gamma), -1, 1))
    else:  # sign₊ never yields 0
        assert (out != 0).all()
    upstream = torch.randn(6, 20)
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_binary_zero_weight_is_positive() -> None:
    w = torch.tensor([[0.0, -0.0, -1.0, 1.0]])
    out = _quantizer(w, fmt="binary", scale="fixed", latent_clip=1.0)(w)
    assert out.tolist() == [[1.0, 1.0, -1.0, 1.0]]


def test_lsq_step_gradient_has_the_lsq_formula_and_scale() -> None:
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    bits, group = 3, 16
    q = _quantizer(w, bits=bits, group_size=group, scale="lsq")
    qn, qp = 4, 3
    step0 = q.step.detach().clone()
    expected_init = 2 * w.detach().abs().reshape(4, 2, group).mean(-1) / math.sqrt(qp)
    torch.testing.assert_close(step0, expected_init)
    out = q(w)
    out.sum().backward()
    s = step0.repeat_interleave(group, dim=1)
    v = w.detach() / s
    dvds = torch.where(
        v < -qn, torch.tensor(-qn * 1.0), torch.where(v > qp, torch.tensor(qp * 1.0), -v + torch.round(v))
    )
    g = 1 / math.sqrt(group * qp)
    torch.testing.assert_close(q.step.grad, g * dvds.reshape(4, 2, group).sum(-1))
    torch.testing.assert_close(w.grad, ((v >= -qn) & (v <= qp)).float())


def test_binaryconnect_clip_keeps_latent_weights_in_range() -> None:
    x = torch.randn(16, 64)
    gm = Pipeline([get("fake_quant", format="binary", latent_clip=0.5)])(lowbit.trace(_mlp(), (x,)))
    latent = [m.parametrizations.weight.original for m in gm.modules() if fake_quantizer_of(m) is not None]
    assert len(latent) == 2 and all(p.abs().max() <= 0.5 for p in latent)
    optimizer = torch.optim.SGD(gm.parameters(), lr=10.0)
    detach = attach_latent_clip(optimizer, gm)
    for _ in range(3):
        optimizer.zero_grad()
        gm(x).pow(2).sum().backward()
        optimizer.step()
    assert all(p.abs().max() <= 0.5 for p in latent)
    assert any((p.abs() == 0.5).any() for p in latent)  # the huge LR pushed some weights onto the bound
    detach()
    with torch.no_grad():
        latent[0].add_(3.0)
    assert clip_latent_weights(gm) == 2 and latent[0].max() <= 0.5


@pytest.mark.parametrize(
    "options",
    [
        {"format": "int", "bits": 4, "group_size": 16},
        {"format": "int", "bits": 4, "group_size": 16, "scale": "lsq"},
        {"format": "ternary"},
    ],
)
def test_qat_trains_on_digits(options: dict) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:500], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:500])
    pipeline = Pipeline([get("fake_quant", **options)])
    gm = pipeline(lowbit.trace(_mlp(), (x[:4],)))
    assert graph_kinds(gm.graph) == {"fake_quant": ["0", "2"]}
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        first = float(loss_fn(gm(x), y))
    for _ in range(40):
        optimizer.zero_grad()
        loss = loss_fn(gm(x), y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = float(loss_fn(gm(x), y))
        accuracy = float((gm(x).argmax(1) == y).float().mean())
    assert last < 0.5 * first and accuracy > 0.8


def test_per_layer_overrides_and_ignore() -> None:
    x = torch.randn(4, 64)
    pipeline = Pipeline([get("fake_quant", bits=4, overrides={"2": {"format": "ternary"}}, ignore=())])
    gm = pipeline(lowbit.trace(_mlp(), (x,)))
    assert [fake_quantizer_of(gm.get_submodule(p)).format for p in ("0", "2")] == ["int", "ternary"]
    skipped = Pipeline([get("fake_quant", ignore=("2",))])
    gm = skipped(lowbit.trace(_mlp(), (x,)))
    assert fake_quantizer_of(gm.get_submodule("2")) is None
    assert [r.action for r in skipped.report.passes[0].layers] == ["fake_quantized", "skipped"]


def test_bad_options_are_named_errors() -> None:
    with pytest.raises(PassConfigError, match="bits"):
        get("fake_quant", bits=5)
    with pytest.raises(PassConfigError, match="format"):
        get("fake_quant", format="int5")
    with pytest.raises(PassConfigError, match="lsq"):
        get("fake_quant", format="ternary", scale="lsq")
    with pytest.raises(PassConfigError, match="lsq"):
        get("fake_quant", symmetric=False, scale="lsq")
    with pytest.raises(PassConfigError, match="fixed"):
        get("fake_quant", scale="fixed")
    with pytest.raises(PassConfigError, match="group_size"):
        get("fake_quant", group_size=0)


def test_ordering_refuses_packed_or_masked_graphs() -> None:
    with pytest.raises(PassOrderError, match="apply_masks"):
        Pipeline(["prune_magnitude", "fake_quant"])
    with pytest.raises(PassOrderError):
        Pipeline(["rtn", "fake_quant"])
