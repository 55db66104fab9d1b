"""The ``lowbit::linear_packed`` custom op: reference numerics, fake impl, export, autograd."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import lowbit.ir.ops as ops
from lowbit.ir.packing import PackedFormatError, dequantize, num_groups, pack


def make_packed(
    rows: int, cols: int, bits: int, group_size: int, *, zeros: bool = True, act_order: bool = False, seed: int = 0
) -> dict:
    """Random packed-format tensors (keyword arguments of the op, minus ``x`` and ``bias``)."""
    gen = torch.Generator().manual_seed(seed)
    groups = num_groups(cols, group_size)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.uint8)
    g_idx = (torch.randperm(cols, generator=gen) // group_size).to(torch.int32) if act_order else None
    return {
        "qweight": pack(codes, bits),
        "scales": torch.rand(rows, groups, generator=gen) * 0.1 + 0.01,
        "zeros": torch.randint(0, 1 << bits, (rows, groups), generator=gen).float() if zeros else None,
        "g_idx": g_idx,
        "bits": bits,
        "group_size": group_size,
        "in_features": cols,
    }


def call(x: torch.Tensor, layout: dict, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.lowbit.linear_packed(
        x,
        layout["qweight"],
        layout["scales"],
        layout["zeros"],
        layout["g_idx"],
        bias,
        layout["bits"],
        layout["group_size"],
        layout["in_features"],
    )


def reference(x: torch.Tensor, layout: dict, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, dequantize(**layout), bias)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(("cols", "group_size"), [(32, 32), (32, 8), (37, 16)])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_op_equals_linear_on_the_dequantized_weight(bits, cols, group_size, zeros, with_bias) -> None:
    layout = make_packed(6, cols, bits, group_size, zeros=zeros)
    x = torch.randn(2, 3, cols)
    bias = torch.randn(6) if with_bias else None
    out = call(x, layout, bias)
    assert out.shape == (2, 3, 6)
    assert torch.equal(out, reference(x, layout, bias))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_op_with_act_order_group_index(bits: int) -> None:
    layout = make_packed(5, 24, bits, 8, act_order=True, seed=bits)
    x, bias = torch.randn(4, 24), torch.randn(5)
    groups = layout["g_idx"].long()
    codes_weight = dequantize(
        **{**layout, "g_idx": None, "group_size": 24, "scales": torch.ones(5, 1), "zeros": torch.zeros(5, 1)}
    )
    weight = layout["scales"][:, groups] * (codes_weight - layout["zeros"][:, groups])
    assert torch.equal(call(x, layout, bias), F.linear(x, weight, bias))
    assert not torch.equal(call(x, layout, bias), call(x, {**layout, "g_idx": None}, bias))


def test_opcheck() -> None:
    layout = make_packed(4, 20, 3, 8)
    torch.library.opcheck(ops.linear_packed, (torch.randn(3, 20), *_positional(layout, torch.randn(4))))
    torch.library.opcheck(ops.linear_packed, (torch.randn(3, 20), *_positional({**layout, "zeros": None}, None)))


def _positional(layout: dict, bias: torch.Tensor | None) -> tuple:
    return (
        layout["qweight"],
        layout["scales"],
        layout["zeros"],
        layout["g_idx"],
        bias,
        layout["bits"],
        layout["group_size"],
        layout["in_features"],
    )


def test_fake_impl_propagates_shapes() -> None:
    layout = make_packed(7, 16, 4, 8)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 5, 16))
        out = call(x, layout, torch.randn(7))
    assert out.shape == (2, 5, 7) and out.dtype == torch.float32


class PackedMLP(nn.Module):
    """A tiny module that calls the op on buffers, as a rewritten graph does."""

    def __init__(self, layout: dict, bias: torch.Tensor) -> None:
        super().__init__()
        self.layout = {k: v for k, v in layout.items() if not isinstance(v, torch.Tensor | None)}
        for name in ("qweight", "scales", "zeros", "g_idx"):
            self.register_buffer(name, layout[name])
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.linear_packed(
            x,
            self.qweight,
            self.scales,
            self.zeros,
            self.g_idx,
            self.bias,
            self.layout["bits"],
            self.layout["group_size"],
            self.layout["in_features"],
        )
        return torch.relu(y) * 2


def test_torch_export_of_a_module_calling_the_op() -> None:
    layout = make_packed(6, 12, 4, 4, act_order=True)
    module = PackedMLP(layout, torch.randn(6))
    x = torch.randn(3, 12)
    exported = torch.export.export(module, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert ops.linear_packed in targets
    op_node = next(n for n in exported.graph.nodes if n.target is ops.linear_packed)
    assert tuple(op_node.meta["val"].shape) == (3, 6)
    assert torch.equal(exported.module()(x), module(x))


def test_gradients_flow_to_input_and_bias() -> None:
    layout = make_packed(5, 12, 4, 4)
    x = torch.randn(3, 12, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    call(x, layout, bias).square().sum().backward()
    x_ref, bias_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    reference(x_ref, layout, bias_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, bias_ref.grad)


def test_input_width_must_match() -> None:
    layout = make_packed(5, 12, 4, 4)
    with pytest.raises(PackedFormatError, match="does not end in in_features=12"):
        call(torch.randn(3, 11), layout, None)
    with pytest.raises(PackedFormatError, match="bias of shape \\(4,\\) does not match 5 outputs"):
        call(torch.randn(3, 12), layout, torch.randn(4))


def test_reimport_is_idempotent() -> None:
    importlib.reload(ops)
    layout = make_packed(2, 8, 2, 8)
    x = torch.randn(1, 8)
    assert torch.equal(ops.linear_packed(x, *_positional(layout, None)), reference(x, layout, None))
