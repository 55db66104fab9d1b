"""IR verifier: the invariants every pass must leave intact, checked after each pass.

Checks are small functions registered with `check`; pass families add their own
(e.g. the packed-op check lives with the op) so the verifier knows every node form.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from lowbit.errors import VerificationError
from lowbit.ir.annotations import META_KEY, LowbitMeta

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

