"""Packed convolutions on the TVM backend: an x86 build of a small quantized CNN matches the torch target; weight-only
packed convolutions and the int8 ones no int8 kernel takes are reported as fallbacks with their reason."""

from __future__ import annotations

import pytest
import torch
from conv_models import TinyCNN, TinyConv1d, Unsupported, images, sequences, trained

import lowbit
from lowbit.passes.quant import RTN, QuantizeActivations


@pytest.mark.parametrize("int8", [False, True], ids=["weight-only", "int8-activations"])
def test_x86_build_of_a_quantized_cnn_matches_the_torch_target(int8: bool) -> None:
    net = trained(TinyCNN())
    calibration = images(2)
    x = calibration[0][0]

    def passes() -> list:
        return [RTN(bits=4, group_size=16), *([QuantizeActivations(dynamic=False)] if int8 else [])]

    reference = lowbit.compile(net, (x,), passes=passes(), calibration=calibration, target="torch")
    compiled = lowbit.compile(net, (x,), passes=passes(), calibration=calibration, target="x86", tune=False)
    y = images(1, seed=5)[0][0]
    torch.testing.assert_close(compiled(y), reference(y), rtol=1e-4, atol=1e-5)
    convs = [item for item in compiled.report.fallbacks if "convolution" in item]
    if int8:  # the stem's 27 columns do not hold whole groups of 16; grouped convolutions have no int8 kernel
        assert [item.split(" ")[0] for item in convs] == ["stem", "grouped"]
        assert "not a multiple of group_size=16" in convs[0] and "grouped int8 convolution" in convs[1]
    else:
        assert len(convs) == 6
        assert all("weight-only packed convolution" in item for item in convs)


def test_x86_build_of_packed_conv1d() -> None:
    net = TinyConv1d().eval()
    x = sequences(1)[0][0]
    passes = [RTN(bits=8, group_size=-1)]
    reference = lowbit.compile(net, (x,), passes=passes, target="torch")
    compiled = lowbit.compile(net, (x,), passes=[RTN(bits=8, group_size=-1)], target="x86", tune=False)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)


def test_convs_without_a_packed_form_stay_fp32_in_an_x86_build() -> None:
    torch.manual_seed(0)
    net = Unsupported().eval()
    x = torch.randn(1, 2, 4, 6, 6)
    compiled = lowbit.compile(net, (x,), passes=[RTN(bits=8, group_size=-1)], target="x86", tune=False)
    reference = lowbit.compile(net, (x,), passes=[RTN(bits=8, group_size=-1)], target="torch")
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)
    skipped = {r.layer: r.reason for r in compiled.report.pipeline.passes[0].skipped}
    assert set(skipped) == {"conv3d", "up"} and "transposed" in skipped["up"]
    assert [item.split(" ")[0] for item in compiled.report.fallbacks] == ["conv"]
