"""timm ViTs through TVM on x86: traced as they are (optional ``attn_mask=None``, ``torch._assert`` in the patch
embedding), exact in fp32 with either tracer, and as accurate at w8a8 as the torch target."""

from __future__ import annotations

import pytest
import timm
import torch

import lowbit
from lowbit.ir.trace import trace


def vit(name: str = "vit_small_patch16_224") -> torch.nn.Module:
    """A two-block ViT with timm's random initialization."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, depth=2).eval()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_vit_fp32_matches_eager(tracer: str) -> None:
    model, x = vit(), torch.randn(1, 3, 224, 224)
    compiled = lowbit.compile(trace(model, (x,), tracer=tracer), (x,), target="x86", passes=[])
    assert compiled.report.tracer == tracer
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 1e-4


def test_deit_compiles_with_the_default_tracer() -> None:
    model, x = vit("deit_tiny_patch16_224"), torch.randn(1, 3, 224, 224)
    compiled = lowbit.compile(model, (x,), target="x86", passes=[])
    assert compiled.report.tracer == "fx"
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 1e-4


def test_vit_w8a8_is_as_accurate_as_the_torch_target() -> None:
    model, x = vit(), torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        eager = model(x)
        errors = {
            target: relative_error(lowbit.compile(model, (x,), target=target, recipe="w8a8-x86")(x), eager)
            for target in ("torch", "x86")
        }
    assert errors["x86"] < 1.25 * errors["torch"] < 0.05
