"""fp32 vision operators on the CPU: channels-last convolutions, pooling and squeeze-excite against torch.

Shapes are small and odd on purpose: widths with no tile-sized divisor, channel counts that are not a
multiple of the vector width, three input channels.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import tvm
from tvm import relax, te, tirx, topi

import lowbit
from lowbit.backends.tvm import layout, qemu, rpc
from lowbit.backends.tvm.frontend import import_graph, input_specs
from lowbit.backends.tvm.schedule import Convolution, conv_tile
from lowbit.backends.tvm.target import resolve_target
from lowbit.errors import BuildTimeoutError
from lowbit.ir.trace import trace

TOLERANCE = 1e-4


def conv(cin: int, cout: int, kernel: int, **options: object) -> nn.Module:
    return nn.Conv2d(cin, cout, kernel, **options)


def with_bn(module: nn.Module, channels: int, activation: nn.Module) -> nn.Module:
    bn = nn.BatchNorm2d(channels)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 1.5)
    return nn.Sequential(module, bn, activation)


class SqueezeExcite(nn.Module):
    """MobileNet/EfficientNet's squeeze-excite: a spatial mean, two 1x1 convs on the 1x1 result, a gate."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MixedNet(nn.Module):
    """Convolutions with batch norm, a residual add, squeeze-excite, concat and pooling, then flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = with_bn(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), 16, nn.Hardswish())
        self.depthwise = with_bn(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), 16, nn.SiLU())
        self.se = SqueezeExcite(16, 4)
        self.project = nn.Conv2d(32, 24, 1)
        self.head = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        z = torch.cat([self.se(self.depthwise(y)) + y, y], dim=1)
        z = F.max_pool2d(self.project(z), 2)
        return self.head(torch.flatten(z, 1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block as torchvision writes it: a depthwise 7x7 conv in NCHW, a permutation to NHWC for the
    layer norm (weights by keyword) and the pointwise linears, a permutation back, layer scale, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm_weight, self.norm_bias = nn.Parameter(torch.rand(channels) + 0.5), nn.Parameter(torch.randn(channels))
        self.up, self.down = nn.Linear(channels, 4 * channels), nn.Linear(4 * channels, channels)
        self.scale = nn.Parameter(torch.rand(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, self.norm_weight.shape, weight=self.norm_weight, bias=self.norm_bias, eps=1e-6)
        y = self.down(F.gelu(self.up(y))).permute(0, 3, 1, 2)
        return x + self.scale * y


CONVS = {
    "1x1": (conv(24, 40, 1), 24, 9),
    "3x3": (conv(16, 32, 3, padding=1), 16, 13),
    "5x5": (conv(8, 24, 5, padding=2), 8, 11),
    "7x7 stride 2 stem": (conv(3, 32, 7, stride=2, padding=3), 3, 23),
    "3x3 stride 2": (conv(16, 48, 3, stride=2, padding=1), 16, 14),
    "1x1 stride 2": (conv(32, 64, 1, stride=2, bias=False), 32, 14),
    "grouped": (conv(32, 64, 3, padding=1, groups=4), 32, 10),
    "depthwise 3x3": (conv(48, 48, 3, padding=1, groups=48), 48, 15),
    "depthwise 5x5 stride 2": (conv(40, 40, 5, stride=2, padding=2, groups=40), 40, 17),
    "dilated": (conv(16, 16, 3, padding=2, dilation=2), 16, 12),
    "unpadded, no bias": (conv(16, 20, 3, bias=False), 16, 10),
    "uneven padding": (conv(8, 16, (3, 5), padding=(1, 2)), 8, 9),
    "+ BN + ReLU": (with_bn(conv(16, 32, 3, padding=1, bias=False), 32, nn.ReLU()), 16, 12),
    "+ BN + hardswish": (with_bn(conv(16, 32, 1, bias=False), 32, nn.Hardswish()), 16, 12),
    "+ SiLU": (nn.Sequential(conv(24, 24, 3, padding=1, groups=24), nn.SiLU()), 24, 12),
}
POOLS = {
    "max 3x3 stride 2": nn.MaxPool2d(3, stride=2, padding=1),
    "avg 2x2": nn.AvgPool2d(2),
    "global mean": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)),
    "squeeze-excite": SqueezeExcite(24, 8),
}


def assert_matches_torch(model: nn.Module, x: torch.Tensor, target: str = "x86") -> lowbit.CompiledModel:
    model.eval()
    compiled = lowbit.compile(model, (x,), target=target, passes=[])
    with torch.no_grad():
        expected, actual = model(x), compiled(x)
    assert (actual - expected).norm() / expected.norm() < TOLERANCE
    return compiled


@pytest.mark.parametrize("name", list(CONVS))
def test_convolutions_match_torch(name: str) -> None:
    torch.manual_seed(0)
    model, channels, size = CONVS[name]
    assert_matches_torch(model, torch.randn(1, channels, size, size))


@pytest.mark.parametrize("name", list(POOLS))
def test_pooling_and_squeeze_excite_match_torch(name: str) -> None:
    torch.manual_seed(0)
    assert_matches_torch(POOLS[name], torch.randn(1, 24, 15, 15))


def test_a_mixed_network_matches_torch() -> None:
    torch.manual_seed(0)
    assert_matches_torch(MixedNet(), torch.randn(2, 3, 16, 16))


def channels_last_module(model: nn.Module, x: torch.Tensor) -> tvm.IRModule:
    gm = trace(model.eval(), (x,))
    return tvm.transform.Sequential(layout.channels_last())(import_graph(gm, input_specs(gm, [x]), {}))


def calls(mod: tvm.IRModule, op: str) -> list[relax.Call]:
    found: list[relax.Call] = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) and e.op == tvm.ir.Op.get(op) else None
    )
    return found


def test_layouts_change_only_at_the_graph_boundaries() -> None:
    """The conv chain stays NHWC through batch norm, squeeze-excite, the residual add, concat and pooling: one
    permutation of the input and one before flatten; the weights are constants already in HWIO."""
    mod = channels_last_module(MixedNet(), torch.randn(2, 3, 16, 16))
    convs = calls(mod, "relax.nn.conv2d")
    assert len(convs) == 5 and all(call.attrs.data_layout == "NHWC" for call in convs)
    bound = relax.analysis.get_var2val(mod["main"])
    weights = [bound.get(call.args[1], call.args[1]) for call in convs]
    assert all(isinstance(weight, tvm.ir.expr.Constant) for weight in weights)
    assert all(call.attrs.kernel_layout == "HWIO" for call in convs)
    permutes = calls(mod, "relax.permute_dims")
    assert [list(call.attrs.axes) for call in permutes] == [[0, 2, 3, 1], [0, 3, 1, 2]]
    assert not calls(mod, "relax.layout_transform")


def test_permutations_written_around_nhwc_blocks_cancel() -> None:
    """Two ConvNeXt blocks keep NHWC from the input's permutation to the output's: torch's own permutations
    and their inverses cancel across the layer scale and the residual add."""
    torch.manual_seed(0)
    model, x = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16)), torch.randn(1, 16, 9, 9)
    permutes = calls(channels_last_module(model, x), "relax.permute_dims")
    assert [list(call.attrs.axes) for call in permutes] == [[0, 2, 3, 1], [0, 3, 1, 2]]
    assert_matches_torch(model, x)


def test_the_convolution_rule_takes_nhwc_windows_only() -> None:
    """NHWC convolutions and pools are the rule's; NCHW convolutions and 4-D batched matmuls are left to the
    tiled-reduction rule."""
    target = resolve_target("x86")
    x, w = te.placeholder((1, 9, 9, 16), name="x"), te.placeholder((3, 3, 16, 32), name="w")
    nhwc = topi.nn.conv2d_nhwc(x, w, 1, 1, 1)
    pool = topi.nn.pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), "max", layout="NHWC")
    xc, wc = te.placeholder((1, 16, 9, 9), name="x"), te.placeholder((32, 16, 3, 3), name="w")
    nchw = topi.nn.conv2d_nchw(xc, wc, 1, 1, 1)
    a, b = te.placeholder((2, 4, 8, 16), name="a"), te.placeholder((2, 4, 16, 32), name="b")
    k = te.reduce_axis((0, 16), name="k")
    bmm = te.compute((2, 4, 8, 32), lambda i, j, m, n: te.sum(a[i, j, m, k] * b[i, j, k, n], axis=k))
    rule = Convolution()
    with target:
        assert rule.apply(te.create_prim_func([x, w, nhwc]), target, False) is not None
        assert rule.apply(te.create_prim_func([x, pool]), target, False) is not None
        assert rule.apply(te.create_prim_func([xc, wc, nchw]), target, False) is None
        assert rule.apply(te.create_prim_func([a, b, bmm]), target, False) is None


def test_a_pointwise_conv_with_more_pixels_than_weights_runs_its_pixels_outside_its_channel_tiles() -> None:
    """A 1x1 convolution whose input outweighs its weights runs pixel tiles outside channel tiles (each tile's pixels
    reused from L1 by consecutive tasks); a 3x3 one, a 1x1 one with larger weights, and one whose weights do not fit
    in L2, keep channel tiles outside."""
    target = resolve_target("x86")

    def channel_tile_innermost(pixels: int, cin: int, kernel: int) -> bool:
        x, w = te.placeholder((1, pixels, pixels, cin), name="x"), te.placeholder((kernel, kernel, cin, 128), name="w")
        func = te.create_prim_func([x, w, topi.nn.conv2d_nhwc(x, w, 1, kernel // 2, 1)])
        with target:
            script = Convolution().apply(func, target, False).mod["main"].script()
        # The write-back's output channel: the parallel loop modulo the channel tiles where they are its last factor.
        return re.search(r"v3 = T.axis.spatial\(128, \w+_fused (%|//)", script).group(1) == "%"

    assert channel_tile_innermost(28, 32, 1)
    assert not channel_tile_innermost(28, 32, 3)
    assert not channel_tile_innermost(4, 64, 1)
    assert not channel_tile_innermost(16, 4096, 1)  # 2 MiB of weights, over L2: streamed once, not once per pixel tile
    torch.manual_seed(0)
    assert_matches_torch(nn.Sequential(nn.Conv2d(24, 48, 1), nn.GELU()), torch.randn(1, 24, 20, 20))


def test_a_conv_prefetches_the_next_channel_tiles_weights_into_l2() -> None:
    """Convolutions with channel tiles outside their pixels (a 1x1 one whose weights outweigh its input, a 3x3 one)
    prefetch the next tile's packed weights with ``prefetcht1``; a depthwise conv and a pointwise conv running its
    pixels outside its channel tiles do not. The batch of two checks the tile arithmetic across images."""

    def prefetches(model: nn.Module, x: torch.Tensor) -> bool:
        asm = assert_matches_torch(model, x).runner.executable.mod.imports[0].inspect_source("asm")
        return "prefetcht1" in asm

    torch.manual_seed(0)
    assert prefetches(nn.Conv2d(256, 384, 1), torch.randn(2, 256, 7, 7))
    assert prefetches(nn.Conv2d(64, 96, 3, padding=1), torch.randn(2, 64, 9, 9))
    assert not prefetches(nn.Conv2d(96, 96, 7, padding=3, groups=96), torch.randn(2, 96, 14, 14))
    assert not prefetches(nn.Conv2d(24, 48, 1), torch.randn(1, 24, 20, 20))


def test_a_depthwise_conv_tiles_two_rows_where_they_divide_the_height_and_two_vectors_fill_the_channel_tile() -> None:
    """The unrolled tile loops (rows, columns, channel vectors) of a 7x7 depthwise convolution: 2 × 2 × 2 on a 14x14
    input of 64 channels; one row where the height is odd (7) or the channel tile is narrow (24 channels: vectors
    of 8)."""
    target = resolve_target("x86")

    def tile(size: int, channels: int) -> list[int]:
        x, w = te.placeholder((1, size, size, channels), name="x"), te.placeholder((7, 7, channels, 1), name="w")
        func = te.create_prim_func([x, w, topi.nn.depthwise_conv2d_nhwc(x, w, 1, 3, 1)])
        with target:
            sch = Convolution().apply(func, target, False)
        loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("DepthwiseConv2d_update"))]
        return [int(loop.extent) for loop in loops if loop.kind == tirx.ForKind.UNROLLED]

    assert tile(14, 64) == [2, 2, 2]
    assert tile(7, 64) == [7, 2]
    assert tile(14, 24) == [7, 3]
    torch.manual_seed(0)
    assert_matches_torch(nn.Conv2d(64, 64, 7, padding=3, groups=64), torch.randn(1, 64, 14, 14))


def test_register_tiles_fit_the_register_file() -> None:
    assert conv_tile(56, 4, 32) == (4, 4)  # AVX-512, 64 channels: 16 accumulators, 4 weight vectors
    assert conv_tile(7, 32, 32) == (7, 2)
    assert conv_tile(1, 72, 32) == (1, 4)  # a squeeze-excite conv on a 1x1 input: a strip of vectors
    for columns, vectors in (conv_tile(56, 8, 16), conv_tile(14, 3, 16)):
        assert columns * vectors + vectors + 1 <= 16


def test_a_squeeze_excite_conv_on_a_1x1_input_builds_in_seconds() -> None:
    """EfficientNet's ``Conv2d(48, 1152, 1)`` on its 1x1 pooled input once took LLVM minutes to compile."""
    torch.manual_seed(0)
    start = time.perf_counter()
    assert_matches_torch(nn.Sequential(nn.Conv2d(48, 1152, 1), nn.Sigmoid()), torch.randn(1, 48, 1, 1))
    assert time.perf_counter() - start < 30


def test_a_build_past_the_time_limit_names_the_function(monkeypatch) -> None:
    monkeypatch.setenv("LOWBIT_BUILD_TIMEOUT_S", "0.001")
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    with pytest.raises(BuildTimeoutError, match="the TIR function 'fused_conv2d_add_relu'"):
        lowbit.compile(model, (torch.randn(1, 8, 8, 8),), target="x86", passes=[])


@pytest.mark.usefixtures("arm_emulator")
def test_a_small_convnet_runs_under_qemu(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = MixedNet().eval(), torch.randn(1, 3, 16, 16)
    path = lowbit.compile(model, (x,), target="arm", passes=[]).export(tmp_path / "convnet")
    with qemu.emulated_server() as server:
        result = rpc.run_artifact(path, [x.numpy()], rpc=str(server.address), timeout=120, repeats=1)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.linalg.norm(result.outputs[0] - expected) / np.linalg.norm(expected) < TOLERANCE


@pytest.mark.slow
def test_efficientnet_b0_compiles_quickly_and_matches_eager() -> None:
    import torchvision

    torch.manual_seed(0)
    start = time.perf_counter()
    assert_matches_torch(torchvision.models.efficientnet_b0(weights=None), torch.randn(1, 3, 224, 224))
    assert time.perf_counter() - start < 120
