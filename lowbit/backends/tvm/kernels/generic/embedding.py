"""The packed-table lookup of `lowbit.ir.ops_embedding`: gather each id's packed row and decode it per group.

One TIR function for every target: ``out[i, d] = (code(T[ids[i]], d) − zero) · scale[ids[i], d / group]``, in
the reference's order of float32 operations, so it equals the reference bit for bit. It is left unscheduled: it is
an injective gather, which the toolchain's default rules schedule (parallel rows on CPUs, threads on GPUs).
"""

from __future__ import annotations

from tvm import te, tirx

from lowbit.ir import packing


def embedding_func(
    count: int, rows: int, dim: int, bits: int, group_size: int, asymmetric: bool, id_dtype: str
) -> tirx.PrimFunc:
    """The lookup of ``count`` ids in a table of ``rows`` packed rows of ``dim`` codes.

    Arguments, in order: ``ids (count,) id_dtype``, ``qweight (rows, row_bytes) u8``, ``scales (rows, G) f32``,
    then ``zeros (rows, G) f32`` if asymmetric, and the output ``(count, dim) f32``.
    """
    per_byte = 8 // bits
    groups = dim // group_size
    ids = te.placeholder((count,), id_dtype, name="ids")
    qweight = te.placeholder((rows, packing.packed_row_bytes(dim, bits)), "uint8", name="qweight")
    scales = te.placeholder((rows, groups), "float32", name="scales")
    zeros = te.placeholder((rows, groups), "float32", name="zeros") if asymmetric else None
    default_zero = tirx.const(packing.default_zero(bits), "float32")

    def decode(i: tirx.PrimExpr, d: tirx.PrimExpr) -> tirx.PrimExpr:
        row = ids[i].astype("int64")
        byte = qweight[row, d // per_byte].astype("int32")
        code = byte if bits == 8 else (byte >> ((d % per_byte) * bits)) & ((1 << bits) - 1)
        zero = default_zero if zeros is None else zeros[row, d // group_size]
        return (code.astype("float32") - zero) * scales[row, d // group_size]

    out = te.compute((count, dim), decode, name="embedding")
    args = [ids, qweight, scales] + ([zeros] if zeros is not None else [])
    # Without te's "main" symbol, the Relax module names the function itself.
    return te.create_prim_func([*args, out]).without_attr("global_symbol")


__all__ = ["embedding_func"]
