"""The ``lora`` pass: forward formula, PEFT's inits, PiSSA split, packed (QLoRA) base, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import lowbit
from lowbit.errors import LowbitError, PassConfigError, PassOrderError
from lowbit.ir import ops
from lowbit.ir.annotations import get_meta
from lowbit.passes import Pipeline, get
from lowbit.passes.adapters import AdapterError, LoRA, LoRAModule


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(24, 16)
        self.value = nn.Linear(24, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.query(x)) * self.value(x))


@pytest.fixture()
def model() -> tuple[nn.Module, fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    module = Block()
    x = torch.randn(5, 24)
    return module, lowbit.trace(module, (x,)), x


def lora_of(gm: fx.GraphModule, path: str) -> LoRAModule:
    return gm.get_submodule(f"{path}.lora")


def test_registered_and_identity_at_init(model) -> None:
    module, gm, x = model
    assert isinstance(get("lora"), LoRA)
    adapted = Pipeline([LoRA(rank=4, alpha=8, targets=("query", "value"))])(gm)
    assert torch.equal(adapted(x), module(x))
    meta = get_meta(next(n for n in adapted.graph.nodes if n.target == "query"))
    assert meta.adapter.describe() == "lora[kaiming] r4"
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == {
        "query.lora.A",
        "query.lora.B",
        "value.lora.A",
        "value.lora.B",
    }


def test_forward_is_the_lora_formula(model) -> None:
    module, gm, x = model
    adapted = Pipeline([LoRA(rank=4, alpha=6, targets=("out",), dropout=0.0)])(gm)
    adapter = lora_of(adapted, "out")
    with torch.no_grad():
        adapter.B.normal_()
    hidden = torch.relu(module.query(x)) * module.value(x)
    expected = module.out(hidden) + (6 / 4) * hidden @ adapter.A.T @ adapter.B.T
    torch.testing.assert_close(adapted(x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scale(model) -> None:
    _, gm, _ = model
    adapted = Pipeline([LoRA(rank=4, alpha=6, rslora=True)])(gm)
    assert lora_of(adapted, "out").scale == pytest.approx(6 / math.sqrt(4))


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_inits_follow_peft(model, init: str) -> None:
    _, gm, _ = model
    torch.manual_seed(1)
    adapted = Pipeline([LoRA(rank=4, init=init)])(gm)
    adapter = lora_of(adapted, "query")
    assert torch.count_nonzero(adapter.B) == 0
    torch.manual_seed(1)
    expected = torch.empty(4, 24)
    if init == "kaiming":
        nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
        assert adapter.A.abs().max() <= 1 / math.sqrt(24)
    else:
        nn.init.normal_(expected, std=1 / 4)
    assert torch.equal(adapter.A, expected)


def test_pissa_split(model) -> None:
    module, gm, x = model
    adapted = Pipeline([LoRA(rank=4, alpha=2, init="pissa", targets=("query",))])(gm)
    adapter = lora_of(adapted, "query")
    w = module.query.weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    residual = adapted.get_submodule("query").weight
    tail = u[:, 4:] @ torch.diag(s[4:]) @ vh[4:]
    torch.testing.assert_close(residual, tail, rtol=0, atol=1e-5)
    torch.testing.assert_close(0.5 * adapter.B @ adapter.A, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], rtol=0, atol=1e-5)
    torch.testing.assert_close(adapted(x), module(x), rtol=1e-5, atol=1e-5)


def packed(gm: fx.GraphModule) -> fx.GraphModule:
    return Pipeline([get("rtn", bits=4, group_size=8)])(gm)


def test_qlora_keeps_the_packed_base_and_trains(model) -> None:
    _, gm, x = model
    quantized = packed(gm)
    adapted = Pipeline([LoRA(rank=4, init="gaussian")])(quantized)
    packed_nodes = [n for n in adapted.graph.nodes if n.target is ops.linear_packed]
    assert len(packed_nodes) == 3
    assert all(get_meta(n).quant is not None and get_meta(n).adapter is not None for n in packed_nodes)
    torch.testing.assert_close(adapted(x), quantized(x))
    buffers = {k: v.clone() for k, v in adapted.named_buffers()}
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.05)
    target = torch.randn(5, 8)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(adapted(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, buffers[k]) for k, v in adapted.named_buffers())
    assert lora_of(adapted, "query").A.grad is not None  # gradient flowed through the packed "out" layer


def test_pissa_on_a_packed_base_is_refused(model) -> None:
    _, gm, _ = model
    with pytest.raises(AdapterError, match="'query' is packed"):
        Pipeline([LoRA(rank=4, init="pissa")])(packed(gm))


def test_quantizing_an_adapted_graph_needs_a_merge(model) -> None:
    _, gm, _ = model
    with pytest.raises(PassOrderError, match="merge_adapters"):
        Pipeline([LoRA(rank=4), get("rtn")])
    Pipeline([LoRA(rank=4), get("merge_adapters"), get("rtn", group_size=8)])(gm)


def test_bad_inputs(model) -> None:
    _, gm, _ = model
    with pytest.raises(AdapterError, match=r"rank 17 is larger than min\(in, out\) = 16 of layer 'query'"):
        Pipeline([LoRA(rank=17, targets=("query",))])(gm)
    with pytest.raises(AdapterError, match="target 'qurey' matches no linear layer; close layer names: query"):
        Pipeline([LoRA(targets=("qurey",))])(gm)
    with pytest.raises(AdapterError, match="'query' already carries an adapter"):
        Pipeline([LoRA(targets=("query",)), LoRA(targets=("query",))])(gm)
    with pytest.raises(PassConfigError, match="init='pissa' needs dropout=0"):
        LoRA(init="pissa", dropout=0.1)
    with pytest.raises(PassConfigError, match="init="):
        LoRA(init="olora")
    with pytest.raises(PassConfigError, match="rank"):
        LoRA(rank=0)
    assert issubclass(AdapterError, LowbitError)


def test_targets_ignore_overrides_and_trainable(model) -> None:
    _, gm, _ = model
    adapted = Pipeline(
        [
            LoRA(
                rank=2,
                targets=("re:(query|value)",),
                ignore=("value",),
                trainable=("out",),
                overrides={"query": {"rank": 3}},
            )
        ]
    )(gm)
    assert lora_of(adapted, "query").rank == 3
    assert not hasattr(adapted.get_submodule("value"), "lora")
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == {
        "query.lora.A",
        "query.lora.B",
        "out.weight",
        "out.bias",
    }


def test_bf16_base_keeps_float32_adapters(model) -> None:
    module, _, x = model
    half = lowbit.trace(module.to(torch.bfloat16), (x.to(torch.bfloat16),))
    adapted = Pipeline([LoRA(rank=4, init="gaussian")])(half)
    with torch.no_grad():
        lora_of(adapted, "out").B.normal_()
    assert lora_of(adapted, "out").A.dtype == torch.float32
    y = adapted(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    merged = Pipeline([get("merge_adapters")])(adapted)
    assert merged.get_submodule("out").weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged(x.to(torch.bfloat16)), y, atol=0.1, rtol=0.05)
