"""The ``lowbit::embedding_packed`` custom op: reference numerics, fake impl, export, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from lowbit.ir.ops_embedding import EmbeddingIndexError, embedding_packed
from lowbit.ir.packing import PackedFormatError, dequantize, pack


def make_table(rows: int, dim: int, bits: int, group_size: int, zeros: bool, seed: int = 0) -> dict:
    """Random packed-table tensors (keyword arguments of the op, minus ``ids``)."""
    gen = torch.Generator().manual_seed(seed)
    groups = dim // group_size
    codes = torch.randint(0, 1 << bits, (rows, dim), generator=gen, dtype=torch.uint8)
    return {
        "qweight": pack(codes, bits),
        "scales": torch.rand(rows, groups, generator=gen) * 0.1 + 0.01,
        "zeros": torch.randint(0, 1 << bits, (rows, groups), generator=gen).float() if zeros else None,
        "bits": bits,
        "group_size": group_size,
        "embedding_dim": dim,
    }


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zeros", [False, True])
def test_reference_equals_a_lookup_in_the_dequantized_table(bits: int, zeros: bool) -> None:
    table = make_table(50, 64, bits, 32, zeros)
    ids = torch.randint(0, 50, (3, 7))
    dense = dequantize(table["qweight"], table["scales"], table["zeros"], None, bits, 32, 64)
    out = embedding_packed(ids, **table)
    assert out.dtype == torch.float32 and out.shape == (3, 7, 64)
    assert torch.equal(out, F.embedding(ids, dense))
    assert torch.equal(embedding_packed(ids.to(torch.int32), **table), out)


def test_fake_kernel_gives_the_shape_and_export_traces_the_op() -> None:
    table = make_table(20, 32, 8, 32, zeros=False)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in table.items()}
        out = embedding_packed(mode.from_tensor(torch.zeros(2, 5, dtype=torch.long)), **fake)
    assert out.shape == (2, 5, 32) and out.dtype == torch.float32

    class Lookup(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return embedding_packed(ids, **table)

    exported = torch.export.export(Lookup(), (torch.zeros(2, 5, dtype=torch.long),))
    assert any(node.target is embedding_packed for node in exported.graph.nodes)


def test_bad_tables_and_ids_raise_named_errors() -> None:
    table = make_table(20, 32, 8, 16, zeros=False)
    ids = torch.tensor([0, 19])
    with pytest.raises(PackedFormatError, match="bits=3 is not supported"):
        embedding_packed(ids, **{**table, "qweight": pack(torch.zeros(20, 32, dtype=torch.uint8), 3), "bits": 3})
    with pytest.raises(PackedFormatError, match="group_size=12 does not divide embedding_dim=32"):
        embedding_packed(ids, **{**table, "scales": torch.ones(20, 3), "group_size": 12})
    with pytest.raises(PackedFormatError, match="ids must be int32 or int64"):
        embedding_packed(ids.float(), **table)
    for bad in (20, -1):
        with pytest.raises(EmbeddingIndexError, match=f"id {bad} is outside the table's \\[0, 20\\) rows"):
            embedding_packed(torch.tensor([1, bad]), **table)
