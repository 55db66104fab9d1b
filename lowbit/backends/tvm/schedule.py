"""Default CPU schedules for the fp32 operators of a lowered graph (no tuning needed).

TVM's legalized operators come out as plain loop nests, which LLVM turns into scalar
single-threaded code ~30× slower than torch. These dlight-style rules give every
PrimFunc a real schedule:

* `TiledReduction` — one reduction block (matmul, conv, pooling, mean): a register tile
  of ``rows × vector`` outputs accumulated in a local buffer while the reduction loops
  run, the vector axis being the innermost spatial loop (contiguous for matmul with a
  (K, N) weight and for NCHW convolution), parallel over the remaining tiles; producers
  such as padding are inlined and elementwise epilogues (bias, ReLU) are folded into
  the write-back. A matmul whose rows or columns leave no whole tile (197 tokens) runs
  on zero-padded copies of its inputs.
* `Elementwise` — only spatial blocks: fuse, parallelize, vectorize.
* `RowReduction` — reductions over the last axis with elementwise stages (softmax,
  layer norm): one parallel loop over rows, each reduction accumulated in vector lanes
  (rfactor), every stage vectorized along the row.
* `ParallelFallback` — anything else: parallelize the outer spatial loop of every block.

`cpu_rules` lists them after dlight's CPU GEMV and reduction rules.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.error import InternalError
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import SBlockInfo, get_sblock_info, normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic.common import divisor_at_most, power_of_two_divisor
from lowbit.backends.tvm.target import float32_lanes

log = logging.getLogger(__name__)

#: Rows of a register tile in `TiledReduction`.
ROW_TILE = 4
#: Rows of the register tile of a matmul whose rows are zero-padded (to a multiple of it): one vector column of
#: `ACCUMULATORS` rows, which measured faster than 4 × 2 vectors on ViT attention (197 tokens, 64 or 208 columns).
PADDED_ROW_TILE = 8
#: Vector registers of one accumulator tile (independent accumulators hide FMA latency).
ACCUMULATORS = 8
#: Outputs per task when a reduction has one output row: a strip of accumulators in L1.
STREAM_TILE = 1024


class TiledReduction(ScheduleRule):
    """Register-tiled schedule for a function with exactly one reduction block."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        normalized = _normalized(func, target)
        if normalized is None:
            return None
        sch, infos = normalized
        reductions = [info for info in infos if info.is_reduction()]
        if len(reductions) != 1 or any(not (i.is_reduction() or i.is_injective()) for i in infos):
            return None
        if not _static_extents(reductions[0]):
            return None
        main = reductions[0]
        try_inline(sch, [info for info in infos if info is not main])  # padding in, epilogues stay
        schedule_tiled_reduction(sch, main.block_rv, float32_lanes(target))
        return sch


class Elementwise(ScheduleRule):
    """Fuse, parallelize and vectorize functions whose blocks are all spatial."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        normalized = _normalized(func, target)
        if normalized is None or not all(info.is_injective() for info in normalized[1]):
            return None
        sch, infos = normalized
        remaining = try_inline(sch, infos)
        lanes = float32_lanes(target)
        for info in remaining:
            parallel_vectorize(sch, info.block_rv, lanes)
        return sch


class RowReduction(ScheduleRule):
    """Row-wise reductions over the last axis with elementwise stages (softmax, layer norm, RMS norm).

    Every block is computed inside one parallel loop over the output's rows, so a row's
    statistics and intermediates stay in L1. A reduction is split into vector-wide partial
    results (rfactor) accumulated with vector instructions, then folded; the
    elementwise stages and the output are vectorized along the row. A stage read by
    several others (softmax's exponentials) is kept per row instead of recomputed.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        normalized = _normalized(func, target)
        if normalized is None:
            return None
        sch, infos = normalized
        output = infos[-1]
        reductions = [info for info in infos if info.is_reduction()]
        if not reductions or not output.is_injective() or not all(_static_extents(info) for info in infos):
            return None
        if any(not (info.is_reduction() or info.is_injective()) for info in infos):
            return None
        extents = [int(it.dom) for it in output.iters[:-1]]
        if not extents or not all(_reduces_last_axis(info, extents) for info in reductions):
            return None
        lanes = float32_lanes(target)
        stages: list[tuple[s_tir.schedule.SBlockRV, str]] = []  # (block, "partial" | "fold" | "spatial")
        for info in _inline_single_use(sch, infos[:-1]):
            partial = _partials(sch, info.block_rv, lanes) if info.is_reduction() else None
            stages += [(partial, "partial")] if partial is not None else []
            stages.append((info.block_rv, "fold" if info.is_reduction() else "spatial"))
        rows = parallel_rows(sch, output.block_rv, lanes)
        for block, _kind in reversed(stages):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        for block, kind in stages:
            if kind == "partial":
                _vectorize_partials(sch, block)
            elif kind == "spatial":
                _vectorize_innermost(sch, block, _row_simd(sch, block, lanes))
        return sch


class ParallelFallback(ScheduleRule):
    """Parallelize the outermost spatial loop of each block (multi-reduction functions)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        normalized = _normalized(func, target)
        if normalized is None:
            return None
        sch, infos = normalized
        for info in try_inline(sch, infos):
            if info.iters and info.iters[0].kind == "S":
                sch.parallel(info.iters[0].loop_rv)
        return sch


class Guarded(ScheduleRule):
    """A rule that declines (returns None) instead of raising when its schedule does not fit."""

    def __init__(self, rule: ScheduleRule) -> None:
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        try:
            return self.rule.apply(func, target, tunable)
        except (s_tir.ScheduleError, ValueError, InternalError) as error:
            log.debug("%s declined a function: %s", type(self.rule).__name__, str(error).splitlines()[0])
            return None


def parallel_rows(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> s_tir.schedule.LoopRV:
    """Fuse the outer loops of ``block`` into a parallel row loop, vectorize its last loop; return the row loop."""
    loops = sch.get_loops(block)
    rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    sch.parallel(rows)
    _vectorize_innermost(sch, block, _row_simd(sch, block, lanes))
    return rows


def _row_simd(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> int:
    """The vector width for the innermost loop of ``block``: the largest power of two up to ``lanes`` dividing it."""
    return power_of_two_divisor(_static_extent(sch, sch.get_loops(block)[-1]) or 1, lanes)


def _partials(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> s_tir.schedule.SBlockRV | None:
    """Split the innermost (reduction) loop of ``block`` into a block of ``simd``-wide partial results (rfactor).

    ``block`` then folds the partials, one after the other: short rows (softmax over 32
    keys) get fewer lanes, about the square root of the row length, which balances the
    vector accumulation against the serial fold. Returns the partials' block, or None (the
    block is left as it is) when the row length has no power-of-two divisor.
    """
    length = _static_extent(sch, sch.get_loops(block)[-1]) or 1
    while lanes > 1 and lanes * lanes > 2 * length:
        lanes //= 2
    simd = power_of_two_divisor(length, lanes)
    if simd == 1:
        return None
    lane = sch.split(sch.get_loops(block)[-1], factors=[None, simd])[1]
    return sch.rfactor(lane, factor_axis=len(sch.get(block).writes[0].region))


def _vectorize_partials(sch: s_tir.Schedule, partial: s_tir.schedule.SBlockRV) -> None:
    """Accumulate a partials block (after `RowReduction`'s compute_at) along the row, one vector of lanes at a time."""
    lane, *_, step = sch.get_loops(partial)[1:]  # compute_at orders loops as the block's iterators: the lane first
    sch.reorder(step, lane)
    sch.vectorize(lane)
    _vectorize_innermost(sch, sch.decompose_reduction(partial, step), int(sch.get(lane).extent))


def _inline_single_use(sch: s_tir.Schedule, infos: list[SBlockInfo]) -> list[SBlockInfo]:
    """Inline the spatial blocks among ``infos`` that have one consumer; the others (read twice) are kept."""
    kept = []
    for info in infos:
        if not info.is_reduction() and len(sch.get_consumers(info.block_rv)) == 1:
            try:
                sch.compute_inline(info.block_rv)
                continue
            except s_tir.ScheduleError:
                pass
        kept.append(info)
    return kept


def _reduces_last_axis(info: SBlockInfo, rows: list[int]) -> bool:
    """Whether ``info`` is one reduction over an innermost axis, its spatial iterators being ``rows``."""
    kinds = "".join(it.kind for it in info.iters)
    spatial = [int(it.dom) for it in info.iters if it.kind == "S" and int(it.dom) != 1]
    return kinds.endswith("R") and kinds.count("R") == 1 and spatial == [r for r in rows if r != 1]


def _normalized(func: tirx.PrimFunc, target: Target) -> tuple[s_tir.Schedule, list[SBlockInfo]] | None:
    """A schedule of ``func`` with its block infos, if it is a CPU PrimFunc in normal form (the rules' common start)."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    return None if infos is None else (sch, infos)


def cpu_rules() -> list[ScheduleRule]:
    """The rule chain for ``dlight.ApplyDefaultSchedule`` on CPU targets, most specific first."""
    rules = [
        dlight.cpu.GEMV(),
        TiledReduction(),
        Elementwise(),
        RowReduction(),
        dlight.cpu.Reduction(),
        ParallelFallback(),
    ]
    return [Guarded(rule) for rule in rules]


def schedule_tiled_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """Tile ``block`` (spatial iterators first, then reductions) into accumulator tiles.

    Loop order: [outer spatial tiles] (fused, parallel) → reductions → tile rows
    (unrolled) → tile columns (vectorized). With several output rows the tile is
    ``ROW_TILE × (ACCUMULATORS / ROW_TILE)`` vector registers; with one row (GEMV-like)
    it is a `STREAM_TILE`-wide strip kept in L1, so the second operand streams
    through contiguous rows. The tile lives in a local buffer written back once, with
    any elementwise consumers inlined into the write-back.
    """
    padded, row_tile = _pad_to_tiles(sch, block, lanes)
    info = get_sblock_info(sch, block)
    spatial = [it for it in info.iters if it.kind == "S"]
    reduce = [it.loop_rv for it in info.iters if it.kind == "R"]
    if not spatial or not reduce:
        raise ValueError(f"block '{info.name}' is not a reduction with spatial outputs")
    write_back = sch.cache_write(block, 0, "local")
    rows = divisor_at_most(int(spatial[-2].dom), row_tile) if len(spatial) >= 2 else 1
    width = power_of_two_divisor(int(spatial[-1].dom), STREAM_TILE if rows == 1 else lanes * ACCUMULATORS // rows)
    simd = power_of_two_divisor(width, lanes)
    column_outer, column, lane = sch.split(spatial[-1].loop_rv, factors=[None, width // simd, simd])
    outer, tile_loops = [it.loop_rv for it in spatial[:-2]] + [column_outer], [column, lane]
    if len(spatial) >= 2:
        row_outer, row = sch.split(spatial[-2].loop_rv, factors=[None, rows])
        outer.append(row_outer)  # innermost: consecutive tasks share the same slice of the second operand
        tile_loops.insert(0, row)
        sch.unroll(row)
    sch.reorder(*outer, *reduce, *tile_loops)
    fused = sch.fuse(*outer)
    sch.parallel(fused)
    sch.reverse_compute_at(write_back, fused)
    _inline_consumers(sch, write_back)
    _vectorize_innermost(sch, block, simd)
    _vectorize_innermost(sch, write_back, simd)
    _vectorize_innermost(sch, sch.decompose_reduction(block, reduce[0]), simd)
    for copy in padded:
        if _exists(sch, copy):  # the result's copy may have been inlined into the write-back
            parallel_rows(sch, copy, lanes)


def _pad_to_tiles(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int
) -> tuple[list[s_tir.schedule.SBlockRV], int]:
    """Pad a matmul-like block whose rows or columns would leave `schedule_tiled_reduction` a degenerate tile.

    197 rows (a ViT's tokens) have no divisor up to `ROW_TILE` but 1, and 197 columns no
    power-of-two divisor: the tile would be one scalar. Such rows are then rounded up to a
    multiple of `PADDED_ROW_TILE` and such (odd) columns to a whole register tile, computing
    on zero-padded copies of its inputs (``pad_einsum``); a copy block takes the result back
    out, with the block's elementwise consumers inlined into it. Returns the copy blocks
    (inputs and result) to schedule, none where nothing is padded, the block reduces over
    several axes or its reads are not plain indexed loads; and the row tile to use.
    """
    iters = get_sblock_info(sch, block).iters
    spatial = [index for index, it in enumerate(iters) if it.kind == "S"]
    if len(iters) - len(spatial) != 1:
        return [], ROW_TILE  # a matmul reduces over one axis
    extents = [int(it.dom) for it in iters]
    padding = list(extents)
    if len(spatial) >= 2 and extents[spatial[-2]] > 1 and divisor_at_most(extents[spatial[-2]], ROW_TILE) == 1:
        padding[spatial[-2]] = _round_up(extents[spatial[-2]], PADDED_ROW_TILE)
    tile = lanes * ACCUMULATORS // ROW_TILE
    if spatial and extents[spatial[-1]] >= tile and extents[spatial[-1]] % 2:
        padding[spatial[-1]] = _round_up(extents[spatial[-1]], tile)
    if padding == extents:
        return [], ROW_TILE
    try:
        sch.pad_einsum(block, padding)
    except s_tir.ScheduleError:
        return [], ROW_TILE
    result = sch.get_consumers(block)[0]
    _inline_consumers(sch, result)
    rows_padded = len(spatial) >= 2 and padding[spatial[-2]] != extents[spatial[-2]]
    return [*sch.get_producers(block), result], PADDED_ROW_TILE if rows_padded else ROW_TILE


def _exists(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    try:
        sch.get(block)
    except ValueError:
        return False
    return True


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _vectorize_innermost(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, simd: int) -> None:
    """Vectorize the innermost loop of ``block`` in ``simd``-wide pieces (nothing for ``simd == 1``)."""
    if simd == 1:
        return
    loop = sch.get_loops(block)[-1]
    if _static_extent(sch, loop) != simd:
        loop = sch.split(loop, factors=[None, simd])[1]
    sch.vectorize(loop)


def parallel_vectorize(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """Fuse the loops of a spatial block, run the outer part in parallel and vectorize the inner part."""
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = _static_extent(sch, fused)
    vec = power_of_two_divisor(extent, lanes) if extent is not None else 1
    if vec == 1:
        sch.parallel(fused)
        return
    outer, inner = sch.split(fused, factors=[None, vec])
    sch.parallel(outer)
    sch.vectorize(inner)


def _inline_consumers(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
    """Inline elementwise consumers of ``block`` into it, as long as that works."""
    changed = True
    while changed:
        changed = False
        for consumer in sch.get_consumers(block):
            try:
                sch.reverse_compute_inline(consumer)
                changed = True
            except (s_tir.ScheduleError, InternalError):  # TVM 0.27 asserts on some broadcast consumers
                log.debug("consumer of %s stays a separate block", sch.get(block).name_hint)


def _static_extents(info: SBlockInfo) -> bool:
    return all(isinstance(it.dom, int) for it in info.iters)


def _static_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


__all__ = [
    "Elementwise",
    "ParallelFallback",
    "RowReduction",
    "TiledReduction",
    "cpu_rules",
    "parallel_rows",
    "parallel_vectorize",
    "schedule_tiled_reduction",
]
