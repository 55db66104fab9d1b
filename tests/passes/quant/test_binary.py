"""The ``binary`` pass: ``±mean|W|`` weights, 1 bit per weight, sign₊(0) = +1."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import lowbit
from lowbit.errors import LowbitError, PassConfigError, PassOrderError
from lowbit.ir import ops
from lowbit.ir.annotations import get_meta
from lowbit.passes import Pipeline, check_order, lookup
from lowbit.passes.quant import Binary, Ternary, binary_quantize

from helpers import TwoLayerMLP


def reference(w: torch.Tensor, block: int | None) -> torch.Tensor:
    """α·sign₊(W) with α = mean|W| per tensor (block None) or per row slice of ``block`` columns."""
    if block is None:
        return torch.where(w >= 0, w.abs().mean(), -w.abs().mean())
    out = torch.empty_like(w)
    for n in range(w.shape[0]):
        for start in range(0, w.shape[1], block):
            part = w[n, start : start + block]
            alpha = part.abs().mean()
            out[n, start : start + block] = torch.where(part >= 0, alpha, -alpha)
    return out


@pytest.mark.parametrize(
    ("granularity", "group_size", "block"),
    [("per_tensor", None, None), ("per_channel", None, 21), ("per_group", 8, 8), ("per_group", 5, 5)],
)
def test_dequantize_is_plus_minus_alpha_exactly(granularity, group_size, block) -> None:
    w = torch.randn(7, 21, generator=torch.Generator().manual_seed(2))
    qw = binary_quantize(w, granularity, group_size)
    assert torch.equal(qw.dequantize(), reference(w, block))


def test_format_stores_twice_alpha_one_bit_per_weight() -> None:
    w = torch.randn(4, 20)
    qw = binary_quantize(w)
    assert qw.bits == 1 and qw.zeros is None and qw.g_idx is None and qw.group_size == 20
    assert torch.equal(qw.codes, (w >= 0).to(torch.uint8))
    torch.testing.assert_close(qw.scales, 2 * w.abs().mean(dim=1, keepdim=True))
    assert qw.pack().shape == (4, 3)  # ceil(20 / 8) bytes per row
    # w = scale·(q − 0.5) with the 1-bit default zero 0.5
    assert torch.equal(qw.dequantize(), qw.scales * (qw.codes.float() - 0.5))


def test_zero_maps_to_plus_alpha_never_to_zero() -> None:
    w = torch.tensor([[0.0, -0.0, 1.0, -3.0]])
    qw = binary_quantize(w)
    assert qw.codes.tolist() == [[1, 1, 1, 0]]
    assert qw.dequantize().tolist() == [[1.0, 1.0, 1.0, -1.0]]
    assert torch.equal(binary_quantize(torch.zeros(2, 8)).dequantize(), torch.zeros(2, 8))


def test_alpha_is_the_least_squares_scale() -> None:
    """‖W − α·s‖² = ‖W‖² − n·α² per block, and no other scale does better for these signs."""
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    qw = binary_quantize(w, "per_group", 10)
    error = (qw.dequantize() - w).reshape(6, 4, 10).square().sum(dim=-1)
    alpha = qw.scales / 2
    torch.testing.assert_close(
        error, w.reshape(6, 4, 10).square().sum(dim=-1) - 10 * alpha.square(), rtol=1e-4, atol=1e-5
    )
    signs = torch.where(w >= 0, 1.0, -1.0)
    for factor in (0.9, 1.1):
        worse = (signs * (alpha * factor).repeat_interleave(10, dim=1) - w).square().sum()
        assert worse > (qw.dequantize() - w).square().sum()


def test_bad_inputs_name_the_layer() -> None:
    w = torch.randn(3, 4)
    w[2, 0] = float("-inf")
    with pytest.raises(LowbitError, match="layer 'head': weight contains NaN or Inf"):
        binary_quantize(w, name="head")
    with pytest.raises(LowbitError, match="floating-point"):
        binary_quantize(torch.ones(2, 2, dtype=torch.int64))


# ---------------------------------------------------------------- the pass


class MLP(TwoLayerMLP):
    def __init__(self) -> None:
        super().__init__(24, 32, 16)


def test_registered_and_declared() -> None:
    assert lookup("binary") is Binary
    assert Binary.stage == "convert" and Binary.produces == frozenset({"quant"}) and Binary.after_pack
    assert Binary().config.as_dict() == {"granularity": "per_channel", "group_size": None, "ignore": ()}


@pytest.mark.parametrize("kind", ["sparsity", "adapter", "fake_quant", "reparam"])
def test_refuses_graphs_with_active_training_annotations(kind: str) -> None:
    with pytest.raises(
        PassOrderError, match="cannot run while the graph carries .* \\(from the input graph \\(fc1\\)\\)"
    ):
        check_order([Binary()], {kind: ["fc1"]})
    with pytest.raises(PassOrderError, match="add 'apply_masks' before 'ternary'"):
        check_order([Ternary()], {"sparsity": ["fc1"]})


def test_pass_computes_with_the_binary_weight() -> None:
    torch.manual_seed(0)
    mlp = MLP().eval()
    x = torch.randn(3, 24)
    gm = Pipeline([Binary(overrides={"fc2": {"granularity": "per_group", "group_size": 8}})])(fx.symbolic_trace(mlp))
    nodes = [n for n in gm.graph.nodes if n.target is ops.linear_packed]
    schemes = [get_meta(n).quant for n in nodes]
    assert [(s.bits, s.group_size, s.method) for s in schemes] == [(1, 24, "binary"), (1, 8, "binary")]
    assert schemes[0].describe() == "w1 g24 sym [binary]"
    weights = lowbit.dequantized_weights(gm)
    assert torch.equal(weights["fc1"], reference(mlp.fc1.weight.detach(), 24))
    assert torch.equal(weights["fc2"], reference(mlp.fc2.weight.detach(), 8))
    with torch.no_grad():
        expected = F.linear(torch.relu(F.linear(x, weights["fc1"], mlp.fc1.bias)), weights["fc2"], mlp.fc2.bias)
        assert torch.equal(gm(x), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"granularity": "per_group"}, "needs group_size"),
        ({"granularity": "per_row"}, "granularity='per_row' is not supported"),
        ({"bits": 1}, "unknown option 'bits'"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(PassConfigError, match=message):
        Binary(**options)
