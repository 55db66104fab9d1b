"""Torch-target artifacts load back as the graph that was saved, whichever tracer built it."""

from __future__ import annotations

import torch
import transformers
from torch import nn

import lowbit
from lowbit.backends.torch import GRAPH_FILE, SavedGraph
from lowbit.ir.annotations import META_KEY


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_an_export_traced_bert_loads_back_with_the_same_graph_and_outputs(tmp_path):
    model = tiny_bert()
    inputs = {"input_ids": torch.randint(0, 100, (1, 8)), "attention_mask": torch.tensor([[1] * 6 + [0] * 2])}
    compiled = lowbit.compile(model, (), example_kwargs=inputs, passes=["rtn:bits=8,group_size=-1"], target="torch")
    assert compiled.report.tracer == "export"
    compiled.export(tmp_path / "bert")
    loaded = lowbit.load(tmp_path / "bert")
    with torch.no_grad():
        want, got = compiled(**inputs), loaded(**inputs)
    assert type(got) is type(want)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)


def test_saved_graph_keeps_node_names_targets_and_annotations(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    compiled = lowbit.compile(model, (x,), passes=["rtn:bits=4,group_size=8"], target="torch")
    compiled.export(tmp_path / "mlp")
    saved = torch.load(tmp_path / "mlp" / GRAPH_FILE, weights_only=False)
    assert isinstance(saved, SavedGraph)
    gm = saved.graph_module()
    before = [(n.op, n.name, str(n.target), n.meta.get(META_KEY)) for n in compiled.graph.graph.nodes]
    after = [(n.op, n.name, str(n.target), n.meta.get(META_KEY)) for n in gm.graph.nodes]
    assert after == before
    assert torch.equal(gm(x), compiled(x))
