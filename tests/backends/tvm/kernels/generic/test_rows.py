"""Attention's keys over a symbolic length padded to whole blocks: one function for every shape, against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from lowbit.backends.tvm.kernels.generic.rows import pad_axis_func
from lowbit.backends.tvm.target import resolve_target


@pytest.mark.parametrize("swap", [False, True], ids=["keys", "keys-transposed"])
def test_pad_axis_pads_and_transposes_at_every_length(swap: bool) -> None:
    """Keys ``(batch, heads, length, dim)`` padded with zeros to a multiple of 16 along the length (and with ``swap``
    laid out ``(batch, heads, dim, padded)``), at lengths that are and are not whole blocks."""
    func = pad_axis_func(4, 2, 16, 0.0, swap=swap).with_attr("global_symbol", "pad")
    lib = tvm.compile(tvm.IRModule({"pad": func}), target=resolve_target("x86"))
    for length in (1, 15, 16, 17, 33):
        x = torch.randn(2, 3, length, 8, generator=torch.Generator().manual_seed(length))
        expected = torch.nn.functional.pad(x, (0, 0, 0, -length % 16))
        expected = expected.transpose(-1, -2).contiguous() if swap else expected
        out = tvm.runtime.tensor(np.zeros(tuple(expected.shape), dtype="float32"))
        lib["pad"](tvm.runtime.tensor(x.numpy()), out)
        assert torch.equal(torch.from_numpy(out.numpy()), expected), length


def test_pad_axis_fills_a_mask_with_minus_infinity() -> None:
    func = pad_axis_func(3, 2, 16, float("-inf")).with_attr("global_symbol", "pad")
    lib = tvm.compile(tvm.IRModule({"pad": func}), target=resolve_target("x86"))
    x = torch.randn(2, 5, 17)
    out = tvm.runtime.tensor(np.zeros((2, 5, 32), dtype="float32"))
    lib["pad"](tvm.runtime.tensor(x.numpy()), out)
    assert torch.equal(torch.from_numpy(out.numpy()), torch.nn.functional.pad(x, (0, 15), value=float("-inf")))
