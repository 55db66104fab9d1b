"""Tracing front door: both tracers give the canonical fx form, and failures explain themselves."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from lowbit.errors import LowbitError, TraceError
from lowbit.ir.trace import TRACERS, diagnose, graph_inputs, trace


def max_abs_diff(expected: object, actual: object) -> float:
    """Largest difference over every tensor of two (pytree) outputs of the same structure."""
    want = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    got = [t for t in tree_leaves(actual) if isinstance(t, torch.Tensor)]
    assert len(want) == len(got) and want
    return max((w.float() - g.float()).abs().max().item() for w, g in zip(want, got))


def call_modules(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def layer_calls(gm: fx.GraphModule) -> list[str]:
    """call_module targets of layers that own parameters or buffers (conv, bn, linear...)."""
    return [t for t in call_modules(gm) if any(True for _ in gm.get_submodule(t).parameters())]


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


class InPlaceWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[0] = 1.0
        return x


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class Layers(nn.Module):
    """One of each layer kind canonicalization recognises, with non-default configurations."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6, padding_idx=0)
        self.conv1d = nn.Conv1d(6, 6, 3, padding="same", dilation=2)
        self.bn1d = nn.BatchNorm1d(6, eps=1e-3)
        self.group_norm = nn.GroupNorm(2, 6)
        self.deconv = nn.ConvTranspose2d(6, 4, 3, stride=2, output_padding=1)
        self.conv3d = nn.Conv3d(4, 4, 1)
        self.layer_norm = nn.LayerNorm(4, eps=1e-6, bias=False)
        self.rms_norm = nn.RMSNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).transpose(1, 2)  # (B, 6, L)
        h = self.group_norm(self.bn1d(self.conv1d(h)))
        h = self.deconv(h.unsqueeze(-1))  # (B, 4, 2L+2, 4)
        h = self.conv3d(h.unsqueeze(2)).squeeze(2).transpose(1, 3)  # (B, 4, 2L+2, 4)
        return self.fc(self.rms_norm(self.layer_norm(h)))


class DoubledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class NotExactlyLayers(nn.Module):
    """Layer weights used in ways a call_module of the layer would not reproduce."""

    def __init__(self) -> None:
        super().__init__()
        self.doubled = DoubledLinear(4, 4)
        self.fc = nn.Linear(4, 4)
        self.reflect = nn.Conv1d(1, 1, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.doubled(x) + F.linear(x, self.fc.weight)  # parent reuses fc's weight
        return self.reflect(h.unsqueeze(1)).squeeze(1)


def test_fx_keeps_standard_layers_and_propagates_shapes() -> None:
    model, x = SmallCNN().eval(), torch.randn(2, 3, 16, 16)
    gm = trace(model, x, tracer="fx")
    assert gm.meta["lowbit_tracer"] == "fx"
    assert call_modules(gm)[:3] == ["features.0", "features.1", "features.2"]
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output")
    assert gm.get_submodule("head") is model.head
    assert max_abs_diff(model(x), gm(x)) <= 1e-5


def test_export_gives_the_same_canonical_form_as_fx() -> None:
    model, x = SmallCNN().eval(), torch.randn(2, 3, 16, 16)
    via_fx = trace(model, (x,), tracer="fx")
    via_export = trace(model, (x,), tracer="export")
    assert via_export.meta["lowbit_tracer"] == "export"
    assert layer_calls(via_export) == layer_calls(via_fx)
    assert layer_calls(via_export) == ["features.0", "features.1", "features.3", "features.4", "head"]
    for node in via_export.graph.nodes:
        if node.op == "call_module":
            assert len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs
    assert not [n for n in via_export.graph.nodes if n.op == "get_attr"]
    assert max_abs_diff(model(x), via_export(x)) <= 1e-5


def test_export_graph_keeps_original_parameter_names_and_tensors() -> None:
    model = SmallCNN().eval()
    gm = trace(model, torch.randn(1, 3, 16, 16), tracer="export")
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    assert dict(gm.named_parameters()).keys() == params.keys()
    assert all(p is params[name] for name, p in gm.named_parameters())
    assert all(b is buffers[name] for name, b in gm.named_buffers())
    gm.graph.lint()


def test_export_canonicalizes_every_layer_kind() -> None:
    model = Layers().eval()
    ids = torch.tensor([[0, 3, 5, 7], [1, 2, 0, 9]])
    gm = trace(model, ids, tracer="export")
    names = [name for name, child in model.named_children()]
    assert sorted(call_modules(gm)) == sorted(names)
    assert max_abs_diff(model(ids), gm(ids)) <= 1e-5


def test_export_leaves_inexact_layer_uses_as_aten_ops() -> None:
    model, x = NotExactlyLayers().eval(), torch.randn(2, 4)
    gm = trace(model, x, tracer="export")
    assert call_modules(gm) == []
    assert max_abs_diff(model(x), gm(x)) <= 1e-5


def test_export_graph_takes_kwargs_and_returns_the_same_structure() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            y = self.fc(x)
            return {"y": y, "scaled": y * scale}

    model, x, scale = Pair().eval(), torch.randn(2, 4), torch.tensor(3.0)
    gm = trace(model, (x,), tracer="export", example_kwargs={"scale": scale})
    out = gm(x, scale=scale)
    assert isinstance(out, dict) and out.keys() == {"y", "scaled"}
    assert max_abs_diff(model(x, scale=scale), out) <= 1e-5
    assert len(graph_inputs(gm, (x,), {"scale": scale})) == 2


def test_untraceable_submodule_names_path_construct_and_fix() -> None:
    with pytest.raises(TraceError) as info:
        trace(GatedNet(), torch.randn(2, 4))
    message = str(info.value)
    assert "'gate' (Gate)" in message
    assert "data-dependent control flow" in message
    assert "test_trace.py" in message and "if x.sum() > 0:" in message
    assert "leaf_modules=(Gate,)" in message and "torch.fx.wrap" in message
    assert "fx tracer:" in message and "export tracer:" in message
    assert info.value.__cause__ is not None


def test_export_only_failure_is_explained_too() -> None:
    with pytest.raises(TraceError, match=r"(?s)data-dependent control flow.*'gate' \(Gate\).*export tracer"):
        trace(GatedNet(), torch.randn(2, 4), tracer="export")


def test_fx_item_assignment_is_named() -> None:
    model = nn.Sequential(nn.Linear(3, 3), InPlaceWrite())
    with pytest.raises(TraceError, match=r"(?s)item assignment.*'1' \(InPlaceWrite\)"):
        trace(model, torch.randn(3, 3), tracer="fx")


@pytest.mark.parametrize("leaf", [Gate, "gate"])
def test_leaf_module_makes_the_model_traceable(leaf: type[nn.Module] | str) -> None:
    model, x = GatedNet().eval(), torch.randn(2, 4)
    gm = trace(model, x, leaf_modules=(leaf,))
    assert gm.meta["lowbit_tracer"] == "fx"
    assert call_modules(gm) == ["fc", "gate"]
    assert max_abs_diff(model(x), gm(x)) <= 1e-5


def test_auto_falls_back_to_export() -> None:
    model, x = nn.Sequential(nn.Linear(3, 3), InPlaceWrite()).eval(), torch.randn(3, 3)
    gm = trace(model, x)
    assert gm.meta["lowbit_tracer"] == "export"
    assert call_modules(gm) == ["0"]
    assert max_abs_diff(model(x.clone()), gm(x.clone())) <= 1e-5


def test_tracing_uses_eval_mode_and_restores_training_mode() -> None:
    model = SmallCNN().train()
    model.features[1].eval()
    trace(model, torch.randn(2, 3, 16, 16), tracer="export")
    assert model.training and model.features[0].training
    assert not model.features[1].training


def test_diagnose_reports_each_tracer() -> None:
    model, x = nn.Sequential(nn.Linear(3, 3), InPlaceWrite()), torch.randn(3, 3)
    attempts = diagnose(model, (x,))
    assert [a.tracer for a in attempts] == list(TRACERS)
    fx_attempt, export_attempt = attempts
    assert not fx_attempt.ok and "item assignment" in fx_attempt.message and fx_attempt.nodes == 0
    assert export_attempt.ok and export_attempt.nodes > 0 and export_attempt.seconds > 0


def test_unknown_tracer_is_a_clear_error() -> None:
    with pytest.raises(LowbitError, match=r"unknown tracer 'jit'.*'auto', 'fx', 'export'"):
        trace(SmallCNN(), torch.randn(1, 3, 8, 8), tracer="jit")


def test_causal_lm_with_kv_cache_gets_the_use_cache_hint() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        vocab_size=100,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=True,
    )
    with pytest.raises(TraceError, match=r"(?s)KV cache.*use_cache=False"):
        trace(LlamaForCausalLM(config), (), example_kwargs={"input_ids": torch.tensor([[3, 4, 5]])})


class OptionalMask(nn.Module):
    """A block with timm's optional arguments: a mask that may be None, a flag and a number."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, scale: float = 2.0
    ) -> torch.Tensor:
        y = self.fc(x)
        if attn_mask is not None or is_causal:
            y = y.masked_fill(attn_mask == 0, 0.0)
        return y * scale


def test_fx_binds_arguments_left_at_their_default_as_constants() -> None:
    model, x = OptionalMask().eval(), torch.randn(2, 4)
    gm = trace(model, (x,), tracer="fx")
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert not any(n.op == "call_function" and "assert" in str(n.target) for n in gm.graph.nodes)
    assert max_abs_diff(model(x), gm(x)) <= 1e-6


def test_fx_keeps_an_optional_argument_given_an_example_as_an_input() -> None:
    model, x, mask = OptionalMask().eval(), torch.randn(2, 4), torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1]])
    gm = trace(model, (x,), tracer="fx", example_kwargs={"attn_mask": mask})
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "attn_mask"]
    assert max_abs_diff(model(x, attn_mask=mask), gm(x, attn_mask=mask)) <= 1e-6


class PatchGrid(nn.Module):
    """timm's patch embedding check: the input size must match the model's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[-1] == 8, "Input width doesn't match model (8).")
        return x * 2


def test_static_assert_is_checked_at_trace_time() -> None:
    gm = trace(PatchGrid(), torch.randn(1, 8), tracer="fx")
    assert any(n.target is torch._assert for n in gm.graph.nodes)  # kept: the graph still checks other shapes
    with pytest.raises(TraceError, match=r"(?s)assertion of the model.*Input width doesn't match model \(8\)"):
        trace(PatchGrid(), torch.randn(1, 6), tracer="fx")
    with pytest.raises(TraceError, match=r"(?s)assertion of the model.*Input width doesn't match model \(8\)"):
        trace(PatchGrid(), torch.randn(1, 6))  # export fails on it too
