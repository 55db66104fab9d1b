"""Small parallel loops run on the calling thread: made serial after scheduling.

Every parallel loop is a fork and a join in TVM's thread pool: the workers are woken, take their share and meet
at a barrier. That costs microseconds on an idle machine and much more on a busy one (a descheduled worker holds
the barrier), while a vision model's late layers (7×7 or 14×14 pixels, squeeze-excite vectors, the classifier),
and the prologues of some int8 kernels (the codes of a 7×7 input), are a few microseconds of work each. A parallel
loop whose work, counted by `parallel_work`, is under `MIN_PARALLEL_WORK` therefore runs serially; larger ones stay
parallel. The loops' order, bounds and bodies are unchanged, so results are bit-identical.
"""

from __future__ import annotations

import logging
import math

import tvm
from tvm import s_tir, tirx

log = logging.getLogger(__name__)

#: Loop iterations (vector lanes counted one by one) below which a function runs on the calling thread: about
#: 10 µs of vectorized elementwise work, the order of a fork and join of the thread pool on a shared machine.
MIN_PARALLEL_WORK = 1 << 15


def parallel_work(sch: s_tir.Schedule) -> dict[tirx.Var, int | None]:
    """The work inside each parallel loop of the scheduled function ``sch``, by loop variable: for every block in
    the loop, the product of the extents of the loops around it from that loop inwards, times the work of one
    execution of the block (its inner blocks', or `_step`), summed; None when an extent is not a constant."""

    def inner_work(scope: s_tir.schedule.SBlockRV) -> int | None:
        children = sch.get_child_blocks(scope)
        if not children:
            return _step(sch.get(scope))
        total = 0
        for block in children:
            extents = [_constant(sch.get(loop).extent) for loop in sch.get_loops(block)]
            inner = inner_work(block)
            if inner is None or None in extents:
                return None
            total += math.prod(extents) * inner
        return total

    work: dict[tirx.Var, int | None] = {}
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = [sch.get(loop) for loop in sch.get_loops(block)]
        extents = [_constant(loop.extent) for loop in loops]
        inner = inner_work(block)
        for depth, loop in enumerate(loops):
            if loop.kind != tirx.ForKind.PARALLEL:
                continue
            known = inner is not None and None not in extents[depth:] and work.get(loop.loop_var, 0) is not None
            amount = math.prod(extents[depth:]) * inner if known else None
            work[loop.loop_var] = work.get(loop.loop_var, 0) + amount if amount is not None else None
    return work


def serialize_small_loops(func: tirx.PrimFunc, min_work: int = MIN_PARALLEL_WORK) -> tirx.PrimFunc:
    """``func`` with each parallel loop whose `parallel_work` is under ``min_work`` made serial (``func`` itself
    when there is none)."""
    try:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
    except (s_tir.ScheduleError, ValueError, tvm.error.InternalError):
        return func  # not in block form: leave it
    small = {var for var, work in parallel_work(sch).items() if work is not None and work < min_work}
    if not small:
        return func
    for block in sch.get_child_blocks(root):
        for loop in sch.get_loops(block):
            node = sch.get(loop)
            if node.kind == tirx.ForKind.PARALLEL and node.loop_var in small:
                serial = tirx.For(
                    node.loop_var, node.min, node.extent, tirx.ForKind.SERIAL, node.body, node.thread_binding,
                    node.annotations, node.step,
                )  # fmt: skip
                sch.state.replace(sch.get_sref(loop), serial)
    return sch.mod["main"]


def _step(block: s_tir.SBlock) -> int:
    """The work of one execution of a leaf block: the most elements any of its buffer regions spans, 1 for a
    scalar statement and the operand width for a tensorized step (a ``vpdpbusd`` reads 64 bytes of weights).
    A block with only spatial iterators (elementwise, a slice, a concatenation) counts the elements it writes:
    its read regions may span the distance between two elements it reads (a gated MLP's ``silu(x[i]) ·
    x[i + N]`` reads a region of ``N + 1``), which is no work."""
    spatial = bool(block.iter_vars) and all(var.iter_type == tirx.IterVar.DataPar for var in block.iter_vars)
    regions = block.writes if spatial else [*block.reads, *block.writes]
    sizes = [math.prod(_constant(r.extent) or 1 for r in region.region) for region in regions]
    return max([1, *sizes])


def _constant(extent: tirx.PrimExpr) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


@tvm.transform.module_pass(opt_level=0, name="SerialSmallLoops")
def serial_small_loops(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """`serialize_small_loops` on every TIR function of a scheduled module."""
    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            new = serialize_small_loops(func)
            if not new.same_as(func):
                log.debug("%s: small parallel loops made serial", gvar.name_hint)
                updates[gvar] = new
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


__all__ = ["MIN_PARALLEL_WORK", "parallel_work", "serial_small_loops", "serialize_small_loops"]
