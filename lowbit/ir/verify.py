"""IR verifier: the invariants every pass must leave intact, checked after each pass.

Checks are small functions registered with `check`; pass families add their own
(e.g. the packed-op check lives with the op) so the verifier knows every node form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from lowbit.errors import VerificationError
from lowbit.ir import ops, packing
from lowbit.ir.annotations import META_KEY, LowbitMeta, get_meta
from lowbit.ir.graph import get_attr

Check = Callable[[fx.GraphModule], None]
_CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    """Register an invariant; it raises `VerificationError` naming the offending node."""
    _CHECKS.append(fn)
    return fn


def verify(gm: fx.GraphModule, after: str = "") -> None:
    """Run every registered check on ``gm``; ``after`` names the pass for the message."""
    try:
        for fn in _CHECKS:
            fn(gm)
    except VerificationError as exc:
        where = f"after pass '{after}': " if after else ""
        raise VerificationError(f"{where}{exc}") from None


@check
def _graph_is_well_formed(gm: fx.GraphModule) -> None:
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises RuntimeError/AssertionError with its own text
        raise VerificationError(f"graph is malformed: {exc}") from exc


@check
def _annotations_are_typed(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        meta = node.meta.get(META_KEY)
        if meta is not None and not isinstance(meta, LowbitMeta):
            raise VerificationError(
                f"node '{node.name}' has node.meta['{META_KEY}'] of type {type(meta).__name__}; "
                "annotations must be LowbitMeta instances"
            )


@check
def _packed_linears_are_consistent(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not ops.linear_packed:
            continue
        _, *tensors = node.args[:6]
        bits, group_size, in_features = node.args[6:9]
        meta = get_meta(node)
        if meta is None or meta.quant is None:
            raise VerificationError(f"packed linear '{node.name}' has no quantization annotation")
        if (meta.quant.bits, meta.quant.group_size) != (bits, group_size):
            raise VerificationError(
                f"packed linear '{node.name}' computes w{bits} g{group_size} but is annotated {meta.quant.describe()}"
            )
        values = [None if t is None else _attr(gm, t) for t in tensors]
        try:
            packing.check_layout(*values[:4], bits, group_size, in_features)
        except packing.PackedFormatError as exc:
            raise VerificationError(f"packed linear '{node.name}': {exc}") from exc


def _attr(gm: fx.GraphModule, node: fx.Node) -> object:
    if node.op != "get_attr":
        raise VerificationError(f"packed linear input '{node.name}' must be a get_attr of a buffer, not {node.op}")
    return get_attr(gm, node)
