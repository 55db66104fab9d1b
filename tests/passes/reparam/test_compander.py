"""weight_compander: exact inverse init, conv/linear only, weight-decay placement, Adam rescaling, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import PassConfigError
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.registry import get
from lowbit.passes.reparam import (
    CompanderInitError,
    CompanderStepRescaling,
    compander_decay_penalty,
    compander_param_groups,
)
from lowbit.passes.reparam.weight_compander import companders

X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)).eval()


def _companded(**options: object) -> tuple[nn.Module, torch.fx.GraphModule]:
    model = _net()
    return model, Pipeline([get("weight_compander", **options)])(lowbit.trace(model, (X,)))


@pytest.mark.parametrize("learnable", [False, True])
def test_exact_inverse_init_on_conv_and_linear_only(learnable: bool) -> None:
    model, gm = _companded(a=0.7, b=0.6, learnable=learnable)
    torch.testing.assert_close(gm(X), model(X), rtol=1e-6, atol=1e-6)
    companded = {id(layer) for layer, _ in companders(gm)}
    assert {name for name, m in gm.named_modules() if id(m) in companded} == {"0", "4"}  # not BatchNorm
    conv = gm.get_submodule("0")
    v = conv.parametrizations.weight.original
    torch.testing.assert_close(v, 0.6 * torch.tan(model[0].weight / 0.7), rtol=1e-5, atol=1e-6)
    assert isinstance(conv.bias, nn.Parameter) and "bias" not in dict(conv.parametrizations)


def test_learnable_a_b_are_per_layer_positive_and_trained() -> None:
    _, gm = _companded(learnable=True)
    pairs = [c for _, c in companders(gm)]
    assert len(pairs) == 2 and pairs[0].raw_a is not pairs[1].raw_a
    torch.testing.assert_close(pairs[0].a, torch.tensor(0.5))
    gm.train()
    gm(X).square().mean().backward()
    assert all(c.raw_a.grad is not None and c.raw_b.grad is not None for c in pairs)
    with torch.no_grad():
        pairs[0].raw_a.fill_(-30.0)
    assert pairs[0].a > 0


def test_weight_decay_placement() -> None:
    _, fixed = _companded(learnable=False)
    v = [layer.parametrizations.weight.original for layer, _ in companders(fixed)]
    decay, no_decay = compander_param_groups(fixed, 0.1)
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in v} and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == len(list(fixed.parameters())) - 2
    # The fixed variant decays w = Ψ(v): d/dw of the penalty is λ·w, so d/dv is λ·w·Ψ'(v).
    penalty = compander_decay_penalty(fixed, 0.1)
    penalty.backward()
    layer, compander = next(companders(fixed))
    expected = 0.1 * layer.weight.detach() * compander.derivative(layer.parametrizations.weight.original.detach())
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, expected)

    _, learnable = _companded(learnable=True)
    decay, no_decay = compander_param_groups(learnable, 0.1)
    ab = {id(p) for _, c in companders(learnable) for p in (c.raw_a, c.raw_b)}
    assert {id(p) for p in no_decay["params"]} == ab
    assert float(compander_decay_penalty(learnable, 0.1)) == 0.0


def test_adam_step_rescaling_uses_the_weight_gradient_and_scales_the_step() -> None:
    _, gm = _companded()
    layer, compander = next(companders(gm))
    v = layer.parametrizations.weight.original
    before = v.detach().clone()
    optimizer = torch.optim.Adam([v], lr=1e-2)
    rescale = CompanderStepRescaling(gm, optimizer)
    gm(X).square().mean().backward()
    grad_w = v.grad / compander.derivative(before)
    optimizer.step()
    reference = before.clone().requires_grad_(True)
    reference.grad = grad_w.clone()
    torch.optim.Adam([reference], lr=1e-2).step()
    torch.testing.assert_close(v.detach(), before + (reference.detach() - before) * compander.derivative(before))
    rescale.remove()


@pytest.mark.parametrize("key, value", [("a", 0.0), ("a", -1.0), ("b", 0.0), ("b", -0.5)])
def test_a_or_b_not_positive_is_a_config_error(key: str, value: float) -> None:
    with pytest.raises(PassConfigError, match=f"{key}={value!r} is out of range; it must be > 0"):
        get("weight_compander", **{key: value})


def test_weight_outside_the_range_of_psi_names_the_layer() -> None:
    model = _net()
    with torch.no_grad():
        model[4].weight[0, 0] = 0.5 * math.pi / 2
    with pytest.raises(CompanderInitError, match="layer '4'.*a·π/2"):
        Pipeline([get("weight_compander", a=0.5)])(lowbit.trace(model, (X,)))
