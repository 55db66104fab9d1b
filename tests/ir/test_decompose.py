"""Recurrent and attention layers are traced into nn.Linear layers and primitive ops with eager's answers."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import lowbit
from lowbit.ir.decompose import UnsupportedOptionError
from lowbit.ir.trace import trace


def max_abs_diff(expected: object, actual: object) -> float:
    want = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    got = [t for t in tree_leaves(actual) if isinstance(t, torch.Tensor)]
    assert len(want) == len(got) and want
    assert all(w.isnan().equal(g.isnan()) for w, g in zip(want, got))
    return max((w - g).nan_to_num().abs().max().item() for w, g in zip(want, got))


class Recurrent(nn.Module):
    def __init__(self, cls: type[nn.Module], **options: object) -> None:
        super().__init__()
        self.rnn = cls(6, 5, **options)

    def forward(self, x: torch.Tensor) -> object:
        return self.rnn(x)


class RecurrentWithState(Recurrent):
    def forward(self, x: torch.Tensor, state: object) -> object:
        return self.rnn(x, state)


class Stacked(nn.Module):
    """Outputs unpacked like Python tuples, layers feeding each other."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, (h, c) = self.lstm(x)
        y, _ = self.gru(y, h)
        y, _ = self.attn(y, y, y, need_weights=False)
        return self.head(y)


RNN_CASES = list(itertools.product((nn.LSTM, nn.GRU), (1, 2), (False, True), (False, True), (True, False)))


@pytest.mark.parametrize("cls,layers,bidirectional,batch_first,bias", RNN_CASES)
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_layers_match_eager(cls, layers, bidirectional, batch_first, bias, with_state):
    torch.manual_seed(0)
    options = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    model = (RecurrentWithState if with_state else Recurrent)(cls, **options).eval()
    x = torch.randn(3, 4, 6)
    h0 = torch.randn(layers * (2 if bidirectional else 1), 3 if batch_first else 4, 5)
    state = (h0, torch.randn_like(h0)) if cls is nn.LSTM else h0
    args = (x, state) if with_state else (x,)
    gm = trace(model, args, tracer="fx")
    assert max_abs_diff(model(*args), gm(*args)) < 1e-5
    linears = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "rnn.ih_l0" in linears and "rnn.hh_l0" in linears
    assert all(isinstance(gm.get_submodule(t), nn.Linear) for t in linears)
    assert ("rnn.hh_l0_reverse" in linears) == bidirectional


@pytest.mark.parametrize("cls,layers,bidirectional,batch_first,bias", [c for c in RNN_CASES if c[1] == 2 and c[4]])
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_layers_match_eager_under_export(cls, layers, bidirectional, batch_first, bias, with_state):
    torch.manual_seed(0)
    options = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    model = (RecurrentWithState if with_state else Recurrent)(cls, **options).eval()
    x = torch.randn(3, 4, 6)
    h0 = torch.randn(layers * (2 if bidirectional else 1), 3 if batch_first else 4, 5)
    state = (h0, torch.randn_like(h0)) if cls is nn.LSTM else h0
    args = (x, state) if with_state else (x,)
    gm = trace(model, args, tracer="export")
    assert max_abs_diff(model(*args), gm(*args)) < 1e-5
    linears = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"rnn.ih_l0", "rnn.hh_l0", "rnn.ih_l1", "rnn.hh_l1"} <= linears
    assert all(isinstance(gm.get_submodule(t), nn.Linear) for t in linears)
    assert ("rnn.hh_l0_reverse" in linears) == bidirectional
    assert type(model.rnn) is cls  # the model gets its layer back


class Attention(nn.Module):
    def __init__(self, call: dict, **options: object) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **options)
        self.call = call

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> object:
        return self.attn(q, k, v, **self.call)


N, L, S = 2, 3, 4
PADDING = torch.tensor([[False, False, True, False], [True, False, False, False]])
MHA_CALLS = [
    {},
    {"need_weights": False},
    {"average_attn_weights": False},
    {"key_padding_mask": PADDING},
    {"key_padding_mask": torch.randn(N, S)},
    {"attn_mask": torch.tensor([[False, True, False, False]] * L)},
    {"attn_mask": torch.randn(L, S)},
    {"attn_mask": torch.randn(N * 2, L, S), "key_padding_mask": PADDING, "need_weights": False},
]


@pytest.mark.parametrize("call", MHA_CALLS, ids=[",".join(c) or "plain" for c in MHA_CALLS])
@pytest.mark.parametrize("batch_first,kdim,bias", list(itertools.product((False, True), (None, 6), (True, False))))
def test_attention_matches_eager(call, batch_first, kdim, bias):
    torch.manual_seed(0)
    model = Attention(call, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).eval()
    q = torch.randn(N, L, 8) if batch_first else torch.randn(L, N, 8)
    k = torch.randn(N, S, kdim or 8) if batch_first else torch.randn(S, N, kdim or 8)
    v = torch.randn_like(k)
    gm = trace(model, (q, k, v), tracer="fx")
    assert max_abs_diff(model(q, k, v), gm(q, k, v)) < 1e-5
    layers = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert layers == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]


@pytest.mark.parametrize("call", MHA_CALLS, ids=[",".join(c) or "plain" for c in MHA_CALLS])
@pytest.mark.parametrize("batch_first,kdim", [(False, 6), (True, None)])
def test_attention_matches_eager_under_export(call, batch_first, kdim):
    torch.manual_seed(0)
    model = Attention(call, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    q = torch.randn(N, L, 8) if batch_first else torch.randn(L, N, 8)
    k = torch.randn(N, S, kdim or 8) if batch_first else torch.randn(S, N, kdim or 8)
    v = torch.randn_like(k)
    gm = trace(model, (q, k, v), tracer="export")
    assert max_abs_diff(model(q, k, v), gm(q, k, v)) < 1e-5
    layers = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert layers == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
    assert isinstance(model.attn, nn.MultiheadAttention)


QUANTIZED = {"lstm.ih_l0", "lstm.hh_l0", "gru.ih_l0", "gru.hh_l0", "head"}
QUANTIZED |= {f"attn.{name}_proj" for name in ("q", "k", "v", "out")}


def quantized(compiled: lowbit.CompiledModel) -> set[str]:
    return {r.layer for r in compiled.report.pipeline.passes[0].layers if r.action == "quantized"}


def test_unpacked_outputs_trace_with_fx_and_quantize():
    model = Stacked().eval()
    x = torch.randn(2, 5, 6)
    compiled = lowbit.compile(model, (x,), passes=["rtn:bits=8,group_size=-1"], target="torch")
    assert compiled.report.tracer == "fx"
    assert quantized(compiled) == QUANTIZED
    assert (compiled(x) - model(x)).abs().max() < 1e-2


def test_gptq_quantizes_the_decomposed_linears():
    model = Stacked().eval()
    x = torch.randn(2, 5, 6)
    compiled = lowbit.compile(model, (x,), passes=["gptq:bits=8,group_size=-1"], target="torch", calibration=[(x,)])
    assert quantized(compiled) == QUANTIZED


def test_exported_layers_compile_for_x86_and_quantize():
    model = Stacked().eval()
    x = torch.randn(2, 5, 6)
    compiled = lowbit.compile(trace(model, (x,), tracer="export"), (x,), target="x86")
    assert compiled.report.tracer == "export" and not compiled.report.fallbacks
    assert (compiled(x) - model(x)).abs().max() < 1e-5
    compiled = lowbit.compile(trace(model, (x,), tracer="export"), (x,), passes=["rtn:bits=8,group_size=-1"])
    assert quantized(compiled) == QUANTIZED
    assert (compiled(x) - model(x)).abs().max() < 1e-2


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_decomposed_layers_take_any_batch_size(tracer):
    """The graph of a model traced at batch 2 (the batch left free under torch.export) runs at batch 3."""
    model = Stacked().eval()
    gm = trace(model, (torch.randn(2, 5, 6),), tracer=tracer, free_batch=True)
    x = torch.randn(3, 5, 6)
    assert max_abs_diff(model(x), gm(x)) < 1e-5


def test_a_layer_called_with_other_shapes_is_named_under_export():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gru(self.gru(x)[0][:2])[0]

    model = Twice().eval()
    with pytest.raises(UnsupportedOptionError, match=r"'gru' \(GRU\): calls with inputs of different shapes"):
        trace(model, (torch.randn(3, 2, 6),), tracer="export")
    assert isinstance(model.gru, nn.GRU)


def test_leaf_modules_keeps_a_layer_whole():
    model = Recurrent(nn.LSTM).eval()
    gm = trace(model, (torch.randn(3, 2, 6),), tracer="fx", leaf_modules=(nn.LSTM,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["rnn"]


@pytest.mark.parametrize(
    "model,option",
    [
        (Recurrent(nn.LSTM, proj_size=2), "proj_size"),
        (Attention({}, add_bias_kv=True), "add_bias_kv"),
        (Attention({}, add_zero_attn=True), "add_zero_attn"),
    ],
)
def test_options_without_decomposition_are_named(model, option):
    inputs = (torch.randn(3, 2, 6),) if isinstance(model, Recurrent) else (torch.randn(3, 2, 8),) * 3
    with pytest.raises(UnsupportedOptionError, match=rf"'(rnn|attn)'.*{option}.*leaf_modules"):
        trace(model.eval(), inputs)


def test_the_model_keeps_its_layers_and_the_graph_shares_their_weights():
    model = Stacked().eval()
    gm = trace(model, (torch.randn(2, 5, 6),), tracer="fx")
    assert isinstance(model.lstm, nn.LSTM) and isinstance(model.attn, nn.MultiheadAttention)
    assert gm.get_submodule("lstm.ih_l0").weight is model.lstm.weight_ih_l0
    assert gm.get_submodule("attn.k_proj").weight.data_ptr() == model.attn.in_proj_weight[8:].data_ptr()
