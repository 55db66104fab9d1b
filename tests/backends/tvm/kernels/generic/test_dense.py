"""The dense fallback kernel against ``F.linear``: panels when N is a multiple of the vector width, else (K, N)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm

from lowbit.backends.tvm.kernels.generic.dense import dense_plan
from lowbit.backends.tvm.target import float32_lanes, resolve_target


@pytest.mark.parametrize(
    ("rows", "n_out", "bias"),
    [(1, 64, True), (5, 64, False), (40, 96, True), (3, 10, True), (8, 40, False), (200, 64, True)],
)
def test_dense_matches_linear(rows: int, n_out: int, bias: bool) -> None:
    """Within 1e-5 relative on random values, whichever layout N allows (10 is no multiple of a vector; 40 is
    one of AVX2's 8 lanes, not of AVX-512's 16)."""
    target = resolve_target("x86")
    gen = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(n_out, 320, generator=gen), torch.randn(rows, 320, generator=gen)
    b = torch.randn(n_out, generator=gen) if bias else None
    func, consts = dense_plan(weight, b, rows, float32_lanes(target), name="dense")
    assert consts[0].dim() == (3 if n_out % float32_lanes(target) == 0 else 2)  # (N/W, K, W) panels or (K, N)
    lib = tvm.compile(tvm.IRModule({"dense": func}), target=target)
    out = tvm.runtime.tensor(np.zeros((rows, n_out), dtype="float32"))
    lib["dense"](*[tvm.runtime.tensor(t.numpy()) for t in [x, *consts]], out)
    expected = F.linear(x, weight, b)
    assert (torch.from_numpy(out.numpy()) - expected).abs().max() / expected.abs().max() < 1e-5
