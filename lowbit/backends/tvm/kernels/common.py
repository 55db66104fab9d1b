"""Helpers shared by the kernel generators."""

from __future__ import annotations

from tvm import tirx

#: ``op_pattern`` value of an opaque operator: Relax's FuseOps leaves such calls alone.
OPAQUE_PATTERN = 8


def finish(func: tirx.PrimFunc, name: str | None) -> tirx.PrimFunc:
    """Mark a hand-scheduled kernel: scheduled (dlight skips it), opaque (never fused), named if asked.

    Without ``name`` the ``global_symbol`` that ``te.create_prim_func`` sets ("main") is
    dropped, so a Relax module can name the function itself.
    """
    func = func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE_PATTERN)
    return func.without_attr("global_symbol") if name is None else func.with_attr("global_symbol", name)


def power_of_two_divisor(extent: int, limit: int) -> int:
    """The largest power of two that divides ``extent`` and is at most ``limit`` (a vector width)."""
    width = 1
    while width * 2 <= limit and extent % (width * 2) == 0:
        width *= 2
    return width


def divisor_at_most(extent: int, limit: int) -> int:
    """The largest divisor of ``extent`` that is at most ``limit``."""
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)
