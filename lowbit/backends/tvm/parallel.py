"""Small functions run on the calling thread: their parallel loops made serial after scheduling.

Every parallel loop is a fork and a join in TVM's thread pool: the workers are woken, take their share and meet
at a barrier. That costs microseconds on an idle machine and much more on a busy one (a descheduled worker holds
the barrier), while a vision model's late layers (7×7 or 14×14 pixels, squeeze-excite vectors, the classifier)
are a few microseconds of work each. A function whose work, counted by `function_work`, is under
`MIN_PARALLEL_WORK` therefore runs serially; larger ones keep their schedules. The loops' order, bounds and bodies
are unchanged, so results are bit-identical.
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


def function_work(sch: s_tir.Schedule) -> int | None:
    """Executions of the innermost statements of the scheduled function ``sch``: for every block, the product of
    the extents of the loops around it, times its own inner blocks' work (a tensorized step); None when an extent
    is not a constant."""

    def scope_work(scope: s_tir.schedule.SBlockRV) -> int | None:
        total = 0
        for block in sch.get_child_blocks(scope):
            extents = [sch.get(loop).extent for loop in sch.get_loops(block)]
            inner = scope_work(block)
            if inner is None or any(not isinstance(extent, tirx.IntImm) for extent in extents):
                return None
            total += math.prod(int(extent) for extent in extents) * max(inner, 1)
        return total

    return scope_work(sch.get_sblock("root"))


def serial_if_small(func: tirx.PrimFunc, min_work: int = MIN_PARALLEL_WORK) -> tirx.PrimFunc:
    """``func`` with its parallel loops serial when its `function_work` is under ``min_work``, else ``func``."""
    try:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
    except (s_tir.ScheduleError, ValueError, tvm.error.InternalError):
        return func  # not in block form: leave it
    work = function_work(sch)
    if work is None or work >= min_work:
        return func
    changed = False
    for block in sch.get_child_blocks(root):
        for loop in sch.get_loops(block):
            node = sch.get(loop)
            if node.kind != tirx.ForKind.PARALLEL:
                continue
            serial = tirx.For(
                node.loop_var, node.min, node.extent, tirx.ForKind.SERIAL, node.body, node.thread_binding,
                node.annotations, node.step,
            )  # fmt: skip
            sch.state.replace(sch.get_sref(loop), serial)
            changed = True
    return sch.mod["main"] if changed else func


@tvm.transform.module_pass(opt_level=0, name="SerialSmallFunctions")
def serial_small_functions(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """`serial_if_small` on every TIR function of a scheduled module."""
    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            new = serial_if_small(func)
            if not new.same_as(func):
                log.debug("%s runs serially", gvar.name_hint)
                updates[gvar] = new
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


__all__ = ["MIN_PARALLEL_WORK", "function_work", "serial_if_small", "serial_small_functions"]
