"""int8 activations: the ``lowbit::linear_packed_a8`` op and the ``quantize_activations`` pass."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.errors import CalibrationError, PassConfigError, VerificationError
from lowbit.ir import ops, ops_a8, ops_conv
from lowbit.ir.annotations import QuantScheme, annotate, get_meta
from lowbit.ir.packing import PackedFormatError, dequantize, num_groups, pack
from lowbit.ir.verify import verify
from lowbit.passes import PassContext, Pipeline, lookup
from lowbit.passes.quant import (
    RTN,
    Binary,
    PackedConv,
    PackedConvA8,
    PackedLinear,
    PackedLinearA8,
    QuantizeActivations,
    Ternary,
)
from lowbit.passes.quant.rewrite import ConvGeometry

from helpers import LMHeadMLP


def make_packed(
    rows: int, cols: int, bits: int, group_size: int, *, zeros: bool, act_order: bool = False, seed: int = 0
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    groups = num_groups(cols, group_size)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.uint8)
    return {
        "qweight": pack(codes, bits),
        "scales": torch.rand(rows, groups, generator=gen) * 0.1 + 0.01,
        "zeros": torch.randint(0, 1 << bits, (rows, groups), generator=gen).float() if zeros else None,
        "g_idx": (torch.randperm(cols, generator=gen) // group_size).to(torch.int32) if act_order else None,
        "bits": bits,
        "group_size": group_size,
        "in_features": cols,
    }


def call(x: torch.Tensor, layout: dict, bias: torch.Tensor | None, act_scale: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.lowbit.linear_packed_a8(
        x,
        layout["qweight"],
        layout["scales"],
        layout["zeros"],
        layout["g_idx"],
        bias,
        layout["bits"],
        layout["group_size"],
        layout["in_features"],
        act_scale,
    )


def bitnet_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """docs/methods.md (Int8 activations): s = 127 / max(max|x|, 2⁻¹¹⁹) per token, clamp(round(x·s), −128, 127) / s."""
    s = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=2.0**-119)
    return (x * s).round().clamp(-128, 127) / s


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(("cols", "group_size", "act_order"), [(32, 32, False), (37, 16, False), (24, 8, True)])
@pytest.mark.parametrize("zeros", [False, True])
def test_dynamic_op_is_linear_on_fake_quantized_input_and_dequantized_weight(
    bits, cols, group_size, act_order, zeros
) -> None:
    layout = make_packed(6, cols, bits, group_size, zeros=zeros, act_order=act_order, seed=bits + cols)
    x, bias = torch.randn(2, 3, cols) * 3, torch.randn(6)
    out = call(x, layout, bias, None)
    expected = F.linear(bitnet_fake_quant(x), dequantize(**layout), bias)
    assert out.shape == (2, 3, 6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, F.linear(x, dequantize(**layout), bias), rtol=1e-6, atol=1e-7)


def test_static_op_uses_the_step_and_clamps_asymmetrically() -> None:
    layout = make_packed(3, 8, 4, 8, zeros=False)
    step = torch.tensor(0.05)
    x = torch.tensor([[10.0, -10.0, 0.024, 0.026, -0.075, 6.35, -6.4, 1.0]])
    codes, scale = ops_a8.quantize_activation(x, step)
    # 10/0.05 = 200 → 127, −200 → −128; 0.48 → 0, 0.52 → 1, −1.5 → −2 (half to even); 127 and −128 exactly
    assert codes.tolist() == [[127, -128, 0, 1, -2, 127, -128, 20]]
    out = call(x, layout, None, step)
    torch.testing.assert_close(out, F.linear(codes * step, dequantize(**layout)), rtol=1e-5, atol=1e-6)


def test_dynamic_codes_reach_127_but_not_minus_128() -> None:
    x = torch.tensor([[-2.0, 1.0, 0.5], [3.0, -3.0, 0.0], [0.0, 0.0, 0.0]])
    codes, _ = ops_a8.quantize_activation(x, None)
    assert codes.tolist() == [[-127, 64, 32], [127, -127, 0], [0, 0, 0]]
    layout = make_packed(2, 3, 2, 3, zeros=False)
    out = call(x, layout, torch.ones(2), None)
    assert torch.isfinite(out).all() and torch.equal(out[2], torch.ones(2))  # an all-zero token


def integer_reference(x: torch.Tensor, layout: dict, bias: torch.Tensor, act_scale: torch.Tensor | None) -> np.ndarray:
    """The op's documented order of operations, in numpy with int64 accumulation."""
    xf = x.numpy().astype(np.float32)
    if act_scale is None:
        s = np.float32(127) / np.maximum(np.abs(xf).max(axis=-1, keepdims=True), np.float32(2.0**-119))
        x_int = np.clip(np.round(xf * s), -128, 127).astype(np.int64)
    else:
        step = np.float32(act_scale.item())
        x_int = np.clip(np.round(xf / step), -128, 127).astype(np.int64)
    codes = (
        dequantize(
            layout["qweight"],
            torch.ones_like(layout["scales"]),
            torch.zeros_like(layout["scales"]),
            None,
            layout["bits"],
            layout["group_size"],
            layout["in_features"],
        )
        .numpy()
        .astype(np.int64)
    )
    zeros = layout["zeros"].numpy().astype(np.int64)
    scales = layout["scales"].numpy()
    group = layout["group_size"]
    y = np.zeros((x_int.shape[0], codes.shape[0]), dtype=np.float32)
    for g in range(scales.shape[1]):
        cols = slice(g * group, (g + 1) * group)
        acc = x_int[:, cols] @ (codes[:, cols] - zeros[:, g : g + 1]).T
        y = y + acc.astype(np.float32) * scales[:, g]
    y = y / s if act_scale is None else y * step
    return y + bias.numpy()


@pytest.mark.parametrize("static", [False, True])
def test_order_of_operations_is_reproducible_bit_for_bit(static: bool) -> None:
    layout = make_packed(16, 64, 4, 16, zeros=True, seed=7)
    x, bias = torch.randn(5, 64) * 2, torch.randn(16)
    act_scale = torch.tensor(0.03) if static else None
    assert np.array_equal(call(x, layout, bias, act_scale).numpy(), integer_reference(x, layout, bias, act_scale))


def test_half_precision_input_keeps_its_dtype() -> None:
    layout = make_packed(4, 16, 2, 8, zeros=False)
    x = torch.randn(3, 16)
    out = call(x.to(torch.bfloat16), layout, None, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), call(x.to(torch.bfloat16).float(), layout, None, None), rtol=1e-2, atol=1e-2
    )


def test_opcheck_fake_impl_and_straight_through_gradient() -> None:
    layout = make_packed(4, 20, 3, 8, zeros=True)
    args = (layout["qweight"], layout["scales"], layout["zeros"], layout["g_idx"])
    tail = (layout["bits"], layout["group_size"], layout["in_features"])
    torch.library.opcheck(ops_a8.linear_packed_a8, (torch.randn(3, 20), *args, torch.randn(4), *tail, None))
    torch.library.opcheck(ops_a8.linear_packed_a8, (torch.randn(3, 20), *args, None, *tail, torch.tensor(0.02)))
    x = torch.randn(3, 20, requires_grad=True)
    call(x, layout, None, None).sum().backward()
    torch.testing.assert_close(x.grad, dequantize(**layout).sum(dim=0).expand(3, 20))


def test_op_rejects_bad_shapes() -> None:
    layout = make_packed(5, 12, 4, 4, zeros=False)
    with pytest.raises(PackedFormatError, match="does not end in in_features=12"):
        call(torch.randn(3, 11), layout, None, None)
    with pytest.raises(PackedFormatError, match="act_scale must be a float32 scalar tensor"):
        call(torch.randn(3, 12), layout, None, torch.ones(3))


# ---------------------------------------------------------------- the pass


class MLP(LMHeadMLP):
    def __init__(self) -> None:
        super().__init__(32, 64, 48, 8)


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def a8_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is ops_a8.linear_packed_a8]


def test_registered_and_declared() -> None:
    assert lookup("quantize_activations") is QuantizeActivations
    assert QuantizeActivations.after_pack and QuantizeActivations.stage == "convert"
    assert not QuantizeActivations().requires_calibration
    assert QuantizeActivations(dynamic=False).requires_calibration
    assert QuantizeActivations(overrides={"fc1": {"dynamic": False}}).requires_calibration


WEIGHT_PASSES = {
    "w8a8": lambda: RTN(bits=8, group_size=-1, ignore=["lm_head"]),
    "w4a8": lambda: RTN(bits=4, group_size=16, symmetric=False, ignore=["lm_head"]),
    "w2a8": lambda: RTN(bits=2, group_size=16, ignore=["lm_head"]),
    "w1.58a8": lambda: Ternary(ignore=["lm_head"]),
    "w1a8": lambda: Binary(ignore=["lm_head"]),
}


@pytest.mark.parametrize("scheme", sorted(WEIGHT_PASSES))
def test_composes_with_every_weight_format(mlp: MLP, scheme: str) -> None:
    x = torch.randn(6, 32)
    pipeline = Pipeline([WEIGHT_PASSES[scheme](), QuantizeActivations()])
    gm = pipeline(fx.symbolic_trace(mlp))
    assert [get_meta(n).layer for n in a8_nodes(gm)] == ["fc1", "fc2"]
    assert not [n for n in gm.graph.nodes if n.target is ops.linear_packed]
    for node in a8_nodes(gm):
        assert get_meta(node).quant.act_bits == 8 and get_meta(node).quant.describe().endswith(" a8")
        assert isinstance(gm.get_submodule(get_meta(node).layer), PackedLinearA8)
    (skipped,) = pipeline.report.passes[1].skipped
    assert skipped.layer == "lm_head" and "not packed" in skipped.reason
    weights = lowbit.dequantized_weights(gm)
    h = torch.relu(F.linear(bitnet_fake_quant(x), weights["fc1"], mlp.fc1.bias))
    h = torch.relu(F.linear(bitnet_fake_quant(h), weights["fc2"], mlp.fc2.bias))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), mlp.lm_head(h), rtol=1e-4, atol=1e-5)


def test_static_scale_is_calibrated_absmax_over_127(mlp: MLP) -> None:
    batches = [(torch.randn(4, 32),), (torch.randn(3, 32) * 2,)]
    x = torch.randn(2, 32)
    gm = Pipeline([RTN(bits=8, group_size=-1), QuantizeActivations(dynamic=False, ignore=["lm_head"])])(
        fx.symbolic_trace(mlp), calibration=batches, example_inputs=(x,)
    )
    weights = lowbit.dequantized_weights(gm)
    with torch.no_grad():
        # Calibration runs the graph as the weight pass left it: fc1 has int8 weights, float inputs.
        fc1_in = torch.cat([b[0] for b in batches])
        fc2_in = torch.relu(F.linear(fc1_in, weights["fc1"], mlp.fc1.bias))
    assert gm.get_submodule("fc1").act_scale == fc1_in.abs().max() / 127
    torch.testing.assert_close(gm.get_submodule("fc2").act_scale, fc2_in.abs().max() / 127)
    assert not isinstance(gm.get_submodule("lm_head"), PackedLinearA8)  # ignored: weight-only int8
    step = gm.get_submodule("fc1").act_scale
    first = F.linear((x / step).round().clamp(-128, 127) * step, weights["fc1"], mlp.fc1.bias)
    with torch.no_grad():
        torch.testing.assert_close(gm.fc1(x), first, rtol=1e-5, atol=1e-6)
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(ops.linear_packed) == 1


def test_percentile_observer_clips_outliers(mlp: MLP) -> None:
    x = torch.randn(64, 32)
    x[0, 0] = 100.0
    traced = fx.symbolic_trace(mlp)
    scales = {}
    for observer in ("absmax", "percentile"):
        gm = Pipeline([RTN(bits=8), QuantizeActivations(dynamic=False, observer=observer, percentile=99.0)])(
            traced, calibration=[(x,)], example_inputs=(x,)
        )
        scales[observer] = float(gm.get_submodule("fc1").act_scale)
    assert scales["absmax"] == pytest.approx(100 / 127)
    expected = float(x.abs().flatten().kthvalue(int(np.ceil(0.99 * x.numel()))).values) / 127
    assert scales["percentile"] == pytest.approx(expected)


def test_static_without_calibration_fails_before_running(mlp: MLP) -> None:
    x = torch.randn(2, 32)
    with pytest.raises(CalibrationError, match="quantize_activations need calibration data"):
        lowbit.compile(mlp, (x,), passes=[RTN(bits=8), QuantizeActivations(dynamic=False)], target="torch")
    gm = Pipeline([RTN(bits=8)])(fx.symbolic_trace(mlp))
    with pytest.raises(CalibrationError, match="static activation scales .* need calibration data; layers: fc1"):
        QuantizeActivations(dynamic=False).run(gm, PassContext())


def test_nan_calibration_activations_name_the_layer() -> None:
    class LogNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.log(self.fc1(x)))

    net = LogNet().eval()
    x = torch.randn(16, 8)
    with pytest.raises(CalibrationError, match="layer 'fc2': its calibration inputs contain NaN or Inf"):
        lowbit.compile(
            net, (x,), passes=[RTN(bits=8), QuantizeActivations(dynamic=False)], calibration=[(x,)], target="torch"
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 4}, "bits=4 is not supported"),
        ({"granularity": "per_tensor"}, "granularity='per_tensor' needs dynamic=False"),
        ({"dynamic": False, "granularity": "per_token"}, "granularity='per_token' needs dynamic=True"),
        ({"symmetric": False}, "symmetric=False is not supported"),
        ({"observer": "percentile"}, "observer='percentile' applies to static scales"),
        ({"dynamic": False, "percentile": 0.0}, "percentile=0.0 is out of range"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(PassConfigError, match=message):
        QuantizeActivations(**options)


def test_unpacked_layers_are_reported_as_skipped(mlp: MLP) -> None:
    pipeline = Pipeline([QuantizeActivations()])
    out = pipeline(fx.symbolic_trace(mlp))
    assert not a8_nodes(out) and not pipeline.report.passes[0].changed
    assert [r.layer for r in pipeline.report.passes[0].skipped] == ["fc1", "fc2", "lm_head"]


def test_export_and_load_keep_static_scales(mlp: MLP, tmp_path) -> None:
    x = torch.randn(3, 32)
    compiled = lowbit.compile(
        mlp,
        (x,),
        passes=[Ternary(), QuantizeActivations(dynamic=False)],
        calibration=[(torch.randn(8, 32),)],
        target="torch",
    )
    loaded = lowbit.load(compiled.export(tmp_path / "model"))
    assert torch.equal(loaded(x), compiled(x))
    assert list(lowbit.dequantized_weights(loaded)) == ["fc1", "fc2", "lm_head"]
    assert [get_meta(n).quant.act_bits for n in a8_nodes(loaded.graph)] == [8, 8, 8]


def test_verifier_checks_the_annotation(mlp: MLP) -> None:
    gm = Pipeline([RTN(bits=4, group_size=16), QuantizeActivations()])(fx.symbolic_trace(mlp))
    node = a8_nodes(gm)[0]
    annotate(node, "fc1", quant=QuantScheme(bits=4, group_size=16, symmetric=True, method="rtn"))
    with pytest.raises(VerificationError, match="computes w4 g16 a8 but is annotated w4 g16 sym \\[rtn\\]"):
        verify(gm)


def _arguments_by_name(module: PackedLinear) -> dict:
    """Every buffer and attribute of a packed layer under the name of the op argument it feeds."""
    named = {**dict(module.named_buffers()), "bits": module.bits, "group_size": module.group_size}
    named["in_features"] = module.in_features
    if isinstance(module, PackedConv):
        named.update({f.name: getattr(module.geometry, f.name) for f in dataclasses.fields(ConvGeometry)})
    return named


def test_packed_layers_pass_their_ops_arguments_in_schema_order() -> None:
    """``packed_args`` (and ``act_scale``) follow each op's arguments after ``x``, for all four layer kinds."""
    layout = make_packed(4, 18, 4, 9, zeros=True, act_order=True)
    linear = PackedLinear(*(layout[k] for k in ("qweight", "scales", "zeros", "g_idx")), torch.randn(4), 4, 9, 18)
    conv = PackedConv(linear, ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1), 2))
    step = torch.tensor(0.05)
    layers = [
        (linear, ops.linear_packed, ()),
        (PackedLinearA8(linear, step), ops_a8.linear_packed_a8, (step,)),
        (conv, ops_conv.conv_packed, ()),
        (PackedConvA8(conv, step), ops_conv.conv_packed_a8, (step,)),
    ]
    for module, op, tail in layers:
        names = [argument.name for argument in op._schema.arguments[1:]]
        args = (*module.packed_args(), *tail)
        named = _arguments_by_name(module)
        assert len(args) == len(names)
        for name, value in zip(names, args):
            expected = named[name]
            assert value is expected if isinstance(value, torch.Tensor) else value == type(value)(expected), name
