"""The model zoo: every entry builds offline, traces with tracer="auto" and matches eager."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from lowbit import zoo
from lowbit.errors import LowbitError
from lowbit.ir.trace import graph_inputs, trace

EXPECTED_TRACER = {
    "resnet18": "fx",
    "mobilenet_v3_small": "fx",
    "efficientnet_lite0": "fx",
    "deit_tiny": "fx",
    "gpt2-tiny": "export",
    "llama-tiny": "export",
    "minilm": "export",
}


def tensors(output: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def call_modules(gm: fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "call_module"}


class _Recorder(fx.Interpreter):
    """Runs a graph and records which nodes actually produce tensors."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.tensor_nodes: list[fx.Node] = []

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op != "output" and tensors(result):
            self.tensor_nodes.append(n)
        return result


@pytest.fixture(scope="module")
def traced() -> dict[str, tuple[zoo.ZooModel, fx.GraphModule]]:
    """Each zoo model with its tracer="auto" graph, built once for the module."""
    result = {}
    for name in zoo.names():
        entry = zoo.build(name)
        result[name] = (entry, trace(entry.model, entry.example_inputs, example_kwargs=entry.example_kwargs))
    return result


def test_names() -> None:
    assert zoo.names() == list(EXPECTED_TRACER)


def test_unknown_name_lists_the_zoo() -> None:
    with pytest.raises(LowbitError, match=r"unknown zoo model 'resnet9000'.*resnet18.*minilm"):
        zoo.build("resnet9000")


@pytest.mark.parametrize("name", list(EXPECTED_TRACER))
def test_traced_graph_reproduces_eager(traced: dict, name: str) -> None:
    entry, gm = traced[name]
    assert not entry.model.training and entry.description
    assert gm.meta["lowbit_tracer"] == EXPECTED_TRACER[name]
    with torch.no_grad():
        expected = entry.model(*entry.example_inputs, **entry.example_kwargs)
        actual = gm(*entry.example_inputs, **entry.example_kwargs)
    assert type(actual) is type(expected)
    want, got = tensors(expected), tensors(actual)
    assert len(want) == len(got) > 0
    assert max((w - g).abs().max().item() for w, g in zip(want, got)) <= 1e-5


@pytest.mark.parametrize("name", list(EXPECTED_TRACER))
def test_every_tensor_node_has_tensor_meta(traced: dict, name: str) -> None:
    entry, gm = traced[name]
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*graph_inputs(gm, entry.example_inputs, entry.example_kwargs), enable_io_processing=False)
    assert recorder.tensor_nodes
    assert [n.name for n in recorder.tensor_nodes if "tensor_meta" not in n.meta] == []


def test_layers_are_call_modules_named_by_module_path(traced: dict) -> None:
    resnet = call_modules(traced["resnet18"][1])
    assert {"conv1", "bn1", "layer1.0.conv1", "layer4.1.bn2", "fc"} <= resnet
    minilm = call_modules(traced["minilm"][1])
    assert {
        "embeddings.word_embeddings",
        "embeddings.LayerNorm",
        "encoder.layer.0.attention.self.query",
        "encoder.layer.5.output.dense",
        "pooler.dense",
    } <= minilm
    llama = call_modules(traced["llama-tiny"][1])
    assert {"model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"} <= llama
    # GPT-2 ties lm_head to the token embedding; both stay their own layers.
    assert {"transformer.wte", "lm_head"} <= call_modules(traced["gpt2-tiny"][1])


def test_random_init_models_are_reproducible() -> None:
    first, second = zoo.build("llama-tiny"), zoo.build("llama-tiny")
    with torch.no_grad():
        a = first.model(**first.example_kwargs).logits
        b = second.model(**second.example_kwargs).logits
    assert torch.equal(a, b)


def test_minilm_embeddings_are_normalised_and_meaningful() -> None:
    minilm = zoo.load_minilm()
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply."]
    batch = minilm.tokenize(sentences)
    with torch.no_grad():
        embeddings = zoo.minilm_embed(minilm.model(**batch), batch["attention_mask"])
    assert embeddings.shape == (3, 384)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    similar, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > 0.4 and similar > unrelated + 0.2
