"""qkr: finds attention blocks (fused and separate q/k, fx and export graphs), is exact up to the dropped q bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import zoo
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.reparam import QKRLinear


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=4)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias.normal_()
    return model.eval()


X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _qkr(gm: torch.fx.GraphModule, **call: object) -> tuple[torch.fx.GraphModule, list]:
    pipeline = Pipeline(["qkr"])
    out = pipeline(gm, **call)
    return out, pipeline.report.passes[0].layers


def _zero_query_bias(model: nn.Module, layers: list[tuple[nn.Module, slice]]) -> None:
    with torch.no_grad():
        for layer, rows in layers:
            layer.bias[rows].zero_()


def test_fused_qkv_vit_is_exact_up_to_the_dropped_query_bias() -> None:
    model = _vit()
    gm, records = _qkr(lowbit.trace(model, (X,)))
    assert [r.layer for r in records] == ["blocks.0.attn", "blocks.1.attn"]
    stats = records[0].stats
    assert stats["fused"] and not stats["function_preserving"] and stats["dropped_q_bias_max"] > 0
    assert (stats["heads"], stats["head_dim"], stats["qk_params_after"]) == (4, 8, 4 * 32 * 32)
    assert isinstance(gm.get_submodule("blocks.0.attn.qk"), QKRLinear)
    assert not hasattr(gm.get_submodule("blocks.0.attn"), "qkv")  # replaced by q, k (in qk) and v
    assert gm.get_submodule("blocks.0.attn.qk").q.bias is None
    # The k bias and the query-only terms cancel in the softmax; only b_q·W_k·x_j is lost.
    _zero_query_bias(model, [(block.attn.qkv, slice(0, 32)) for block in model.blocks])
    torch.testing.assert_close(gm(X), model(X), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_latent_q_and_k() -> None:
    gm, _ = _qkr(lowbit.trace(_vit(), (X,)))
    gm.train()
    gm(X).square().mean().backward()
    qk = gm.get_submodule("blocks.1.attn.qk")
    assert qk.q.weight.grad.abs().sum() > 0 and qk.k.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_minilm_real_weights_separate_projections() -> None:
    minilm = zoo.load_minilm()
    batch = minilm.tokenize(zoo.MINILM_SENTENCES)
    gm, records = _qkr(lowbit.trace(minilm.model, (), example_kwargs=batch), example_kwargs=batch)
    assert len(records) == 6 and all(r.action == "reparameterized" and not r.stats["fused"] for r in records)
    assert all(not r.stats["function_preserving"] for r in records)  # BERT's query bias is real
    assert records[0].stats["qk"] == "encoder.layer.0.attention.self.qk" and records[0].stats["v"] == "unchanged"
    with torch.no_grad():
        changed = minilm.embed(gm(**batch), batch["attention_mask"])
        for layer in minilm.model.encoder.layer:
            layer.attention.self.query.bias.zero_()
        reference = minilm.embed(minilm.model(**batch), batch["attention_mask"])
    torch.testing.assert_close(changed, reference, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_addmm_projection() -> None:
    model = zoo.build("gpt2-tiny")
    with torch.no_grad():
        for block in model.model.transformer.h:
            block.attn.c_attn.bias[64:].normal_()  # k and v biases; k's cancels, v's is kept
    gm = lowbit.trace(model.model, (), example_kwargs=model.example_kwargs)
    out, records = _qkr(gm, example_kwargs=model.example_kwargs)
    assert [r.layer for r in records] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(r.stats["fused"] and r.stats["function_preserving"] for r in records)
    with torch.no_grad():
        torch.testing.assert_close(
            out(**model.example_kwargs).logits, model.model(**model.example_kwargs).logits, rtol=1e-4, atol=1e-5
        )


def test_llama_rotary_attention_is_reported_not_recognized() -> None:
    model = zoo.build("llama-tiny")
    gm = lowbit.trace(model.model, (), example_kwargs=model.example_kwargs)
    out, records = _qkr(gm)
    assert [r.layer for r in records] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(r.action == "skipped" and "not recognized" in r.reason and "rotary" in r.reason for r in records)
    assert not any(isinstance(m, QKRLinear) for m in out.modules())


class _HandWritten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


class _ScaledQuery(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], x.shape[1], 2, 8)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q * 2.0, k, v)


def test_unrecognized_patterns_and_no_attention_are_reported() -> None:
    x = torch.randn(2, 5, 16)
    _, records = _qkr(lowbit.trace(_HandWritten(), (x,)))
    assert len(records) == 1 and "explicit matmul/softmax" in records[0].reason
    _, records = _qkr(lowbit.trace(_ScaledQuery(), (x,)))
    assert len(records) == 1 and "q passes through mul" in records[0].reason
    out, records = _qkr(lowbit.trace(nn.Sequential(nn.Linear(16, 16)), (x,)))
    assert records == []


def test_separate_projections_fx_graph_exact_without_query_bias() -> None:
    torch.manual_seed(0)

    class Separate(_ScaledQuery):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = (x.shape[0], x.shape[1], 2, 8)
            q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))
            return F.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2).reshape(x.shape)

    model = Separate().eval()
    x = torch.randn(2, 5, 16)
    gm, records = _qkr(lowbit.trace(model, (x,)))
    assert records[0].stats["scale"] == 0.3 and records[0].stats["qk"] == "qk"
    with torch.no_grad():
        model.q.bias.zero_()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_deit_tiny_every_block_is_reparameterized_exactly() -> None:
    model = zoo.build("deit_tiny")  # random init: timm's qkv biases start at zero, so nothing is dropped
    gm, records = _qkr(lowbit.trace(model.model, model.example_inputs), example_inputs=model.example_inputs)
    assert len(records) == 12 and all(r.action == "reparameterized" and r.stats["function_preserving"] for r in records)
    with torch.no_grad():
        torch.testing.assert_close(gm(*model.example_inputs), model.model(*model.example_inputs), rtol=1e-4, atol=1e-5)
