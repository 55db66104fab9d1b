"""Every weight quantizer on small CNNs: convolutions packed into ``lowbit.conv_packed`` compute the convolution of
their dequantized weight; GPTQ's conv Hessian is the unfolded inputs'; AWQ folds its scales where it may; QAT converts
exactly; int8 activations; convolutions without a packed form stay fp32 with a reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from conv_models import TinyCNN, TinyConv1d, Unsupported, images, sequences, trained

import lowbit
from lowbit.errors import CalibrationError, PassConfigError
from lowbit.inspection import dequantized_weights
from lowbit.ir import ops_conv, packing
from lowbit.passes import Pipeline
from lowbit.passes.quant import (
    AWQ,
    GPTQ,
    RTN,
    Binary,
    ConvertQAT,
    FakeQuantize,
    QuantizeActivations,
    Ternary,
    quantize_weight,
)
from lowbit.passes.quant.rewrite import PackedConv
from lowbit.passes.selection import LayerOverrides

CONVS = ("stem", "grouped", "depthwise", "strided", "dilated", "padded")


def _dequantized_model(model: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """``model`` with each packed layer's weight replaced by the weight its packed form decodes to."""
    reference = copy.deepcopy(model)
    for name, module in gm.named_modules():
        if hasattr(module, "qweight"):
            weight = packing.dequantize(
                module.qweight,
                module.scales,
                module.zeros,
                module.g_idx,
                module.bits,
                module.group_size,
                module.in_features,
            )
            layer = reference.get_submodule(name)
            layer.weight.data = weight.view_as(layer.weight)
    return reference


def _packed_convs(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.target in (ops_conv.conv_packed, ops_conv.conv_packed_a8)]


@pytest.mark.parametrize(
    "make_pass",
    [
        lambda: RTN(bits=4, group_size=16, symmetric=False),
        lambda: RTN(bits=8, group_size=-1),
        lambda: Ternary(),
        lambda: Ternary(granularity="per_group", group_size=8),
        lambda: Binary(),
    ],
    ids=["rtn4", "rtn8", "ternary", "ternary-group", "binary"],
)
@pytest.mark.parametrize(("model", "data"), [(TinyCNN, images), (TinyConv1d, sequences)], ids=["2d", "1d"])
def test_calibration_free_quantizers_pack_every_conv_as_its_dequantized_weight(make_pass, model, data) -> None:
    net = trained(model())
    pipeline = Pipeline([make_pass()])
    gm = pipeline(fx.symbolic_trace(net))
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert len(_packed_convs(gm)) == len(convs)
    assert all(r.action == "quantized" for r in pipeline.report.passes[0].layers)
    x = data(1, seed=7)[0][0]
    torch.testing.assert_close(gm(x), _dequantized_model(net, gm)(x), rtol=1e-5, atol=1e-6)


def test_first_and_last_layer_overrides_by_position() -> None:
    net = trained(TinyCNN())
    pipeline = Pipeline(
        [RTN(bits=4, group_size=8, overrides={"@first:conv": {"bits": 8, "group_size": -1}, "@last:linear": "skip"})]
    )
    gm = pipeline(fx.symbolic_trace(net))
    records = {r.layer: r for r in pipeline.report.passes[0].layers}
    assert records["stem"].stats["bits"] == 8 and records["stem"].stats["group_size"] == 27
    assert all(records[name].stats["bits"] == 4 for name in CONVS[1:])
    assert records["fc"].action == "skipped" and isinstance(gm.fc, nn.Linear)
    assert isinstance(gm.stem, PackedConv)


def test_every_conv_can_be_excluded_by_kind() -> None:
    pipeline = Pipeline([Ternary(overrides={"@conv": "skip"})])
    gm = pipeline(fx.symbolic_trace(trained(TinyCNN())))
    assert _packed_convs(gm) == [] and not isinstance(gm.fc, nn.Linear)
    assert {r.layer for r in pipeline.report.passes[0].skipped} == set(CONVS)


def test_positional_override_keys() -> None:
    layers = [("stem", "conv"), ("body", "conv"), ("proj", "linear"), ("fc", "linear")]
    bound = LayerOverrides.from_mapping({"@first:conv": 1, "@last": 2, "@first:linear": 3, "body": 4}).bind(layers)
    assert [bound.lookup(name) for name, _ in layers] == [1, 4, 3, 2]
    assert LayerOverrides.from_mapping({"@last:conv": 1}).bind([("fc", "linear")]).rules == ()
    every_conv = LayerOverrides.from_mapping({"@conv": "skip"}).bind(layers)
    assert [every_conv.lookup(name) for name, _ in layers] == ["skip", "skip", None, None]
    with pytest.raises(PassConfigError, match="positions are @first and @last"):
        RTN(overrides={"@middle": "skip"})


def _layer_error(conv: nn.Module, weight: torch.Tensor, inputs: list[torch.Tensor]) -> float:
    """``‖conv(x; W − Q)‖ / ‖conv(x; W)‖`` over ``inputs`` (no bias)."""
    run = F.conv1d if conv.weight.dim() == 3 else F.conv2d

    def out(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return run(x, w.view_as(conv.weight), None, conv.stride, conv.padding, conv.dilation, conv.groups)

    weight, reference_weight = weight.detach(), conv.weight.detach()
    error = sum(out(reference_weight - weight.view_as(reference_weight), x).square().sum() for x in inputs)
    reference = sum(out(reference_weight, x).square().sum() for x in inputs)
    return float((error / reference).sqrt())


@pytest.mark.parametrize(
    "make_conv",
    [
        lambda: nn.Conv2d(6, 16, 3, padding=1),
        lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
        lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
        lambda: nn.Conv1d(6, 12, 5, padding=2),
    ],
    ids=["plain", "grouped-strided", "depthwise-dilated", "conv1d"],
)
def test_gptq_conv_hessian_is_the_unfolded_inputs_and_beats_rtn(make_conv) -> None:
    """The convs are built after seeding (not at collection, where their weights would depend on the tests
    imported before)."""
    torch.manual_seed(0)
    conv = make_conv()
    net = nn.Sequential(conv).eval()
    shape = (2, conv.in_channels) + (10,) * (conv.weight.dim() - 2)
    correlated = torch.randn(conv.in_channels, conv.in_channels) / 2 + torch.eye(conv.in_channels)
    batches = [(torch.einsum("bc...,cd->bd...", torch.randn(shape), correlated),) for _ in range(3)]
    pipeline = Pipeline([GPTQ(bits=3, group_size=8, mse=0)])
    gm = pipeline(fx.symbolic_trace(net), calibration=batches, example_inputs=batches[0])
    (record,) = pipeline.report.passes[0].layers
    packed = gm.get_submodule("0")
    quantized = packing.dequantize(
        packed.qweight, packed.scales, packed.zeros, packed.g_idx, packed.bits, packed.group_size, packed.in_features
    )
    inputs = [b[0] for b in batches]
    measured = _layer_error(conv, quantized, inputs)
    rtn = quantize_weight(conv.weight.detach().flatten(1), 3, 8, False).dequantize()
    assert record.stats["output_error"] == pytest.approx(measured, rel=1e-3)
    assert record.stats["rtn_output_error"] == pytest.approx(_layer_error(conv, rtn, inputs), rel=1e-3)
    assert measured < _layer_error(conv, rtn, inputs)
    x = torch.randn(shape)
    torch.testing.assert_close(gm(x), _dequantized_model(net, gm)(x), rtol=1e-5, atol=1e-6)


def test_gptq_quantizes_every_conv_of_a_small_cnn() -> None:
    net = trained(TinyCNN())
    pipeline = Pipeline([GPTQ(bits=4, group_size=16, overrides={"@first:conv": {"bits": 8}})])
    gm = pipeline(fx.symbolic_trace(net), calibration=images(2), example_inputs=images(1)[0])
    records = {r.layer: r for r in pipeline.report.passes[0].layers}
    assert len(_packed_convs(gm)) == 6 and records["stem"].stats["bits"] == 8
    assert all(records[name].stats["output_error"] <= records[name].stats["rtn_output_error"] for name in CONVS)


class BlockCNN(nn.Module):
    """conv → batch norm → relu → conv → relu → conv: AWQ folds into the batch norm and the middle convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        return self.conv3(F.relu(self.conv2(x)))


def test_awq_folds_conv_scales_upstream_and_leaves_the_float_model_unchanged() -> None:
    net = trained(BlockCNN())
    gm = fx.symbolic_trace(copy.deepcopy(net))
    infos = {i["group"]: i for i in AWQ(bits=4, group_size=8).apply_scales(gm, images(2), images(1)[0])}
    assert infos["conv2"]["scale"] == "folded into BatchNorm2d 'bn'"
    assert infos["conv3"]["scale"] == "folded into Conv2d 'conv2'"
    assert infos["conv1"]["scale"].startswith("explicit")  # the graph input has no producer
    assert not torch.equal(gm.conv2.weight, net.conv2.weight)
    x = images(1, seed=4)[0][0]
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-5)


def test_awq_packs_convs_and_skips_grouped_ones_with_a_reason() -> None:
    net = trained(TinyCNN())
    pipeline = Pipeline([AWQ(bits=4, group_size=16)])
    gm = pipeline(fx.symbolic_trace(net), calibration=images(2), example_inputs=images(1)[0])
    records = {r.layer: r for r in pipeline.report.passes[0].layers}
    assert {name for name in CONVS if records[name].action == "quantized"} == {"stem", "strided", "dilated", "padded"}
    assert "grouped convolution (groups=4)" in records["grouped"].reason
    assert "groups=16" in records["depthwise"].reason
    assert all(records[n].stats["output_error"] <= records[n].stats["rtn_output_error"] for n in ("strided", "padded"))
    x = images(1, seed=4)[0][0]
    assert torch.isfinite(gm(x)).all() and len(_packed_convs(gm)) == 4


@pytest.mark.parametrize(
    "options",
    [{"bits": 4, "group_size": 16}, {"format": "ternary"}, {"format": "binary"}, {"scale": "lsq", "group_size": 8}],
    ids=["int4", "ternary", "binary", "lsq"],
)
def test_convert_qat_gives_the_fake_quant_outputs_for_convs(options) -> None:
    net = trained(TinyCNN())
    gm = Pipeline([FakeQuantize(**options)])(fx.symbolic_trace(net))
    gm.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)
    gm(images(1)[0][0]).square().mean().backward()
    optimizer.step()
    gm.eval()
    x = images(1, seed=9)[0][0]
    expected = gm(x)
    converted = Pipeline([ConvertQAT()])(gm)
    assert len(_packed_convs(converted)) == 6
    assert torch.equal(converted(x), expected)


def test_static_int8_activations_for_convs() -> None:
    net = trained(TinyCNN())
    calibration = images(3)
    pipeline = Pipeline([RTN(bits=8, group_size=-1), QuantizeActivations()])
    gm = pipeline(fx.symbolic_trace(net), calibration=calibration, example_inputs=calibration[0])
    assert sum(n.target is ops_conv.conv_packed_a8 for n in gm.graph.nodes) == 6
    stem = {r.layer: r for r in pipeline.report.passes[1].layers}["stem"]
    absmax = max(float(b[0].abs().max()) for b in calibration)
    assert stem.stats["act_scale"] == pytest.approx(absmax / 127.0)
    without = Pipeline([RTN(bits=8, group_size=-1), QuantizeActivations()])
    plain = without(fx.symbolic_trace(net))
    assert not any(n.target is ops_conv.conv_packed_a8 for n in plain.graph.nodes)
    reasons = {r.layer: r.reason for r in without.report.passes[1].layers if r.action == "skipped"}
    assert set(reasons) == set(CONVS) and "static per-tensor scale" in reasons["stem"]


@pytest.mark.parametrize(
    "make_pass",
    [lambda: RTN(bits=8), lambda: Ternary(), lambda: GPTQ(bits=4), lambda: AWQ(bits=4), lambda: FakeQuantize()],
    ids=["rtn", "ternary", "gptq", "awq", "fake_quant"],
)
def test_convs_without_a_packed_form_stay_fp32_with_the_reason(make_pass) -> None:
    torch.manual_seed(0)
    net = Unsupported().eval()
    batches = [(torch.randn(1, 2, 4, 6, 6),)]
    pipeline = Pipeline([make_pass()])
    gm = pipeline(fx.symbolic_trace(net), calibration=batches, example_inputs=batches[0])
    records = {r.layer: r for r in pipeline.report.passes[0].layers}
    assert records["conv3d"].action == "skipped" and "Conv3d has no packed form" in records["conv3d"].reason
    assert records["up"].action == "skipped" and "transposed convolution" in records["up"].reason
    assert records["conv"].action != "skipped"
    assert isinstance(gm.conv3d, nn.Conv3d) and isinstance(gm.up, nn.ConvTranspose2d)


@pytest.mark.parametrize(
    "bad, message",
    [
        ((2, 3, 12), r"has shape \(2, 3, 12\), of another rank than the example input's"),
        ((2, 1, 12, 12), r"\(inputs x \(2, 1, 12, 12\)\): the model does not run at this shape: RuntimeError"),
        ((2, 12, 12, 3), r"\(inputs x \(2, 12, 12, 3\)\): the model does not run at this shape: RuntimeError"),
    ],
    ids=["3d", "channels", "nhwc"],
)
def test_calibration_images_of_the_wrong_shape_are_a_calibration_error(bad, message) -> None:
    gm = fx.symbolic_trace(trained(TinyCNN()))
    with pytest.raises(CalibrationError, match=message):
        Pipeline([GPTQ(bits=4)])(gm, calibration=[(torch.randn(bad),)], example_inputs=images(1)[0])


def test_a_compiled_cnn_reloads_with_its_packed_convs(tmp_path) -> None:
    net = trained(TinyCNN())
    calibration = images(2)
    x = calibration[0][0]
    passes = [RTN(bits=4, group_size=8), QuantizeActivations(dynamic=False)]
    compiled = lowbit.compile(net, (x,), passes=passes, calibration=calibration, target="torch")
    compiled.export(tmp_path / "cnn")
    loaded = lowbit.load(tmp_path / "cnn")
    assert torch.equal(loaded(x), compiled(x))
    weights = dequantized_weights(loaded)
    assert weights["depthwise"].shape == net.depthwise.weight.shape
    assert torch.equal(weights["stem"], _dequantized_model(net, compiled.graph).stem.weight)
