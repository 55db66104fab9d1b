"""``torch.ops.lowbit.embedding_packed``: a table lookup whose rows are stored in the packed weight format.

``embedding_packed(ids, qweight, scales, zeros, bits, group_size, embedding_dim)`` gathers the packed rows
``ids`` names and decodes them with their per-group scales (and zero points), ``scale · (q − zero)`` as in
`lowbit.ir.packing`; docs/methods.md (Packed embeddings) gives the math. The table is a packed weight like a
linear layer's, so a tied output projection runs ``linear_packed`` on the very same tensors. Its PyTorch
implementation is the reference every backend reproduces; a fake implementation serves FakeTensor propagation
and torch.export. Importing this module registers the op and its verifier check.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from lowbit.errors import InputError, VerificationError
from lowbit.ir import ops, packing
from lowbit.ir.annotations import get_meta
from lowbit.ir.graph import get_attr
from lowbit.ir.verify import check

log = logging.getLogger(__name__)

#: Code widths a packed table may use (whole codes per byte: one or two per byte).
EMBEDDING_BITS: tuple[int, ...] = (4, 8)

EMBEDDING_PACKED_SCHEMA = (
    "(Tensor ids, Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size, int embedding_dim) -> Tensor"
)


class EmbeddingIndexError(InputError, IndexError):
    """An id outside ``[0, rows)`` of a packed table (eager ``F.embedding`` raises ``IndexError`` for it)."""


def check_table(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int, dim: int
) -> None:
    """Raise `PackedFormatError` unless the tensors are a packed table of ``bits``-bit codes in whole groups."""
    if bits not in EMBEDDING_BITS:
        raise packing.PackedFormatError(
            f"embedding_packed: bits={bits!r} is not supported; choose one of {', '.join(map(str, EMBEDDING_BITS))}"
        )
    packing.check_layout(qweight, scales, zeros, None, bits, group_size, dim)
    if dim % group_size:
        raise packing.PackedFormatError(
            f"embedding_packed: group_size={group_size} does not divide embedding_dim={dim}"
        )


def _check_ids(ids: torch.Tensor) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        raise packing.PackedFormatError(f"embedding_packed: ids must be int32 or int64, got {ids.dtype}")


def _embedding_packed(
    ids: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    embedding_dim: int,
) -> torch.Tensor:
    """Reference kernel: gather the packed rows of ``ids``, then decode them as `packing.dequantize` does."""
    check_table(qweight, scales, zeros, bits, group_size, embedding_dim)
    _check_ids(ids)
    flat = ids.reshape(-1).to(torch.long)
    rows = qweight.shape[0]
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
        offending = int(flat.min()) if int(flat.min()) < 0 else int(flat.max())
        raise EmbeddingIndexError(f"embedding_packed: id {offending} is outside the table's [0, {rows}) rows")
    picked = packing.dequantize(
        qweight[flat], scales[flat], None if zeros is None else zeros[flat], None, bits, group_size, embedding_dim
    )
    return picked.reshape(*ids.shape, embedding_dim)


def _embedding_packed_fake(
    ids: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    embedding_dim: int,
) -> torch.Tensor:
    """Shape function: ``ids (...) -> (..., embedding_dim)`` float32 on the table's device."""
    check_table(qweight, scales, zeros, bits, group_size, embedding_dim)
    _check_ids(ids)
    return ids.new_empty((*ids.shape, embedding_dim), dtype=torch.float32)


def _register() -> None:
    op = torch.library.custom_op(
        f"{ops.NAMESPACE}::embedding_packed", _embedding_packed, mutates_args=(), schema=EMBEDDING_PACKED_SCHEMA
    )
    op.register_fake(_embedding_packed_fake)
    log.debug("registered %s::embedding_packed", ops.NAMESPACE)


if not hasattr(getattr(torch.ops, ops.NAMESPACE), "embedding_packed"):
    _register()

#: The op overload that graphs call and backends match on.
embedding_packed = torch.ops.lowbit.embedding_packed.default


@check
def _packed_embeddings_are_consistent(gm: fx.GraphModule) -> None:
    """Each ``embedding_packed`` node: annotated w{bits} g{group_size}, its table a packed get_attr constant."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not embedding_packed:
            continue
        bits, group_size, dim = node.args[4:7]
        meta = get_meta(node)
        if meta is None or meta.quant is None:
            raise VerificationError(f"packed embedding '{node.name}' has no quantization annotation")
        if (meta.quant.bits, meta.quant.group_size) != (bits, group_size):
            raise VerificationError(
                f"packed embedding '{node.name}' computes w{bits} g{group_size} but is annotated "
                f"{meta.quant.describe()}"
            )
        values = []
        for arg in node.args[1:4]:
            if arg is not None and (not isinstance(arg, fx.Node) or arg.op != "get_attr"):
                raise VerificationError(f"packed embedding '{node.name}': table input {arg} must be a get_attr")
            values.append(None if arg is None else get_attr(gm, arg))
        try:
            check_table(*values, bits, group_size, dim)
        except packing.PackedFormatError as exc:
            raise VerificationError(f"packed embedding '{node.name}': {exc}") from exc


__all__ = ["EMBEDDING_BITS", "EMBEDDING_PACKED_SCHEMA", "EmbeddingIndexError", "check_table", "embedding_packed"]
