"""The packed convolution ops: ``conv_packed`` is the dequantized-weight convolution, ``conv_packed_a8`` its integer
arithmetic bit for bit, for every geometry (grouped, depthwise, strided, dilated, padded, 1-D)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conv_models import TinyCNN

from lowbit.errors import VerificationError
from lowbit.ir import ops_a8, ops_conv, packing
from lowbit.ir.annotations import annotate, get_meta
from lowbit.ir.verify import verify
from lowbit.passes import Pipeline
from lowbit.passes.quant import RTN, quantize_weight

#: (dims, in channels, out channels, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (2, 4, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 8, 8, (3, 3), (2, 2), (0, 0), (1, 1), 2),
    (2, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8),
    (2, 4, 6, (3, 3), (1, 1), (2, 2), (2, 2), 1),
    (2, 4, 8, (1, 3), (1, 2), (0, 1), (1, 1), 1),
    (1, 4, 8, (5,), (2,), (2,), (1,), 1),
    (1, 4, 8, (3,), (1,), (3,), (3,), 2),
]


def _layer(geometry: tuple, bits: int, group_size: int, symmetric: bool, seed: int = 0) -> tuple:
    dims, c_in, c_out, kernel, stride, padding, dilation, groups = geometry
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in // groups, *kernel, generator=generator)
    qw = quantize_weight(weight.flatten(1), bits, group_size, symmetric)
    bias = torch.randn(c_out, generator=generator)
    x = torch.randn(2, c_in, *([9] * dims), generator=generator)
    args = (x, qw.pack(), qw.scales, qw.zeros, None, bias, bits, qw.group_size, qw.in_features)
    return args + (list(kernel), list(stride), list(padding), list(dilation), groups), qw, weight.shape


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: tuple) -> torch.Tensor:
    dims, _, _, _, stride, padding, dilation, groups = geometry
    return (F.conv1d if dims == 1 else F.conv2d)(x, weight, bias, stride, padding, dilation, groups)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 8, False), (8, -1, True), (3, 5, True)])
def test_conv_packed_is_the_dequantized_weight_convolution(geometry, bits, group_size, symmetric) -> None:
    args, qw, shape = _layer(geometry, bits, group_size, symmetric)
    expected = _conv(args[0], qw.dequantize().view(shape), args[5], geometry)
    assert torch.equal(ops_conv.conv_packed(*args), expected)


def _integer_reference(args: tuple, qw, shape: torch.Size, step: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """``(Σ_g scale_g · conv(x_int, (q − z)|_g)) · Δ + bias``: each group's integer convolution exactly (float64
    sums of integers), the groups added in order in float32."""
    x_int = torch.clamp(torch.round(args[0] / step), -128, 127).to(torch.float64)
    codes = qw.codes.to(torch.float64)
    if qw.zeros is None:
        centered = codes - packing.default_zero(qw.bits)
    else:
        centered = codes - qw.zeros.to(torch.float64).repeat_interleave(qw.group_size, 1)[:, : qw.in_features]
    y = None
    for g in range(qw.scales.shape[1]):
        mask = torch.zeros(qw.in_features, dtype=torch.float64)
        mask[g * qw.group_size : (g + 1) * qw.group_size] = 1
        exact = _conv(x_int, (centered * mask).view(shape), None, geometry).to(torch.float32)
        term = exact * qw.scales[:, g].view(1, -1, *[1] * (exact.dim() - 2))
        y = term if y is None else y + term
    return y * step + args[5].view(1, -1, *[1] * (y.dim() - 2))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 8, False), (8, -1, True), (2, 4, True)])
def test_conv_packed_a8_equals_its_integer_reference_bit_for_bit(geometry, bits, group_size, symmetric) -> None:
    args, qw, shape = _layer(geometry, bits, group_size, symmetric, seed=1)
    step = (args[0].abs().max() / 127).to(torch.float32)
    out = ops_conv.conv_packed_a8(*args, step)
    assert torch.equal(out, _integer_reference(args, qw, shape, step, geometry))
    fake = _conv(ops_a8.fake_quantize_activation(args[0], step), qw.dequantize().view(shape), args[5], geometry)
    torch.testing.assert_close(out, fake, rtol=1e-5, atol=1e-5)


def test_conv_packed_gradients_flow_to_the_input_and_bias() -> None:
    args, qw, shape = _layer(GEOMETRIES[1], 4, 8, False)
    x, bias = args[0].clone().requires_grad_(), args[5].clone().requires_grad_()
    ops_conv.conv_packed(x, *args[1:5], bias, *args[6:]).square().sum().backward()
    x_ref, bias_ref = args[0].clone().requires_grad_(), args[5].clone().requires_grad_()
    _conv(x_ref, qw.dequantize().view(shape), bias_ref, GEOMETRIES[1]).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, bias_ref.grad)


def test_conv_packed_rejects_inputs_that_do_not_match_the_weight() -> None:
    args, _, _ = _layer(GEOMETRIES[0], 4, 8, False)
    with pytest.raises(packing.PackedFormatError, match="does not match in_features"):
        ops_conv.conv_packed(torch.randn(2, 5, 9, 9), *args[1:])
    with pytest.raises(packing.PackedFormatError, match="takes a 4-D input"):
        ops_conv.conv_packed(torch.randn(2, 4, 9), *args[1:])


def test_the_verifier_checks_packed_convolutions() -> None:
    gm = Pipeline([RTN(bits=4, group_size=8)])(fx.symbolic_trace(TinyCNN()))
    verify(gm)
    node = next(n for n in gm.graph.nodes if n.target is ops_conv.conv_packed)
    meta = get_meta(node)
    annotate(node, meta.layer, quant=dataclasses.replace(meta.quant, bits=2))
    with pytest.raises(VerificationError, match="packed convolution .* computes w4 g8 but is annotated w2"):
        verify(gm)
