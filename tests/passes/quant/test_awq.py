"""The ``awq`` pass: scale and clip searches against token-level references, exact folds
(norm, linear, RMSNorm weight, explicit scale), AWQ versus RTN error, the report, and
errors on bad input."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import lowbit
from lowbit.calibration import calibration_set
from lowbit.errors import CalibrationError, LowbitError, PassConfigError, PassOrderError
from lowbit.ir import ops
from lowbit.ir.annotations import get_meta
from lowbit.passes.base import PassContext
from lowbit.passes.quant import AWQ, GPTQ, RTN, PackedLinear, quantize_weight
from lowbit.passes.quant.awq import AWQConfig, apply_clip, fake_quantize, search_clip, search_scale

# ---------------------------------------------------------------- the searches


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("group_size", "symmetric"), [(-1, False), (16, False), (20, True), (24, False)])
def test_fake_quantize_is_the_packed_grid(bits, group_size, symmetric) -> None:
    w = torch.randn(6, 56, generator=torch.Generator().manual_seed(bits))
    w[1] = w[1].abs()
    expected = quantize_weight(w, bits, group_size, symmetric).dequantize()
    torch.testing.assert_close(fake_quantize(w, bits, group_size, symmetric), expected, rtol=0, atol=1e-6)


def outlier_inputs(rows: int, width: int, salient: int = 4, seed: int = 0) -> torch.Tensor:
    """Gaussian activations with a few input channels 30x larger, the ones AWQ protects."""
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    x[:, :salient] *= 30
    return x


def test_scale_search_loss_is_the_token_mean_of_the_output_change() -> None:
    """docs/methods.md (AWQ): s = max(s_X^α, 1e-4) normalized; loss = mean((x Wᵀ − x Q(W s)/s ᵀ)²)."""
    x = outlier_inputs(200, 32)
    weights = [torch.randn(8, 32), torch.randn(5, 32)]
    config = AWQConfig(bits=3, group_size=16)
    x_mean = x.abs().mean(dim=0)
    s, alpha, losses = search_scale([(w, config) for w in weights], x_mean, x.T @ x / x.shape[0], 20)
    for i, loss in enumerate(losses):
        t = x_mean.pow(i / 20).clamp(min=1e-4)
        t = t / (t.max() * t.min()).sqrt()
        outputs = torch.cat([x @ w.T for w in weights], dim=1)
        quantized = torch.cat([x @ (fake_quantize(w * t, 3, 16, False) / t).T for w in weights], dim=1)
        assert loss == pytest.approx(float((outputs - quantized).square().mean()), rel=1e-4)
    assert losses[int(round(alpha * 20))] == min(losses) and alpha > 0
    expected = x_mean.pow(alpha)
    torch.testing.assert_close(s, expected / (expected.max() * expected.min()).sqrt())


def test_clip_search_picks_the_best_bound_per_channel_and_group() -> None:
    x, w = outlier_inputs(64, 24, salient=2), torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    w[0, 3] = 6.0  # an outlier weight
    config = AWQConfig(bits=3, group_size=8)
    bounds = search_clip(w, x.T @ x / x.shape[0], config)
    assert bounds.shape == (5, 3)
    for n in range(5):
        for g in range(3):
            cols = slice(8 * g, 8 * g + 8)
            top = float(w[n, cols].abs().max())
            errors = []
            for i in range(10):
                m = top * (1 - i / 20)
                q = fake_quantize(w[n, cols].clamp(-m, m)[None], 3, -1, False)[0]
                errors.append(float((x[:, cols] @ (q - w[n, cols])).square().mean()))
            assert float(bounds[n, g]) == pytest.approx(top * (1 - errors.index(min(errors)) / 20), rel=1e-5)
    maxima = w.abs().reshape(5, 3, 8).amax(dim=-1)
    assert (bounds < maxima).any() and (bounds <= maxima).all()
    per_column = bounds.repeat_interleave(8, dim=1)
    assert torch.equal(apply_clip(w, bounds, 8), torch.maximum(torch.minimum(w, per_column), -per_column))


# ---------------------------------------------------------------- models


class Block(nn.Module):
    """LayerNorm → {q, v}; q·v → fc1 (folds into q); relu → fc2 (folds into fc1); residual."""

    def __init__(self, width: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return self.fc2(torch.relu(self.fc1(self.q(y) * self.v(y)))) + x


class Explicit(nn.Module):
    """No op can absorb a scale: a graph input, a GELU, a norm output read twice, and a
    channel permutation (passes the structural test, fails the numerical one)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.third = nn.Linear(width, width)
        self.fourth = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.second(torch.nn.functional.gelu(self.first(x)))
        y = self.norm(h)
        swapped = self.third(y).view(-1, 8, 2, 16).transpose(-1, -2).reshape(-1, 8, 32)
        return self.fourth(swapped) + y


def salient_block(seed: int = 0) -> fx.GraphModule:
    torch.manual_seed(seed)
    model = Block()
    with torch.no_grad():
        model.norm.weight[:4] = 20.0  # a few salient channels
        model.norm.bias.normal_()
    return fx.symbolic_trace(model)


def calibration(x: torch.Tensor, batch: int = 8):
    return calibration_set([(chunk,) for chunk in x.split(batch)], (x[:1],))


def tokens(batch: int, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 8, width, generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


# ---------------------------------------------------------------- exact folds


def test_scales_fold_into_layernorm_and_preceding_linears_exactly() -> None:
    gm, x = salient_block(), tokens(16)
    scaled = copy.deepcopy(gm)
    groups = AWQ(group_size=32).apply_scales(scaled, calibration(x))
    assert [(g["group"], g["scale"]) for g in groups] == [
        ("q, v", "folded into LayerNorm 'norm'"),
        ("fc1", "folded into Linear 'q'"),
        ("fc2", "folded into Linear 'fc1'"),
    ]
    assert all(g["alpha"] > 0 for g in groups)
    assert not torch.equal(scaled.get_submodule("norm").bias, gm.get_submodule("norm").bias)
    with torch.no_grad():
        expected, actual = gm(x), scaled(x)
    assert float((actual - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


class RMSNorm(nn.Module):
    """transformers' RMSNorm as it appears in traced graphs: ``weight * normalized``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class GatedMLP(nn.Module):
    def __init__(self, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.norm = RMSNorm(width)
        self.gate, self.up, self.down = nn.Linear(width, hidden), nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return self.down(torch.nn.functional.silu(self.gate(y)) * self.up(y)) + x


def test_scales_fold_into_an_rmsnorm_weight_multiply_and_up_proj_exactly() -> None:
    torch.manual_seed(0)
    gm, x = fx.symbolic_trace(GatedMLP()), tokens(8, 32)
    scaled = copy.deepcopy(gm)
    groups = AWQ(group_size=16).apply_scales(scaled, calibration(x))
    assert [(g["group"], g["scale"]) for g in groups] == [
        ("gate, up", "folded into elementwise weight 'norm.weight' (node mul_1)"),  # weight * normalized
        ("down", "folded into Linear 'up'"),
    ]
    with torch.no_grad():
        expected, actual = gm(x), scaled(x)
    assert float((actual - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_explicit_scales_keep_the_model_exact() -> None:
    torch.manual_seed(0)
    gm, x = fx.symbolic_trace(Explicit()), tokens(8, 32)
    scaled = copy.deepcopy(gm)
    groups = AWQ(group_size=16).apply_scales(scaled, calibration(x))
    scale = {g["group"]: g["scale"] for g in groups}
    assert all(text.startswith("explicit x / s") for text in scale.values()), scale
    assert "other ops" in scale["third"] and "does not divide" in scale["fourth"]
    multiplies = [n for n in scaled.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert len(multiplies) == 4 and all(n.args[1].target.startswith("awq_inv_scale_") for n in multiplies)
    with torch.no_grad():
        expected, actual = gm(x), scaled(x)
    assert float((actual - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def llama(kv_heads: int) -> tuple[fx.GraphModule, object, torch.Tensor]:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=128,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 16))
    gm = lowbit.trace(model, (), example_kwargs={"input_ids": ids})
    batches = calibration_set([{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(2)], (), {"input_ids": ids})
    return gm, batches, ids


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_groups_follow_the_reference_and_stay_exact(kv_heads) -> None:
    """RMSNorm (ATen ops, weight multiply) → q/k/v and gate/up, v_proj → o_proj (not under
    GQA: there it is an explicit scale), up_proj → down_proj."""
    gm, batches, ids = llama(kv_heads)
    scaled = copy.deepcopy(gm)
    groups = AWQ(ignore=("lm_head",)).apply_scales(scaled, batches)
    prefix = "model.layers.0."
    norm = "folded into elementwise weight '" + prefix
    assert [g["group"].replace(prefix, "") for g in groups] == [
        "self_attn.q_proj, self_attn.k_proj, self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj, mlp.up_proj",
        "mlp.down_proj",
    ]
    assert groups[0]["scale"].startswith(norm + "input_layernorm.weight'")
    assert groups[2]["scale"].startswith(norm + "post_attention_layernorm.weight'")
    assert groups[3]["scale"] == f"folded into Linear '{prefix}mlp.up_proj'"
    if kv_heads == 4:
        assert groups[1]["scale"] == f"folded into Linear '{prefix}self_attn.v_proj'"
    else:
        assert groups[1]["scale"].startswith("explicit x / s")
    with torch.no_grad():
        expected, actual = gm(input_ids=ids)[0], scaled(input_ids=ids)[0]
    assert float((actual - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


# ---------------------------------------------------------------- the pass


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_on_salient_channels(bits) -> None:
    gm, x = salient_block(), tokens(32)
    pipeline = lowbit.Pipeline([AWQ(bits=bits, group_size=32)])
    awq = pipeline(gm, calibration=calibration(x))
    rtn = lowbit.Pipeline([RTN(bits=bits, group_size=32, symmetric=False)])(gm)
    test = tokens(16, seed=1)
    with torch.no_grad():
        expected = gm(test)
        awq_error, rtn_error = relative_error(awq(test), expected), relative_error(rtn(test), expected)
    assert awq_error < 0.85 * rtn_error, (awq_error, rtn_error)
    for record in pipeline.report.passes[0].layers:
        assert record.action == "quantized"
        assert record.stats["search_loss"] <= record.stats["unscaled_loss"]
        assert record.stats["output_error"] < record.stats["rtn_output_error"]


def test_report_names_groups_prev_ops_scales_alpha_and_clipping() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(32)
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
            self.out = nn.Linear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(x)
            return self.out(torch.relu(self.q_proj(y) * self.k_proj(y) + self.v_proj(y)))

    torch.manual_seed(0)
    gm = fx.symbolic_trace(Attention())
    pipeline = lowbit.Pipeline([AWQ(bits=4, group_size=16, ignore=("out",))])
    out = pipeline(gm, calibration=calibration(tokens(8, 32)))
    result = pipeline.report.passes[0]
    assert result.stats == {"quantized": 3, "skipped": 1, "groups": 1, "folded": 1, "explicit_scales": 0}
    q, k, v, skipped = result.layers
    for record in (q, k, v):
        assert record.stats["group"] == "q_proj, k_proj, v_proj"
        assert record.stats["prev_op"] == "LayerNorm 'norm'" and record.stats["scale"] == "folded into LayerNorm 'norm'"
        assert 0 <= record.stats["alpha"] < 1 and record.stats["samples"] == 64
    assert not q.stats["clip"] and not k.stats["clip"] and v.stats["clip"] and "clip_shrink" in v.stats
    assert skipped.action == "skipped" and "ignored" in skipped.reason
    node = next(n for n in out.graph.nodes if n.target is ops.linear_packed)
    assert get_meta(node).quant.describe() == "w4 g16 asym [awq]"
    assert isinstance(out.get_submodule("v_proj"), PackedLinear) and out.get_submodule("v_proj").zeros is not None


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_on_minilm(bits) -> None:
    from lowbit import zoo

    minilm = zoo.load_minilm()
    text = Path("/usr/share/common-licenses/GPL-3").read_text().split("\n")
    lines = [line.strip() for line in text if len(line.strip()) > 30]

    def tokenize(sentences):
        batch = minilm.tokenizer(sentences, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    example = tokenize(lines[:8])
    gm = lowbit.trace(minilm.model, (), example_kwargs=example)
    batches = calibration_set([tokenize(lines[i : i + 8]) for i in range(0, 64, 8)], (), example)
    test = tokenize(lines[200:208])
    with torch.no_grad():
        reference = minilm.embed(gm(**test), test["attention_mask"])
    cosines = {}
    for name, pipeline in (
        ("awq", lowbit.Pipeline([AWQ(bits=bits, group_size=128)])),
        ("rtn", lowbit.Pipeline([RTN(bits=bits, group_size=128, symmetric=False)])),
    ):
        out = pipeline(gm, calibration=batches) if name == "awq" else pipeline(gm)
        with torch.no_grad():
            cosines[name] = float(
                torch.cosine_similarity(minilm.embed(out(**test), test["attention_mask"]), reference).mean()
            )
    assert cosines["awq"] > cosines["rtn"], cosines


def test_padded_positions_do_not_change_the_result() -> None:
    """Regression: calibration padded to a common length is mostly padding, which the model
    never reads; AWQ (and GPTQ) must not fit to it. Whatever sits in the padded positions,
    the quantized model is the same."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    mask = torch.zeros(4, 16, dtype=torch.long)
    for row, length in enumerate((3, 5, 4, 16)):
        mask[row, :length] = 1
    ids = torch.randint(1, 100, (4, 16))
    example = {"input_ids": ids, "attention_mask": mask}
    gm = lowbit.trace(model, (), example_kwargs=example)
    outputs = []
    for fill in (torch.zeros_like(ids), torch.randint(1, 100, ids.shape)):  # [PAD]=0 or arbitrary tokens
        padded = {"input_ids": torch.where(mask == 1, ids, fill), "attention_mask": mask}
        for quantizer in (AWQ(bits=3, group_size=16), GPTQ(bits=3, group_size=16)):
            out = lowbit.Pipeline([quantizer])(gm, calibration=calibration_set([padded], (), example))
            with torch.no_grad():
                outputs.append(out(**example)[0])
    torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-4, atol=1e-5)  # awq
    torch.testing.assert_close(outputs[3], outputs[1], rtol=1e-4, atol=1e-5)  # gptq


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bits": 5}, "bits"),
        ({"bits": 1}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"n_grid": 0}, "n_grid"),
        ({"max_shrink": 1.5}, "max_shrink"),
        ({"clip": "yes"}, "clip"),
        ({"duo_scaling": True}, "duo_scaling"),
    ],
)
def test_bad_options_name_the_key(options, key) -> None:
    with pytest.raises(PassConfigError, match=key):
        AWQ(**options)


def test_registry_defaults_and_missing_calibration() -> None:
    awq = lowbit.passes.get("awq", bits=3, ignore=["lm_head"])
    assert isinstance(awq, AWQ) and awq.requires_calibration
    assert AWQ().config.as_dict() == {
        "bits": 4,
        "group_size": 128,
        "symmetric": False,
        "ignore": (),
        "n_grid": 20,
        "max_shrink": 0.5,
        "clip": True,
    }
    gm = salient_block()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(CalibrationError, match="awq"):
        lowbit.Pipeline([awq])(gm)
    with pytest.raises(CalibrationError, match="awq needs calibration"):
        awq.run(gm, PassContext())
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_nan_activations_are_an_error_naming_the_layer() -> None:
    class LogThenLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(torch.log(x))

    gm = fx.symbolic_trace(LogThenLinear())
    with pytest.raises(LowbitError, match="layer 'proj'.*NaN or Inf"):
        lowbit.Pipeline([AWQ()])(gm, calibration=calibration(-torch.ones(8, 4)))


def test_nan_weight_is_an_error_naming_the_layer() -> None:
    gm = salient_block()
    with torch.no_grad():
        gm.get_submodule("fc2").weight[0, 0] = math.inf
    with pytest.raises(LowbitError, match="layer 'fc2'"):
        lowbit.Pipeline([AWQ()])(gm, calibration=calibration(tokens(8)))


def test_active_pruning_masks_must_be_applied_first() -> None:
    with pytest.raises(PassOrderError, match="add 'apply_masks' before 'awq'"):
        lowbit.Pipeline([lowbit.passes.get("prune_magnitude"), AWQ()])
