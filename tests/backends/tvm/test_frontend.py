"""ATen overloads of torch.export graphs and torch ops that the TVM importer handles itself, and layers it names."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.backends.tvm import TVMBackend
from lowbit.backends.tvm.frontend import import_graph, input_specs
from lowbit.errors import BackendError


class _MaskedAttention(nn.Module):
    """Self-attention with an integer padding mask turned into a boolean one, as BERT models do."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        keep = mask.to("cpu", torch.bool)[:, None, None, :] & x.new_ones((), dtype=torch.bool)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep) + F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep.float() * -3.0, scale=0.5
        )


def test_boolean_and_float_masks_match_torch() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    gm = lowbit.trace(_MaskedAttention().eval(), (x, mask), tracer="export")
    targets = {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
    assert "aten.scaled_dot_product_attention.default" in targets and "aten.to.device" in targets
    runner = TVMBackend().compile(gm, (x, mask))
    with torch.no_grad():
        expected = gm(x, mask)
    assert float((runner(x, mask=mask) - expected).abs().max() / expected.abs().max()) < 1e-5


class _Diff(nn.Module):
    """``torch.diff`` with and without prepend, and twice, as transformers' mask code uses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = torch.diff(x, dim=-1, prepend=x[:, :1] - 1)
        second = torch.diff(x, n=2, dim=0)
        return first.sum() + second.sum() + first[:, 2:] * 2.0


def test_diff_matches_torch() -> None:
    x = torch.randn(4, 7)
    gm = lowbit.trace(_Diff().eval(), (x,), tracer="export")
    assert any(str(node.target) == "aten.diff.default" for node in gm.graph.nodes)
    runner = TVMBackend().compile(gm, (x,))
    torch.testing.assert_close(runner(x), gm(x), rtol=1e-6, atol=1e-6)


class _MaskCumsum(nn.Module):
    """Cumulative sums of a boolean and an int32 mask, which torch promotes to int64."""

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(mask > 0, dim=-1) + torch.cumsum(mask.to(torch.int32), dim=0)


def test_cumsum_of_bool_promotes_to_int64() -> None:
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]])
    gm = lowbit.trace(_MaskCumsum().eval(), (mask,), tracer="export")
    got = TVMBackend().compile(gm, (mask,))(mask)
    assert got.dtype == torch.int64
    assert torch.equal(got, gm(mask))


def test_masked_fill_matches_torch() -> None:
    class Fill(nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x.masked_fill(mask, float("-inf")), dim=-1) + x.masked_fill(mask, 2.0)

    x, mask = torch.randn(3, 4), torch.tensor([[True, False, False, False]] * 3)
    runner = TVMBackend().compile(lowbit.trace(Fill(), (x, mask)), (x, mask))
    assert torch.allclose(runner(x, mask), Fill()(x, mask), atol=1e-6)


def test_a_layer_type_the_frontend_lacks_is_named() -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    x = torch.randn(3, 2, 4)
    gm = lowbit.trace(Recurrent().eval(), (x,), tracer="fx")
    with pytest.raises(BackendError, match=r"'rnn' \(torch.nn.modules.rnn.RNN\).*leaf_modules=.*target='torch'"):
        TVMBackend().compile(gm, (x,))


@pytest.mark.parametrize(
    "pad",
    [nn.ZeroPad2d((0, 1, 0, 1)), nn.ConstantPad2d((1, 2, 0, 1), 0.5), nn.ZeroPad1d(2), nn.ConstantPad3d(1, -1.0)],
)
def test_constant_padding_modules_match_torch(pad: nn.Module) -> None:
    x = torch.randn(1, 3, 4, 5)
    net = nn.Sequential(pad, nn.ReLU()).eval()
    compiled = lowbit.compile(net, (x,), target="x86")
    assert torch.allclose(compiled(x), net(x), rtol=0, atol=0)


def test_integer_index_of_a_tensor_matches_torch() -> None:
    class Rows(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[1] * 2.0 + x[-1] + (x + 1.0)[0]

    x = torch.randn(3, 4, 5)
    runner = TVMBackend().compile(lowbit.trace(Rows(), (x,), tracer="fx"), (x,))
    assert torch.allclose(runner(x), Rows()(x), atol=1e-6)


def test_an_operator_the_frontend_cannot_import_is_named_with_its_module() -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(4, 4, num_layers=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    x = torch.randn(3, 2, 4)
    gm = lowbit.trace(Recurrent().eval(), (x,), tracer="export")  # nn.RNN is not decomposed: aten.rnn_tanh stays
    message = r"(?s)node 'rnn_tanh' \(aten.rnn_tanh.input\) of module 'rnn' \(.*RNN\).*target='torch'"
    with pytest.raises(BackendError, match=message):
        TVMBackend().compile(gm, (x,))


def test_layer_norm_keeps_weight_bias_and_eps_given_as_keywords() -> None:
    """fx records ``nn.LayerNorm.forward`` as ``F.layer_norm(x, shape, weight=, bias=, eps=)``; rows with a small
    spread (a ViT's class token) show a lost ``eps``, a random weight and bias a lost affine."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(64, eps=1e-6).eval()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 64) * torch.tensor([[1.0], [0.01], [0.001]])
    gm = lowbit.trace(norm, (x,), tracer="fx")
    assert any(node.kwargs.get("eps") == 1e-6 for node in gm.graph.nodes if node.op == "call_function")
    with torch.no_grad():
        torch.testing.assert_close(TVMBackend().compile(gm, (x,))(x), norm(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kernel", "bias"), [(4, True), ((2, 4), False)])
def test_patch_convolution_imports_as_a_matmul(kernel: int | tuple[int, int], bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, kernel, stride=kernel, bias=bias).eval()
    x = torch.randn(2, 3, 16, 16)
    for gm in (lowbit.trace(conv, (x,)), lowbit.trace(nn.Sequential(conv), (x,))):  # F.conv2d, then the layer
        assert "conv2d" not in import_graph(gm, input_specs(gm, (x,)), {}).script()
    runner = TVMBackend().compile(gm, (x,))
    with torch.no_grad():
        torch.testing.assert_close(runner(x), conv(x), rtol=1e-4, atol=1e-4)


class _ValueAssert(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.sum() > 0, "needs a positive sum")
        return x + 1


class _ShapeAssert(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[1] % 4 == 0, "width must be a multiple of 4")
        return x + 1


def test_shape_asserts_are_checked_at_import_and_value_asserts_are_named() -> None:
    x = torch.ones(2, 8)
    runner = TVMBackend().compile(lowbit.trace(_ShapeAssert(), (x,)), (x,))
    torch.testing.assert_close(runner(x), x + 1)
    with pytest.raises(BackendError, match=r"torch._assert on tensor values"):
        TVMBackend().compile(lowbit.trace(_ValueAssert(), (x,)), (x,))


class _SelfAttention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize(
    ("keys", "mask_keys", "boolean"), [(37, 37, True), (37, 1, False), (16, 16, True), (5, 5, False)]
)
def test_attention_with_keys_padded_to_whole_vectors_matches_torch(keys: int, mask_keys: int, boolean: bool) -> None:
    """37 keys are padded to 48 (their scores sent to -inf, a mask over them too), 16 and 5 are not."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 11, 8), torch.randn(2, 3, keys, 8), torch.randn(2, 3, keys, 8)
    mask = torch.rand(2, 1, 11, mask_keys) > 0.3 if boolean else torch.randn(2, 1, 11, mask_keys)
    if boolean:
        mask[..., 0] = True  # every query sees a key
    gm = lowbit.trace(_SelfAttention(), (q, k, v, mask))
    assert ("pad" in import_graph(gm, input_specs(gm, (q, k, v, mask)), {}).script()) == (keys == 37)
    runner = TVMBackend().compile(gm, (q, k, v, mask))
    torch.testing.assert_close(runner(q, k, v, mask), _SelfAttention()(q, k, v, mask), rtol=1e-5, atol=1e-5)
