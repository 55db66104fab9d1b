"""CUDA kernels run on a GPU against the torch reference (skipped where there is no CUDA device).

A8 layers with power-of-two scales must match ``lowbit.linear_packed_a8`` bit for bit, W4A16
layers and whole models within 1e-5 relative; an exported artifact loads from its fatbin and
gives the same outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
import lowbit.ir.ops_a8  # registers torch.ops.lowbit.linear_packed_a8
from lowbit.backends.tvm import TVMBackend
from lowbit.backends.tvm.runner import cuda_available
from lowbit.ir import packing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and TVM's CUDA runtime"),
]

K, N = 512, 256


class PackedLayer(nn.Module):
    """One ``linear_packed_a8`` (or ``linear_packed``) call on random packed buffers."""

    def __init__(self, bits: int, group: int, asymmetric: bool, a8: bool, static: bool, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, 2**bits, (N, K), generator=gen, dtype=torch.uint8)
        self.register_buffer("qweight", packing.pack(codes, bits))
        self.register_buffer("scales", 2.0 ** -torch.randint(2, 9, (N, K // group), generator=gen).float())
        zeros = torch.randint(0, 2**bits, (N, K // group), generator=gen).float() if asymmetric else None
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", torch.randint(-16, 17, (N,), generator=gen).float() / 8)
        self.register_buffer("act_scale", torch.tensor(2.0**-5) if static else None)
        self.layout = (bits, group, K)
        self.a8 = a8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a8:
            return torch.ops.lowbit.linear_packed_a8(
                x, self.qweight, self.scales, self.zeros, None, self.bias, *self.layout, self.act_scale
            )
        return torch.ops.lowbit.linear_packed(x, self.qweight, self.scales, self.zeros, None, self.bias, *self.layout)


@pytest.mark.parametrize("rows", [1, 32])
@pytest.mark.parametrize(
    ("bits", "group", "asymmetric", "static"),
    [(2, 64, True, False), (4, 128, False, False), (1, 128, False, True), (8, K, False, False)],
)
def test_a8_kernel_is_bit_exact(rows: int, bits: int, group: int, asymmetric: bool, static: bool) -> None:
    layer = PackedLayer(bits, group, asymmetric, a8=True, static=static, seed=bits)
    x = torch.randn(rows, K) * 4
    runner = TVMBackend("cuda").compile(lowbit.trace(layer, (x,)), (x,))
    assert not runner.fallbacks
    assert torch.equal(runner(x), layer(x))


@pytest.mark.parametrize("rows", [1, 32])
@pytest.mark.parametrize(("bits", "asymmetric"), [(4, False), (2, True), (8, False)])
def test_w_only_kernel_matches_within_1e5(rows: int, bits: int, asymmetric: bool) -> None:
    layer = PackedLayer(bits, 128, asymmetric, a8=False, static=False, seed=bits)
    x = torch.randn(rows, K)
    runner = TVMBackend("cuda").compile(lowbit.trace(layer, (x,)), (x,))
    torch.testing.assert_close(runner(x), layer(x), rtol=1e-5, atol=1e-5 * float(layer(x).abs().max()))


@pytest.mark.parametrize("recipe", ["w4a16-cuda", "w1.58a8-cuda"])
def test_compiled_model_and_its_artifact_match_torch(recipe: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.LayerNorm(512), nn.Linear(512, 256))
    x = torch.randn(8, 256)
    compiled = lowbit.compile(model, (x,), recipe=recipe)
    with torch.no_grad():
        expected = compiled.graph(x)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    loaded = lowbit.load(compiled.export(tmp_path / "model"))
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
