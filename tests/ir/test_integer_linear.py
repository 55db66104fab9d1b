"""`lowbit.ir.ops_a8.integer_linear`, the integer core of the int8-activation linear and convolution references,
against a plain loop over convolution groups and weight groups: equal bit for bit on random layouts."""

from __future__ import annotations

import pytest
import torch

from lowbit.ir import ops_a8, packing

#: (convolution groups, tokens, in_features, rows per convolution group, group_size)
SHAPES = [
    (1, 1, 16, 8, 16),
    (1, 5, 64, 24, 16),
    (1, 7, 100, 33, 32),
    (1, 3, 256, 40, 7),
    (4, 6, 9, 1, 9),
    (8, 11, 18, 2, 4),
    (3, 5, 45, 4, 5),
    (2, 1, 8, 3, 1),
]


def _layout(rows: int, cols: int, bits: int, group_size: int, zeros: str, act_order: bool, seed: int) -> tuple:
    """Random ``qweight, scales, zeros, g_idx``; ``zeros`` is ``none``, ``int`` or ``half`` (half-integers)."""
    gen = torch.Generator().manual_seed(seed)
    count = packing.num_groups(cols, group_size)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.uint8)
    zero = {
        "none": None,
        "int": torch.randint(0, 1 << bits, (rows, count), generator=gen).float(),
        "half": torch.randint(0, 2 << bits, (rows, count), generator=gen).float() / 2,
    }[zeros]
    g_idx = (torch.randperm(cols, generator=gen) // group_size).to(torch.int32) if act_order else None
    scales = torch.rand(rows, count, generator=gen) * 0.1 + 1e-3
    return packing.pack(codes, bits), scales, zero, g_idx


def _reference(x_int: torch.Tensor, qweight, scales, zeros, g_idx, bits: int, group_size: int, cols: int):
    """Per convolution group, per weight group in order: the exact float64 dot product, then ``+= float32 · scale``."""
    batched = x_int if x_int.dim() == 3 else x_int.unsqueeze(0)
    columns = packing.group_index(cols, group_size, g_idx, qweight.device)
    codes = packing.unpack(qweight, bits, cols).to(torch.float64)
    centered = codes - (packing.default_zero(bits) if zeros is None else zeros.to(torch.float64)[:, columns])
    rows = qweight.shape[0] // batched.shape[0]
    outputs = []
    for c, x in enumerate(batched.to(torch.float64)):
        part = slice(c * rows, (c + 1) * rows)
        y = torch.zeros(x.shape[0], rows)
        for s in range(scales.shape[1]):
            member = columns == s
            exact = x[:, member] @ centered[part][:, member].T
            y = y + exact.to(torch.float32) * scales[part, s]
        outputs.append(y)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize(("convs", "tokens", "cols", "rows", "group_size"), SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(("zeros", "act_order"), [("none", False), ("int", True), ("half", False), ("half", True)])
def test_integer_linear_equals_the_group_loop_bit_for_bit(
    convs, tokens, cols, rows, group_size, bits, zeros, act_order
) -> None:
    layout = _layout(convs * rows, cols, bits, group_size, zeros, act_order, seed=cols + bits)
    gen = torch.Generator().manual_seed(tokens)
    x_int = torch.randint(-128, 128, (convs, tokens, cols), generator=gen).float()
    if convs == 1:
        x_int = x_int[0]
    out = ops_a8.integer_linear(x_int, *layout, bits, group_size, cols)
    assert out.dtype == torch.float32 and out.shape == (tokens, convs * rows)
    assert torch.equal(out, _reference(x_int, *layout, bits, group_size, cols))


def test_integer_linear_chunks_weight_groups_without_changing_the_result(monkeypatch) -> None:
    layout = _layout(12, 40, 4, 3, "int", False, seed=0)
    x_int = torch.randint(-128, 128, (3, 5, 40), generator=torch.Generator().manual_seed(0)).float()
    whole = ops_a8.integer_linear(x_int, *layout, 4, 3, 40)
    monkeypatch.setattr(ops_a8, "_CHUNK_ELEMENTS", 1)
    assert torch.equal(ops_a8.integer_linear(x_int, *layout, 4, 3, 40), whole)
    assert torch.equal(whole, _reference(x_int, *layout, 4, 3, 40))
