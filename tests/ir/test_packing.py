"""The packed low-bit weight format: bit layout, round trips, dequantization, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.ir.packing import (
    SUPPORTED_BITS,
    PackedFormatError,
    check_g_idx_range,
    default_zero,
    dequantize,
    num_groups,
    pack,
    packed_row_bytes,
    unpack,
)


@st.composite
def code_matrices(draw: st.DrawFn, bits: int | None = None) -> tuple[torch.Tensor, int]:
    """A uint8 code matrix (N, K) of any small shape, including N=1, K=1 and K not a multiple of 8."""
    bits = draw(st.sampled_from(SUPPORTED_BITS)) if bits is None else bits
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(1, 41))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.uint8).reshape(rows, cols), bits


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack one row at a time through a Python integer: code k at bit offset k·bits, little-endian."""
    n_bytes = (codes.shape[1] * bits + 7) // 8
    rows = []
    for row in codes.tolist():
        stream = sum(value << (k * bits) for k, value in enumerate(row))
        rows.append(list(stream.to_bytes(n_bytes, "little")))
    return torch.tensor(rows, dtype=torch.uint8).reshape(codes.shape[0], n_bytes)


@settings(max_examples=150, deadline=None)
@given(code_matrices())
def test_unpack_inverts_pack(case: tuple[torch.Tensor, int]) -> None:
    codes, bits = case
    assert torch.equal(unpack(pack(codes, bits), bits, codes.shape[1]), codes)


@settings(max_examples=150, deadline=None)
@given(code_matrices())
def test_pack_is_the_lsb_first_bitstream(case: tuple[torch.Tensor, int]) -> None:
    codes, bits = case
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (codes.shape[0], packed_row_bytes(codes.shape[1], bits))
    assert torch.equal(packed, reference_pack(codes, bits))


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0b00001101, 0b1]),
        (2, [1, 2, 3, 0, 3], [0b00111001, 0b11]),
        (3, [1, 2, 3, 0, 5, 6, 7, 4], [209, 80, 159]),
        (4, [1, 2, 15], [0x21, 0x0F]),
        (8, [7, 255], [7, 255]),
    ],
)
def test_known_byte_layouts(bits: int, codes: list[int], expected: list[int]) -> None:
    """Low bits first within a byte (ONNX Runtime MatMulNBits for 1/2/4/8 bits); 3-bit codes straddle bytes."""
    packed = pack(torch.tensor([codes], dtype=torch.uint8), bits)
    assert packed.tolist() == [expected]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (1, 7), (3, 8), (2, 129), (4, 4096)])
def test_packed_byte_size(bits: int, rows: int, cols: int) -> None:
    packed = pack(torch.zeros(rows, cols, dtype=torch.uint8), bits)
    assert packed.numel() == rows * -(-cols * bits // 8)


@pytest.mark.parametrize("bits", [0, 5, 6, 7, 16, True])
def test_unsupported_bits_are_rejected(bits: int) -> None:
    with pytest.raises(PackedFormatError, match="unsupported bit width"):
        pack(torch.zeros(2, 2, dtype=torch.uint8), bits)


def test_codes_out_of_range_are_rejected() -> None:
    with pytest.raises(PackedFormatError, match=r"codes must lie in \[0, 3\]"):
        pack(torch.tensor([[0, 4]], dtype=torch.uint8), 2)


@pytest.mark.parametrize(
    "codes",
    [torch.zeros(2, 3, dtype=torch.int64), torch.zeros(6, dtype=torch.uint8), torch.zeros(1, 2, 3, dtype=torch.uint8)],
)
def test_codes_must_be_a_uint8_matrix(codes: torch.Tensor) -> None:
    with pytest.raises(PackedFormatError, match="2-D uint8"):
        pack(codes, 4)


def test_unpack_checks_the_row_width() -> None:
    packed = pack(torch.zeros(2, 10, dtype=torch.uint8), 4)
    with pytest.raises(PackedFormatError, match="5 bytes per row; 12 4-bit codes need 6"):
        unpack(packed, 4, 12)


def test_format_errors_are_lowbit_and_value_errors() -> None:
    assert issubclass(PackedFormatError, LowbitError)
    assert issubclass(PackedFormatError, ValueError)


def test_default_zero() -> None:
    assert [default_zero(b) for b in SUPPORTED_BITS] == [0.5, 2.0, 4.0, 8.0, 128.0]


def reference_dequantize(codes, scales, zeros, g_idx, bits, group_size):
    """Element by element: w[n, k] = scale[n, g] * (q[n, k] - zero[n, g])."""
    rows, cols = codes.shape
    out = torch.empty(rows, cols)
    for n in range(rows):
        for k in range(cols):
            g = int(g_idx[k]) if g_idx is not None else k // group_size
            zero = default_zero(bits) if zeros is None else float(zeros[n, g])
            out[n, k] = float(scales[n, g]) * (float(codes[n, k]) - zero)
    return out


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize(("cols", "group_size"), [(12, 12), (12, 4), (13, 4), (10, 3), (5, 1)])
@pytest.mark.parametrize("with_zeros", [False, True])
def test_dequantize_matches_the_formula(bits: int, cols: int, group_size: int, with_zeros: bool) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + cols)
    rows, groups = 3, num_groups(cols, group_size)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.uint8)
    scales = torch.rand(rows, groups, generator=gen) + 0.1
    zeros = torch.randint(0, 1 << bits, (rows, groups), generator=gen).float() if with_zeros else None
    weight = dequantize(pack(codes, bits), scales, zeros, None, bits, group_size, cols)
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, reference_dequantize(codes, scales, zeros, None, bits, group_size))


def test_dequantize_with_act_order_group_index() -> None:
    gen = torch.Generator().manual_seed(0)
    rows, cols, group_size, bits = 4, 10, 4, 4
    codes = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8)
    scales = torch.rand(rows, 3, generator=gen)
    zeros = torch.randint(0, 16, (rows, 3), generator=gen).float()
    g_idx = (torch.randperm(cols, generator=gen) // group_size).to(torch.int32)
    weight = dequantize(pack(codes, bits), scales, zeros, g_idx, bits, group_size, cols)
    torch.testing.assert_close(weight, reference_dequantize(codes, scales, zeros, g_idx, bits, group_size))


def test_one_bit_codes_mean_plus_minus_half_scale() -> None:
    codes = torch.tensor([[0, 1, 1, 0]], dtype=torch.uint8)
    weight = dequantize(pack(codes, 1), torch.tensor([[2.0]]), None, None, 1, 4, 4)
    assert weight.tolist() == [[-1.0, 1.0, 1.0, -1.0]]


def _layout(cols: int = 8, group_size: int = 4):
    codes = torch.zeros(2, cols, dtype=torch.uint8)
    return pack(codes, 4), torch.ones(2, num_groups(cols, group_size)), group_size, cols


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scales": torch.ones(2, 3)}, "scales must be float32 of shape \\(2, 2\\)"),
        ({"scales": torch.ones(2, 2, dtype=torch.float64)}, "scales must be float32"),
        ({"zeros": torch.ones(3, 2)}, "zeros must be float32 of shape \\(2, 2\\)"),
        ({"g_idx": torch.zeros(8, dtype=torch.int64)}, "g_idx must be int32"),
        ({"g_idx": torch.zeros(7, dtype=torch.int32)}, "g_idx must be int32 of shape \\(8,\\)"),
        ({"group_size": 0}, "group_size must be between 1 and in_features=8"),
        ({"group_size": 9}, "group_size must be between 1 and in_features=8"),
    ],
)
def test_dequantize_validates_the_layout(change: dict, message: str) -> None:
    qweight, scales, group_size, cols = _layout()
    args = {
        "qweight": qweight,
        "scales": scales,
        "zeros": None,
        "g_idx": None,
        "bits": 4,
        "group_size": group_size,
        "in_features": cols,
    }
    args.update(change)
    with pytest.raises(PackedFormatError, match=message):
        dequantize(**args)


def test_g_idx_range_check() -> None:
    check_g_idx_range(torch.tensor([0, 1, 1, 0], dtype=torch.int32), 4, 2)
    with pytest.raises(PackedFormatError, match=r"g_idx values must lie in \[0, 1\]"):
        check_g_idx_range(torch.tensor([0, 2, 1, 0], dtype=torch.int32), 4, 2)
