"""The oracle: lowbit's adapters compute what HF PEFT computes, before and after merging.

PEFT 0.21 names: ``LoraConfig`` (LoRA, rsLoRA, PiSSA init) and ``MissConfig`` — whose
default mode is today's Bone ("balance", lowbit's ``variant="balance"``) and whose
``init_weights="bat"`` is the original Bone, now Bat (lowbit's ``variant="bat"``).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import lowbit  # noqa: E402
from lowbit.passes import Pipeline, get  # noqa: E402
from lowbit.passes.adapters import Bone, LoRA, import_peft_lora  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = ["query", "value", "out"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(36, 24)
        self.value = nn.Linear(36, 24)
        self.out = nn.Linear(24, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.query(x)) * self.value(x))


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(3, 5, 36)
    return model, lowbit.trace(model, (x,)), x


def peft_layer(peft_model: nn.Module, path: str) -> nn.Module:
    return peft_model.base_model.model.get_submodule(path)


def check_same(peft_model: nn.Module, gm: fx.GraphModule, x: torch.Tensor) -> None:
    expected = peft_model(x)
    got = gm(x)
    torch.testing.assert_close(got, expected, **TOL)
    merged = Pipeline([get("merge_adapters")])(gm)
    peft_model.merge_adapter()
    torch.testing.assert_close(merged(x), peft_model(x), **TOL)
    torch.testing.assert_close(merged(x), expected, **TOL)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(setup, rslora: bool) -> None:
    model, gm, x = setup
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS, use_rslora=rslora)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config).eval()
    ours = Pipeline([LoRA(rank=4, alpha=12, rslora=rslora, targets=tuple(TARGETS))])(gm)
    with torch.no_grad():
        for path in TARGETS:
            layer = peft_layer(peft_model, path)
            a, b = 0.1 * torch.randn(4, layer.in_features), 0.1 * torch.randn(layer.out_features, 4)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            ours.get_submodule(f"{path}.lora").A.copy_(a)
            ours.get_submodule(f"{path}.lora").B.copy_(b)
    check_same(peft_model, ours, x)


def test_pissa_init_matches_peft(setup) -> None:
    model, gm, x = setup
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    peft_model = peft.get_peft_model(copy.deepcopy(model), config).eval()
    ours = Pipeline([LoRA(rank=4, alpha=8, init="pissa", targets=tuple(TARGETS))])(gm)
    for path in TARGETS:
        layer = peft_layer(peft_model, path)
        torch.testing.assert_close(ours.get_submodule(f"{path}.lora").A, layer.lora_A["default"].weight, **TOL)
        torch.testing.assert_close(ours.get_submodule(f"{path}.lora").B, layer.lora_B["default"].weight, **TOL)
        torch.testing.assert_close(ours.get_submodule(path).weight, layer.base_layer.weight, **TOL)
    check_same(peft_model, ours, x)


@pytest.mark.parametrize(
    ("variant", "init_weights", "param", "shape"),
    [
        ("balance", True, "D", lambda layer, r: (r, layer.out_features)),
        ("bat", "bat", "B", lambda layer, r: (layer.out_features // r, r, r)),
    ],
)
def test_bone_matches_peft_miss(setup, variant: str, init_weights, param: str, shape) -> None:
    model, gm, x = setup
    rank = 4 if variant == "bat" else 5  # 36 % 5 != 0 exercises the partial last block of "balance"
    config = peft.MissConfig(r=rank, target_modules=TARGETS, init_weights=init_weights)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config).eval()
    ours = Pipeline([Bone(rank=rank, variant=variant, targets=tuple(TARGETS))])(gm)
    torch.testing.assert_close(ours(x), peft_model(x), **TOL)
    with torch.no_grad():
        for path in TARGETS:
            layer = peft_layer(peft_model, path)
            block = 0.1 * torch.randn(shape(layer, rank))
            assert layer.miss_block["default"].shape == block.shape
            layer.miss_block["default"].copy_(block)
            getattr(ours.get_submodule(f"{path}.bone"), param).copy_(block)
    check_same(peft_model, ours, x)


def test_import_peft_lora_directory(setup, tmp_path) -> None:
    model, gm, x = setup
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, alpha_pattern={"out": 2}, rank_pattern={"out": 2}
    )
    peft_model = peft.get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for path in TARGETS:
            peft_layer(peft_model, path).lora_B["default"].weight.normal_(std=0.1)
    peft_model.save_pretrained(tmp_path)
    imported = import_peft_lora(gm, tmp_path)
    assert imported.get_submodule("out.lora").rank == 2 and imported.get_submodule("out.lora").scale == 1.0
    assert {n for n, p in imported.named_parameters() if p.requires_grad} == {
        f"{path}.lora.{m}" for path in TARGETS for m in "AB"
    }
    check_same(peft_model, imported, x)
