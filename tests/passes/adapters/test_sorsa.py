"""The ``sorsa`` pass: SVD split, forward, merge, and the orthonormal regularizer with the authors' scaling."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.errors import PassOrderError
from lowbit.passes import Pipeline, get
from lowbit.passes.adapters import SORSA, AdapterError, orthonormal_loss, orthonormal_regularizer
from lowbit.passes.adapters.sorsa import GAMMA


def authors_layer_module():
    """``sorsa/layer.py`` of the authors' package, loaded alone: the package's ``__init__``
    imports its trainer, which needs an API transformers 5 removed."""
    spec = importlib.util.find_spec("sorsa")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the authors' sorsa package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "layer.py"
    layer_spec = importlib.util.spec_from_file_location("sorsa_authors_layer", path)
    module = importlib.util.module_from_spec(layer_spec)
    layer_spec.loader.exec_module(module)
    return module


@pytest.fixture()
def model():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 6))
    x = torch.randn(7, 20)
    return module, lowbit.trace(module, (x,)), x


def test_split_is_principal_part_plus_svd_tail(model) -> None:
    module, gm, x = model
    adapted = Pipeline([SORSA(rank=3)])(gm)
    sorsa = adapted.get_submodule("0.sorsa")
    w = module[0].weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(sorsa.S, s[:3])
    torch.testing.assert_close((sorsa.B * sorsa.S) @ sorsa.A, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        adapted.get_submodule("0").weight, u[:, 3:] @ torch.diag(s[3:]) @ vh[3:], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(adapted(x), module(x), atol=1e-5, rtol=1e-5)
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == {
        f"{i}.sorsa.{p}" for i in (0, 2) for p in "ASB"
    }


def test_alpha_scales_the_principal_part(model) -> None:
    module, gm, x = model
    adapted = Pipeline([SORSA(rank=3, alpha=6.0)])(gm)
    sorsa = adapted.get_submodule("0.sorsa")
    assert sorsa.scale == 2.0
    residual = adapted.get_submodule("0").weight
    torch.testing.assert_close(residual + 2.0 * (sorsa.B * sorsa.S) @ sorsa.A, module[0].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(adapted(x), module(x), atol=1e-5, rtol=1e-5)


def test_regularizer_value_and_scaling(model) -> None:
    _, gm, _ = model
    adapted = Pipeline([SORSA(rank=3)])(gm)
    # SVD factors are orthonormal: the penalty starts at ~0 and its gradient is finite.
    start = orthonormal_loss(adapted)
    assert start.item() < 1e-5
    start.backward()
    assert all(torch.isfinite(p.grad).all() for p in adapted.parameters() if p.grad is not None)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith(("A", "B")):
                p.mul_(2.0)
    modules = [adapted.get_submodule(f"{i}.sorsa") for i in (0, 2)]
    eye = torch.eye(3)
    expected = (
        sum(torch.linalg.matrix_norm(m.A @ m.A.T - eye) + torch.linalg.matrix_norm(m.B.T @ m.B - eye) for m in modules)
        / 4
    )
    torch.testing.assert_close(orthonormal_loss(adapted), expected)
    torch.testing.assert_close(orthonormal_regularizer(adapted, peak_lr=3e-5), GAMMA / 3e-5 * expected)
    assert GAMMA == 4e-4


def test_authors_update_order_trains(model) -> None:
    """Task backward, clip to 1.0, then the unclipped (γ/η_peak)·L_orth backward, then AdamW."""
    module, gm, x = model
    adapted = Pipeline([SORSA(rank=3)])(gm)
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    target = torch.randn(7, 6)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(adapted(x), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        orthonormal_regularizer(adapted, peak_lr=1e-2).backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged = Pipeline([get("merge_adapters")])(adapted)
    torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)


def test_bad_inputs(model) -> None:
    _, gm, _ = model
    with pytest.raises(AdapterError, match="rank 7 is larger than min"):
        Pipeline([SORSA(rank=7)])(gm)
    with pytest.raises(AdapterError, match="no sorsa adapter"):
        orthonormal_loss(gm)
    with pytest.raises(AdapterError, match="peak_lr"):
        orthonormal_regularizer(Pipeline([SORSA(rank=3)])(gm), peak_lr=0)
    with pytest.raises(PassOrderError, match="'sorsa' cannot run after weights are packed"):
        Pipeline([SORSA(rank=3)])(Pipeline([get("rtn", group_size=4)])(gm))


def test_matches_the_authors_layer(model) -> None:
    """The authors' package (``sorsa``): same split, forward, merge and regularizer value."""
    authors = authors_layer_module()
    module, gm, x = model
    adapted = Pipeline([SORSA(rank=3, alpha=6.0, targets=("0",))])(gm)
    layer = authors.Linear(20, 12, r=3, alpha=6.0, bias=True)
    with torch.no_grad():
        layer.weight.copy_(module[0].weight)
        layer.bias.copy_(module[0].bias)
    layer.sorsa_init()
    ours = adapted.get_submodule("0.sorsa")
    for name in "ASB":
        torch.testing.assert_close(getattr(ours, name), getattr(layer, f"sorsa_{name}"), atol=1e-6, rtol=0)
    torch.testing.assert_close(adapted.get_submodule("0").weight, layer.weight, atol=1e-6, rtol=0)
    with torch.no_grad():
        for name in "ASB":
            value = getattr(ours, name) + 0.1 * torch.randn_like(getattr(ours, name))
            getattr(ours, name).copy_(value)
            getattr(layer, f"sorsa_{name}").copy_(value)
    hidden = adapted.get_submodule("0")(x) + ours(x)
    torch.testing.assert_close(hidden, layer(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(orthonormal_loss(adapted), authors.calc_ortho(layer), atol=1e-6, rtol=1e-6)
    merged = Pipeline([get("merge_adapters")])(adapted)
    layer._merge(True)
    torch.testing.assert_close(merged.get_submodule("0").weight, layer.weight, atol=1e-5, rtol=0)
