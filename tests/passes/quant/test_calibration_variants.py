"""Calibration batches of any batch size and length the model takes, under both tracers and for every calibrating
pass: a graph specialized to the example's shapes runs them with the constants of a trace at their shape
(`lowbit.ir.variants`), with statistics equal to those of a graph traced at that shape; shapes the model rejects
are a named error."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.errors import CalibrationError
from lowbit.ir.trace import trace
from lowbit.ir.variants import VARIANTS, add_calibration_variants, fit_batches
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.quant.hessian import capture_hessian
from tests.conv_models import TinyCNN

from helpers import tiny_bert, tiny_llama

VOCAB, LENGTH = 100, 16
#: The calibrating passes and what they need before them.
PASSES = {
    "gptq": ["gptq:bits=4,group_size=32"],
    "awq": ["awq:bits=4,group_size=32"],
    "quantize_activations": ["rtn:bits=4,group_size=32", "quantize_activations:dynamic=false"],
}


def _ids(batch: int, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny_bert(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=32)


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny_llama(tie=False, vocab_size=VOCAB, hidden_size=32, num_key_value_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _images(batch: int, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch * 100 + size))


def _calibrated(model: nn.Module, example: tuple, tracer: str, passes: list[str], batches: list) -> torch.nn.Module:
    gm = trace(model, example, tracer=tracer)
    calibration = [((b,), {}) for b in batches]
    add_calibration_variants(model, gm, calibration)
    return Pipeline(passes)(gm, calibration=[(b,) for b in batches], example_inputs=example)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state, other = a.state_dict(), b.state_dict()
    assert state.keys() == other.keys()
    for name, value in state.items():
        assert torch.equal(value, other[name]), name


@pytest.mark.parametrize("name", list(PASSES))
@pytest.mark.parametrize(
    "batches",
    [[_ids(3)], [_ids(2, 9)], [_ids(2, 24)], [_ids(3, 5), _ids(4), _ids(1, 30)]],
    ids=["batch-3", "shorter", "longer", "mixed"],
)
def test_bert_calibrates_at_any_batch_and_length_under_export(bert, name, batches) -> None:
    graph = _calibrated(bert, (_ids(2),), "export", PASSES[name], batches)
    assert graph.meta["lowbit_tracer"] == "export"
    with torch.no_grad():
        expected, out = bert(_ids(2)).last_hidden_state, graph(_ids(2))[0]
    assert 0 < float((out - expected).norm() / expected.norm()) < 0.2


@pytest.mark.parametrize("name", list(PASSES))
def test_statistics_equal_those_of_a_trace_at_the_calibration_shape(bert, name) -> None:
    """Calibrating a graph traced at (2, 16) with batches of (3, 16) gives the packed weights (and static scales) that
    calibrating a graph traced at (3, 16) gives."""
    batches = [_ids(3)]
    _assert_same_state(
        _calibrated(bert, (_ids(2),), "export", PASSES[name], batches),
        _calibrated(bert, (_ids(3),), "export", PASSES[name], batches),
    )


def _inputs_of(model: nn.Module, path: str, ids: torch.Tensor) -> torch.Tensor:
    """The rows the layer at ``path`` reads in an eager forward of ``ids``."""
    rows = []
    hook = model.get_submodule(path).register_forward_pre_hook(lambda _, args: rows.append(args[0].flatten(0, -2)))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return torch.cat(rows)


@pytest.mark.parametrize(
    "name, path", [("bert", "encoder.layer.0.attention.self.query"), ("llama", "model.layers.0.mlp.down_proj")]
)
@pytest.mark.parametrize("length", [9, 24])
def test_hessians_through_a_variant_are_those_of_the_model(request, name, path, length) -> None:
    """A graph traced at (1, 16) calibrated with (3, length) batches (cut into batches of 1, each run at its length)
    gives the Hessian a graph traced at (1, length) gives, bit for bit, and that of eager's layer inputs."""
    model = request.getfixturevalue(name)
    gm = trace(model, (_ids(1),), tracer="export")
    batch = [((_ids(3, length),), {})]
    add_calibration_variants(model, gm, batch)
    assert list(gm.meta[VARIANTS]) == [((1, length),)]
    hessian = capture_hessian(gm, path, 1, batch).hessian
    at_shape = trace(model, (_ids(1, length),), tracer="export")
    assert torch.equal(hessian, capture_hessian(at_shape, path, 1, batch).hessian)
    x = _inputs_of(model, path, _ids(3, length))
    torch.testing.assert_close(hessian, 2 * x.T @ x / x.shape[0])


def test_views_left_out_at_a_batch_of_one_run_as_the_identity(llama) -> None:
    """torch.export leaves out an ``expand`` that keeps a dimension of size 1: a graph traced at batch 2 takes batches
    of 1 through a trace at batch 1 all the same, with the Hessian of that trace."""
    gm = trace(llama, (_ids(2),), tracer="export")
    batches = [((_ids(1),), {}), ((_ids(1, 9),), {})]
    add_calibration_variants(llama, gm, batches)
    assert all(variant.identities for variant in gm.meta[VARIANTS].values())
    path = "model.layers.0.self_attn.o_proj"
    for batch in batches:
        at_shape = trace(llama, batch[0], tracer="export")
        hessian = capture_hessian(gm, path, 1, [batch]).hessian
        assert torch.equal(hessian, capture_hessian(at_shape, path, 1, [batch]).hessian)


@pytest.mark.parametrize("name", ["gptq", "awq"])
def test_llama_calibrates_at_any_batch_and_length(llama, name) -> None:
    graph = _calibrated(llama, (_ids(1),), "export", PASSES[name], [_ids(3), _ids(2, 9), _ids(2, 40)])
    with torch.no_grad():
        expected, out = llama(_ids(1)).logits, graph(_ids(1))[0]
    assert 0 < float((out - expected).norm() / expected.norm()) < 0.2


class TokenAttention(nn.Module):
    """Token and position embeddings, self-attention and a linear: torch.fx traces it, and the attention's
    decomposition (`lowbit.ir.decompose`) writes the sequence length into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, 32), nn.Embedding(32, 32)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.fc = nn.Linear(32, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("name", list(PASSES))
def test_token_attention_calibrates_at_any_batch_and_length(tracer, name) -> None:
    torch.manual_seed(0)
    model = TokenAttention().eval()
    batches = [_ids(3), _ids(2, 9), _ids(1, 24)]
    graph = _calibrated(model, (_ids(2),), tracer, PASSES[name], batches)
    assert graph.meta["lowbit_tracer"] == tracer and graph.meta[VARIANTS]
    with torch.no_grad():
        expected, out = model(_ids(2)), graph(_ids(2))
    out = out[0] if isinstance(out, tuple) else out
    assert 0 < float((out - expected).norm() / expected.norm()) < 0.2
    _assert_same_state(graph, _calibrated(model, (_ids(2, 9),), tracer, PASSES[name], batches))
    with pytest.raises(CalibrationError, match=r"ids \(1, 40\)\): the model does not run at this shape: IndexError"):
        add_calibration_variants(model, trace(model, (_ids(2),), tracer=tracer), [((_ids(1, 40),), {})])


def test_a_causal_lm_compiled_with_dynamic_shapes_calibrates_at_any_batch_and_length(llama) -> None:
    compiled = lowbit.compile(
        llama,
        (_ids(1),),
        passes=["gptq:bits=4,group_size=32"],
        calibration=[(_ids(3, 9),), (_ids(2, 24),)],
        dynamic_shapes={"input_ids": {0: (1, 2), 1: (1, 64)}},
        target="torch",
    )
    assert sorted(compiled.graph.meta[VARIANTS]) == [((1, 9),), ((1, 24),)]
    assert 0 < compiled.report.rel_error < 0.2


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("name", list(PASSES))
def test_cnn_calibrates_at_any_batch_and_image_size(cnn, tracer, name) -> None:
    passes = [p.replace("group_size=32", "group_size=-1") for p in PASSES[name]]
    graph = _calibrated(cnn, (_images(2),), tracer, passes, [_images(3), _images(1, 12), _images(4, 6)])
    assert graph.meta["lowbit_tracer"] == tracer
    with torch.no_grad():
        expected, out = cnn(_images(2)), graph(_images(2))
    out = out[0] if isinstance(out, tuple) else out
    assert 0 < float((out - expected).norm() / expected.norm()) < 0.3


def test_cnn_statistics_equal_those_of_a_trace_at_the_calibration_shape(cnn) -> None:
    batches = [_images(3, 12)]
    _assert_same_state(
        _calibrated(cnn, (_images(2),), "export", PASSES["gptq"], batches),
        _calibrated(cnn, (_images(3, 12),), "export", PASSES["gptq"], batches),
    )


class Flattening(nn.Module):
    """A classifier whose linear takes the flattened 8 × 8 feature map: no other image size runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_shapes_the_model_rejects_are_named(bert, tracer) -> None:
    gm = trace(Flattening(), (_images(1),), tracer=tracer)
    with pytest.raises(CalibrationError, match=r"calibration batch 1 \(inputs x \(2, 3, 9, 9\)\): the model does not"):
        add_calibration_variants(Flattening(), gm, [((_images(2),), {}), ((_images(2, 9),), {})])
    if tracer == "export":
        gm = trace(bert, (_ids(1),), tracer="export")
        with pytest.raises(CalibrationError, match=r"input_ids \(2, 40\)\): the model does not run at this shape"):
            add_calibration_variants(bert, gm, [((_ids(2, 40),), {})])


def test_a_batch_without_its_trace_is_named(bert) -> None:
    gm = trace(bert, (_ids(2),), tracer="export")
    with pytest.raises(CalibrationError, match=r"input_ids \(3, 16\) does not fit the graph .* input_ids \(2, 16\)"):
        fit_batches(gm, [((_ids(3),), {})])
    pipeline = Pipeline(["gptq:bits=4,group_size=32"])
    with pytest.raises(CalibrationError, match=r"calibration batch 1: inputs input_ids \(3, 16\) does not fit"):
        pipeline(gm, calibration=[(_ids(4),), (_ids(3),)], example_inputs=(_ids(2),))
    assert not pipeline.report.passes, "checked before any pass"


def test_bert_compiled_for_x86_calibrates_at_any_batch_and_length(bert) -> None:
    """The x86 target builds the graph traced at the example's shapes; GPTQ and the static int8 scales are
    calibrated on batches of other sizes and lengths through traces at their shapes."""
    compiled = lowbit.compile(
        bert,
        (_ids(2),),
        passes=["gptq:bits=4,group_size=32", "quantize_activations:dynamic=false"],
        calibration=[(_ids(3),), (_ids(1, 9),), (_ids(2, 24),)],
        target="x86",
    )
    assert [p.name for p in compiled.report.pipeline.passes] == ["gptq", "quantize_activations"]
    assert sorted(compiled.graph.meta[VARIANTS]) == [((1, 9),), ((2, 24),), ((3, 16),)]
    assert 0 < compiled.report.rel_error < 0.2


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("spec", ["prune_rd:sparsity=0.5,grid=4", "weight_norm:init=data"])
def test_pruning_and_data_init_calibrate_at_any_batch_and_image_size(cnn, tracer, spec) -> None:
    """The other calibrating passes: prune_rd's distortion curves and weight_norm's data-dependent init (on the first
    batch), with the result of a graph traced at the calibration shape."""
    results = []
    for example in (_images(2), _images(3, 12)):
        torch.manual_seed(0)  # weight_norm draws its directions from the global generator
        graph = _calibrated(copy.deepcopy(cnn), (example,), tracer, [spec], [_images(3, 12), _images(1), _images(4, 6)])
        assert graph.meta["lowbit_tracer"] == tracer
        results.append(graph)
    _assert_same_state(*results)
