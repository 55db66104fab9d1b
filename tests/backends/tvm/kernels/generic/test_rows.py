"""Attention's keys over a symbolic length padded to whole blocks: one function for every shape, against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from lowbit.backends.tvm.kernels.generic.rows import pad_axis_func
from lowbit.backends.tvm.target import resolve_target


@pytest.mark.parametrize(
    ("order", "layout"),
    [(None, lambda t: t), ([0, 2, 3, 1], lambda t: t.permute(0, 2, 3, 1))],
    ids=["keys", "heads-split-and-keys-transposed"],
)
def test_pad_axis_pads_and_permutes_at_every_length(order, layout) -> None:
    """Keys ``(batch, length, heads, dim)`` padded with zeros to a multiple of 16 along the length, as they are or
    with the heads split off and the keys transposed in the same copy (``(batch, heads, dim, padded)``), at lengths
    that are and are not whole blocks."""
    func = pad_axis_func([None, None, 3, 8], 1, 16, 0.0, order=order).with_attr("global_symbol", "pad")
    lib = tvm.compile(tvm.IRModule({"pad": func}), target=resolve_target("x86"))
    for length in (1, 15, 16, 17, 33):
        x = torch.randn(2, length, 3, 8, generator=torch.Generator().manual_seed(length))
        expected = layout(torch.nn.functional.pad(x, (0, 0, 0, 0, 0, -length % 16))).contiguous()
        out = tvm.runtime.tensor(np.zeros(tuple(expected.shape), dtype="float32"))
        lib["pad"](tvm.runtime.tensor(x.numpy()), out)
        assert torch.equal(torch.from_numpy(out.numpy()), expected), length


def test_pad_axis_fills_a_mask_with_minus_infinity() -> None:
    func = pad_axis_func([None, None, None], 2, 16, float("-inf")).with_attr("global_symbol", "pad")
    lib = tvm.compile(tvm.IRModule({"pad": func}), target=resolve_target("x86"))
    x = torch.randn(2, 5, 17)
    out = tvm.runtime.tensor(np.zeros((2, 5, 32), dtype="float32"))
    lib["pad"](tvm.runtime.tensor(x.numpy()), out)
    assert torch.equal(torch.from_numpy(out.numpy()), torch.nn.functional.pad(x, (0, 15), value=float("-inf")))
