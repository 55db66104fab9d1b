"""CGA: which weights are frozen, that they are restored after the optimizer step, and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import PassConfigError
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.registry import get
from lowbit.passes.reparam import CGA, ReparamError, frozen_mask


def test_only_weights_near_a_rounding_boundary_stay_unfrozen() -> None:
    # One row with s = 2·mean|w| = 1: z = w·2 − 0.5 at 2 bits, boundaries at z = −1.5, −0.5, 0.5.
    z = torch.tensor([-2.5, -1.503, -1.4, -0.5, 0.0, 0.4985, 1.0, 1.5])
    w = (z + 0.5) / 2
    w = w / (2 * w.abs().mean())  # normalize so that s = 1 exactly
    mask = frozen_mask(w.unsqueeze(0), 2, boundary_range=0.005)
    z_actual = w.clamp(-1, 1 - 1e-6) * 2 - 0.5
    expected = [not any(abs(float(v) - b) <= 0.005 for b in (-1.5, -0.5, 0.5)) for v in z_actual]
    assert mask.squeeze(0).tolist() == expected
    assert frozen_mask(torch.full((2, 3), 0.1), 2, 0.005).all()  # one level only: nothing is near a boundary


def _trained_graph() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=4, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    x = torch.randn(4, 1, 4, 4)
    gm = Pipeline(["qkr", get("statsq", ignore=("head", "patch_embed.*"))])(lowbit.trace(model.eval(), (x,)))
    return gm.train(), x


def test_frozen_weights_are_restored_after_adamw_and_others_move() -> None:
    gm, x = _trained_graph()
    optimizer = torch.optim.AdamW(gm.parameters(), lr=1e-3, weight_decay=0.1)
    cga = CGA(gm, boundary_range=0.05).attach(optimizer)
    assert sorted(name for name, _, _ in cga.layers) == [
        "blocks.0.attn.proj",
        "blocks.0.attn.v",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    assert "does not change gradients" in cga.skipped["blocks.0.attn.qk"]
    weight = gm.get_submodule("blocks.0.mlp.fc1").parametrizations.weight.original
    for _ in range(2):  # the second step also has Adam momentum to undo
        mask = frozen_mask(weight, 2, 0.05)
        before = weight.detach().clone()
        gm(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.equal(weight[mask], before[mask])
        assert (weight[~mask] != before[~mask]).all()
    assert 0.5 < cga.frozen_fraction["blocks.0.mlp.fc1"] < 1.0
    cga.remove()
    before = weight.detach().clone()
    gm(x).square().mean().backward()
    optimizer.step()
    assert (weight != before).float().mean() > 0.9


def test_bad_inputs() -> None:
    gm, _ = _trained_graph()
    with pytest.raises(PassConfigError, match="boundary_range=0.5"):
        CGA(gm, boundary_range=0.5)
    with pytest.raises(ReparamError, match="no StatsQ-quantized weight"):
        CGA(nn.Linear(2, 2))
    with pytest.raises(ReparamError, match="does not update blocks.0.attn.proj"):
        CGA(gm, targets=("*.proj",)).attach(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
