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
* `Convolution` — channels-last convolutions, pooling and spatial means: the padded input
  materialized once, kernel rows and columns outside the input channels, a register tile of
  output columns × channel vectors sized to the register file (`conv_tile`).
* `Elementwise` — only spatial blocks: vectors along the innermost axis (the channels), the loops outside
  them fused and parallel; a block that interleaves a few input rows along its innermost axis (the NCHW image
  written as NHWC pixel rows) reads each row in order instead (`parallel_interleave`).
* `RowReduction` — reductions over the last axis with elementwise stages (softmax,
  layer norm): one parallel loop over rows, each reduction accumulated in vector lanes
  (rfactor), every stage vectorized along the row; `SingleRowReduction` the same for one row, serially.
* `ParallelFallback` — anything else: parallelize the outer spatial loop of every block.

`cpu_rules` lists them with dlight's CPU GEMV and reduction rules, `Convolution` first.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import tvm
from tvm import s_tir, sym, tirx
from tvm.error import InternalError
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import IterInfo, SBlockInfo, get_sblock_info, normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic.common import (
    L2,
    LINE_BYTES,
    divisor_at_most,
    power_of_two_divisor,
    prefetch,
    prepend_to_loop,
)
from lowbit.backends.tvm.target import float32_lanes, has_features, target_arch

log = logging.getLogger(__name__)
_ANALYZER = sym.Analyzer()

#: Rows of a register tile in `TiledReduction`.
ROW_TILE = 4
#: Rows of the register tile of a matmul whose rows are zero-padded (to a multiple of it): one vector column of
#: `ACCUMULATORS` rows, which measured faster than 4 × 2 vectors on ViT attention (197 tokens, 64 or 208 columns).
PADDED_ROW_TILE = 8
#: Vector registers of one accumulator tile (independent accumulators hide FMA latency).
ACCUMULATORS = 8
#: Most channel vectors in a convolution's register tile.
MAX_TILE_VECTORS = 4
#: Outputs per task when a reduction has one output row: a strip of accumulators in L1.
STREAM_TILE = 1024
#: Output rows × columns of a depthwise convolution's register tile (each with the tile's channel vectors).
DEPTHWISE_TILE = (2, 2)
#: Most weight elements a pointwise convolution keeps in L2 while its pixel tiles run outside its channel tiles
#: (1 MiB of fp32: ConvNeXt-T's largest such layer has 590 KB; a core of this generation has 1-2 MiB of L2).
L2_WEIGHT_ELEMENTS = 1 << 18


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
        main = reductions[0]
        try_inline(sch, [info for info in infos if info is not main])  # padding in, epilogues stay
        schedule_tiled_reduction(sch, main.block_rv, float32_lanes(target))
        return sch


class Convolution(ScheduleRule):
    """Channels-last convolutions and pooling windows: one reduction into an ``(n, oh, ow, oc)`` output.

    Matches the NHWC conv2d (HWIO weights, grouped and depthwise included), pooling and spatial means that
    `lowbit.backends.tvm.layout` leaves after legalization (`Window`). A sliding window's padded input is
    materialized once (a parallel, vectorized copy) instead of being recomputed, behind a bounds test, in the
    inner loop; other producers are inlined. See `schedule_convolution` for the loop nest.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        normalized = _normalized(func, target)
        if normalized is None:
            return None
        sch, infos = normalized
        reductions = [info for info in infos if info.is_reduction()]
        if len(reductions) != 1 or any(not (i.is_reduction() or i.is_injective()) for i in infos):
            return None
        main = reductions[0]
        window = Window.of(sch, main)
        if window is None:
            return None
        padded = _data_producer(sch, main.block_rv) if window.sliding else None
        try_inline(sch, [info for info in infos if info is not main and not _same_block(sch, info, padded)])
        lanes = float32_lanes(target)
        if padded is not None:
            parallel_channels(sch, padded, lanes)
        schedule_convolution(sch, main.block_rv, window, lanes, vector_registers(target))
        return sch


@dataclass(frozen=True)
class Window:
    """The iterators of a channels-last window reduction (conv2d, pooling, spatial mean) after normalization.

    ``height``, ``width`` and ``batch`` are None where their extent is 1 (normalization drops such iterators);
    ``sliding`` says whether a reduction iterator moves over the input's rows or columns (a kernel larger than
    1×1, a pooling window), so that each input value is read by several outputs.
    """

    batch: IterInfo | None
    height: IterInfo | None
    width: IterInfo | None
    channel: IterInfo
    reduce: tuple[IterInfo, ...]
    sliding: bool

    @classmethod
    def of(cls, sch: s_tir.Schedule, info: SBlockInfo) -> Window | None:
        """The window of reduction block ``info``, or None unless it writes a 4-D output indexed by its spatial
        iterators with the channels last, its first read is a 4-D input whose rows and columns follow the
        output's, the channels (or their lane in a packed weight) are the last index of some read, and no
        other read (the weights) depends on the output's pixel."""
        block = sch.get(info.block_rv)
        if not _static_extents(info) or len(block.writes) != 1 or not block.reads:
            return None
        spatial = [it for it in info.iters if it.kind == "S"]
        reduce = tuple(it for it in info.iters if it.kind == "R")
        out = [_index_iter(r.min, spatial) for r in block.writes[0].region]
        data = block.reads[0].region
        if len(out) != 4 or len(data) != 4 or out[3] is None or not reduce:
            return None
        if {id(it) for it in spatial} != {id(it) for it in out if it is not None}:
            return None
        channel = out[3]
        if not any(_is_channel(r.region[-1].min, channel.var) for r in block.reads):
            return None
        if any(_uses(r.min, {channel.var}) for r in data[1:3]):
            return None
        pixel = {it.var for it in out[:3] if it is not None}
        if any(_uses(r.min, pixel) for read in block.reads[1:] for r in read.region):
            return None
        sliding = any(_uses(r.min, {it.var for it in reduce}) for r in data[1:3])
        return cls(out[0], out[1], out[2], channel, reduce, sliding)


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
            factor = interleaving_factor(sch, info.block_rv)
            if factor is None:
                parallel_vectorize(sch, info.block_rv, lanes)
            else:
                parallel_interleave(sch, info.block_rv, factor)
        return sch


class RowReduction(ScheduleRule):
    """Row-wise reductions over the last axis with elementwise stages (softmax, layer norm, RMS norm).

    Every block is computed inside one parallel loop over the output's rows, so a row's
    statistics and intermediates stay in L1. A reduction is split into vector-wide partial
    results (rfactor) accumulated with vector instructions, then folded; the
    elementwise stages and the output are vectorized along the row. A stage read by
    several others (softmax's exponentials) is kept per row instead of recomputed, unless the
    row's length is symbolic: a row buffer of a run-time size would be allocated for every row.
    """

    #: Whether the rule takes the functions of one row (`SingleRowReduction`) instead of those of several.
    single_row = False

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        normalized = _normalized(func, target)
        if normalized is None:
            return None
        sch, infos = normalized
        output = infos[-1]
        reductions = [info for info in infos if info.is_reduction()]
        if not reductions or not output.is_injective():
            return None
        if any(not (info.is_reduction() or info.is_injective()) for info in infos):
            return None
        extents = [it.dom for it in output.iters[:-1]]
        if bool(extents) == self.single_row or not all(_reduces_last_axis(info, extents) for info in reductions):
            return None
        lanes = float32_lanes(target)
        stages: list[tuple[s_tir.schedule.SBlockRV, str]] = []  # (block, "partial" | "fold" | "spatial")
        static = isinstance(output.iters[-1].dom, int | tirx.IntImm)
        for info in _inline_single_use(sch, infos[:-1], recompute=not static):
            partial = _partials(sch, info.block_rv, lanes) if info.is_reduction() else None
            stages += [(partial, "partial")] if partial is not None else []
            stages.append((info.block_rv, "fold" if info.is_reduction() else "spatial"))
        rows = self._row_loop(sch, output.block_rv, lanes)
        for block, _kind in reversed(stages):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        for block, kind in stages:
            if kind == "partial":
                _vectorize_partials(sch, block)
            elif kind == "spatial":
                _vectorize_innermost(sch, block, _row_simd(sch, block, lanes))
        return sch

    def _row_loop(self, sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> s_tir.schedule.LoopRV:
        """The loop over the output's rows that every stage is computed in, the output vectorized along the row."""
        return parallel_rows(sch, block, lanes)


class SingleRowReduction(RowReduction):
    """`RowReduction` of a single row (the classifier's layer norm of a ConvNeXt, over a 1×1 image's channels).

    The stages are computed under a unit loop on the calling thread, their reductions in vector lanes. dlight's CPU
    reduction rule would instead run the output's elements in parallel and compute the row's statistics again for
    each of them: 768² steps, a millisecond, for a layer norm over 768 channels.
    """

    single_row = True

    def _row_loop(self, sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> s_tir.schedule.LoopRV:
        row = sch.add_unit_loop(sch.get_loops(block)[0])
        _vectorize_innermost(sch, block, _row_simd(sch, block, lanes))
        return row


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
    return power_of_two_divisor(_known_divisor(sch.get(sch.get_loops(block)[-1]).extent), lanes)


def _partials(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> s_tir.schedule.SBlockRV | None:
    """Split the innermost (reduction) loop of ``block`` into a block of ``simd``-wide partial results (rfactor).

    ``block`` then folds the partials, one after the other: short rows (softmax over 32
    keys) get fewer lanes, about the square root of the row length, which balances the
    vector accumulation against the serial fold (a symbolic length, which may be long, gets the
    widest vector that divides it). Returns the partials' block, or None (the
    block is left as it is) when the row length has no power-of-two divisor.
    """
    extent = sch.get(sch.get_loops(block)[-1]).extent
    length = _known_divisor(extent)
    while isinstance(extent, int | tirx.IntImm) and lanes > 1 and lanes * lanes > 2 * length:
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


def _inline_single_use(sch: s_tir.Schedule, infos: list[SBlockInfo], recompute: bool = False) -> list[SBlockInfo]:
    """Inline the spatial blocks among ``infos`` that have one consumer (with ``recompute``, every one); the others
    (read twice) are kept."""
    kept = []
    for info in infos:
        if not info.is_reduction() and (recompute or len(sch.get_consumers(info.block_rv)) == 1):
            try:
                sch.compute_inline(info.block_rv)
                continue
            except s_tir.ScheduleError:
                pass
        kept.append(info)
    return kept


def _reduces_last_axis(info: SBlockInfo, rows: list[int | tirx.PrimExpr]) -> bool:
    """Whether ``info`` is one reduction over an innermost axis, its spatial iterators being ``rows`` (sizes, or
    expressions of symbolic ones)."""
    kinds = "".join(it.kind for it in info.iters)
    spatial = [str(it.dom) for it in info.iters if it.kind == "S" and not _is_one(it.dom)]
    return kinds.endswith("R") and kinds.count("R") == 1 and spatial == [str(r) for r in rows if not _is_one(r)]


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
        Convolution(),
        dlight.cpu.GEMV(),
        TiledReduction(),
        Elementwise(),
        RowReduction(),
        SingleRowReduction(),
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
    rows = divisor_at_most(_known_divisor(spatial[-2].dom), row_tile) if len(spatial) >= 2 else 1
    width = power_of_two_divisor(
        _known_divisor(spatial[-1].dom), STREAM_TILE if rows == 1 else lanes * ACCUMULATORS // rows
    )
    simd = power_of_two_divisor(width, lanes)
    column_outer, column, lane = sch.split(spatial[-1].loop_rv, factors=[None, width // simd, simd])
    outer, tile_loops = [it.loop_rv for it in spatial[:-2]] + [column_outer], [column, lane]
    if len(spatial) >= 2:
        row_outer, row = sch.split(spatial[-2].loop_rv, factors=[None, rows])
        outer.append(row_outer)  # innermost: consecutive tasks share the same slice of the second operand
        tile_loops.insert(0, row)
        sch.unroll(row)
    sch.reorder(*outer, *reduce, *tile_loops)
    if len(outer) > 2 and any(_static_extent(sch, loop) is None for loop in outer):
        # Symbolic extents: the batch loops run in parallel, the tile loops serially inside them (one loop fused
        # across a symbolic extent divides each tile's index by a variable).
        sch.parallel(sch.fuse(*outer[:-2]) if len(outer) > 3 else outer[0])
        fused = outer[-1]
    else:
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
    if len(iters) - len(spatial) != 1 or not all(isinstance(it.dom, int) for it in iters):
        return [], ROW_TILE  # a matmul reduces over one axis; symbolic extents are tiled by what divides them
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


def schedule_convolution(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, window: Window, lanes: int, registers: int
) -> None:
    """Tile a channels-last window reduction into register tiles of output columns × channel vectors.

    Loop order: ``n, oc tiles, oh, ow tiles`` (fused, parallel: consecutive tasks reuse one slice of the
    weights) → the reduction loops in their order (kernel rows, kernel columns, input channels: the input
    channels are contiguous in NHWC, and so are the weights `layout.packed_conv2d` packs for this tile) → the
    tile's output columns (unrolled) → its channel
    vectors (unrolled) → lanes (vectorized). The tile (`conv_tile`) accumulates in a local buffer written back
    once per task, with the elementwise consumers (bias, batch norm, activation) inlined there.

    A depthwise convolution (each output channel reads one input channel, so every FMA loads its own input vector)
    whose channel tile holds at least two full vectors takes a tile of `DEPTHWISE_TILE` output rows × columns
    instead, where its rows divide the height: a task's input patch is small enough to stay in L1 for the tasks
    after it (15-30% faster on ConvNeXt's 7x7 layers than a tile of one row of 8 columns, and on EfficientNet's
    3x3 and 5x5 ones; narrower channel tiles, as MobileNetV3's 184 or 200 channels in vectors of 8, keep a row).

    A pointwise (1x1) convolution whose input is larger than its weights, which fit in L2 (the early, wide-image
    layers: ConvNeXt's 56×56 pointwise layers read 1.2-4.8 MB of pixels with 150 KB of weights) runs its tasks
    ``n, oh, ow tiles, oc tiles`` instead: consecutive tasks reuse one tile's input pixels from L1 while the small
    weights stay in L2, and the input is read from memory once rather than once per slice of output channels.
    """
    simd = power_of_two_divisor(int(window.channel.dom), lanes)
    width = int(window.width.dom) if window.width is not None else 1
    columns, vectors = conv_tile(width, int(window.channel.dom) // simd, registers)
    rows = _depthwise_rows(sch, block, window) if vectors * simd >= 2 * lanes else 1
    if rows > 1:
        columns = divisor_at_most(width, DEPTHWISE_TILE[1])
    pixels_outside = not window.sliding and _input_outweighs_weights(sch, block)
    write_back = sch.cache_write(block, 0, "local")
    channel_outer, vector, lane = sch.split(window.channel.loop_rv, factors=[None, vectors, simd])
    batch = [window.batch.loop_rv] if window.batch is not None else []
    pixels = [window.height.loop_rv] if window.height is not None else []
    tile = [vector, lane]
    if window.width is not None:
        column_outer, column = sch.split(window.width.loop_rv, factors=[None, columns])
        pixels.append(column_outer)
        tile.insert(0, column)
        sch.unroll(column)
    if rows > 1:
        pixels[0], row = sch.split(pixels[0], factors=[None, rows])
        tile.insert(0, row)
        sch.unroll(row)
    outer = [*batch, *pixels, channel_outer] if pixels_outside else [*batch, channel_outer, *pixels]
    reduce = [it.loop_rv for it in window.reduce]
    sch.reorder(*outer, *reduce, *tile)
    pixel_tasks = math.prod(_static_extent(sch, loop) or 1 for loop in pixels)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(fused)
    sch.unroll(vector)
    sch.reverse_compute_at(write_back, fused)
    _inline_consumers(sch, write_back)
    _vectorize_innermost(sch, block, simd)
    _vectorize_innermost(sch, write_back, simd)
    _vectorize_innermost(sch, sch.decompose_reduction(block, reduce[0]), simd)
    if not pixels_outside:
        _prefetch_next_block(sch, block, fused, reduce, pixel_tasks)


def _prefetch_next_block(
    sch: s_tir.Schedule,
    block: s_tir.schedule.SBlockRV,
    task: s_tir.schedule.LoopRV,
    reduce: list[s_tir.schedule.LoopRV],
    pixel_tasks: int,
) -> None:
    """Spread prefetches (into L2) of the next channel tile's packed weight block over the tasks of this one.

    The ``pixel_tasks`` tasks of one channel tile all read its block (``(O / V, KH, KW, I, V)``, one ``V`` block
    per tile); each prefetches an equal share of the next block, a cache line every ``stride`` reduction steps.
    Without it the first task of each tile waits for its whole block from memory at compute speed (ConvNeXt's
    pointwise layers stream 2-9 MB of weights each). Convolutions whose reduction is not over the block's input
    channels (depthwise: a few lines per block) or whose weights are not one packed buffer are left alone. The
    prefetch is inserted into the innermost reduction loop after scheduling (the tile's accumulators stay in
    registers: `stack`).
    """
    packed = [read.source for read in sch.get(block).reads if len(read.source.shape) == 5]
    extents = [_static_extent(sch, loop) for loop in [task, *reduce]]
    if len(packed) != 1 or None in extents or len(reduce) not in (1, 3):
        return
    weights, (tasks, *steps) = packed[0], extents
    blocks, block_size = int(weights.shape[0]), math.prod(int(d) for d in weights.shape[1:])
    if blocks < 2 or tasks % (blocks * pixel_tasks) or block_size != math.prod(steps) * int(weights.shape[4]):
        return
    line = LINE_BYTES * 8 // weights.dtype.bits
    share = -(-block_size // pixel_tasks)
    stride = 1 << max(1, math.prod(steps) // -(-share // line)).bit_length() - 1  # a power of two
    loops = [sch.get(loop) for loop in [task, *reduce]]
    step = loops[1].loop_var
    for loop in loops[2:]:
        step = step * loop.extent + loop.loop_var
    t = loops[0].loop_var
    offset = ((t // pixel_tasks + 1) % blocks) * block_size + (t % pixel_tasks) * share + step // stride * line
    stmt = prefetch(weights, tirx.min(offset, blocks * block_size - 1), L2)
    if stride > 1:
        stmt = tirx.IfThenElse(tirx.floormod(step, stride) == 0, stmt, None)
    prepend_to_loop(sch, sch.get_sref(reduce[-1]), [stmt])


def _depthwise_rows(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, window: Window) -> int:
    """Output rows of the register tile of window reduction ``block``: `DEPTHWISE_TILE`'s for a depthwise
    convolution (weights, a sliding window, no reduction over input channels) whose height they divide, else 1."""
    if not window.sliding or len(window.reduce) != 2 or len(sch.get(block).reads) < 2 or window.height is None:
        return 1
    return DEPTHWISE_TILE[0] if int(window.height.dom) % DEPTHWISE_TILE[0] == 0 else 1


def _input_outweighs_weights(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Whether the input that window reduction ``block`` reads (its first buffer) is larger than its weights (the
    second), where both have static shapes, and the weights fit in `L2_WEIGHT_ELEMENTS` (with more, every pixel
    tile would stream all of them from L3: 1024 tokens of a 1536 → 384 linear ran 23% slower so)."""
    reads = sch.get(block).reads
    if len(reads) < 2:
        return False
    shapes = [read.source.shape for read in reads[:2]]
    if not all(isinstance(d, tirx.IntImm) for shape in shapes for d in shape):
        return False
    data, weight = (math.prod(int(d) for d in shape) for shape in shapes)
    return weight < data and weight <= L2_WEIGHT_ELEMENTS


def conv_tile(columns: int, vectors: int, registers: int) -> tuple[int, int]:
    """``(output columns, channel vectors)`` of a convolution's register tile.

    Each reduction step loads the tile's weight vectors and broadcasts one input value per column, then issues
    ``columns × vectors`` FMAs; the tile that maximizes FMAs per load, with the accumulators, the weights and
    one broadcast fitting in ``registers`` vector registers, wins. Columns divide the output width and vectors
    the channel vectors, so no tile is partial.
    """
    best, best_score = (1, 1), 0.0
    for count in range(1, min(vectors, MAX_TILE_VECTORS) + 1):
        if vectors % count:
            continue
        rows = divisor_at_most(columns, max(1, (registers - count - 1) // count))
        score = rows * count / (rows + count)
        if score > best_score:
            best, best_score = (rows, count), score
    return best


def parallel_channels(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """A channels-last spatial block: the outer loops fused and parallel, the channel loop vectorized."""
    loops = sch.get_loops(block)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
    _vectorize_innermost(sch, block, _row_simd(sch, block, lanes))


def vector_registers(target: Target) -> int:
    """Architectural vector registers of an LLVM CPU target: 32 with AVX-512 or on aarch64, else 16."""
    return 32 if target_arch(target) == "aarch64" or has_features(target, "avx512f") else 16


def _index_iter(index: tirx.PrimExpr, iters: list[IterInfo]) -> IterInfo | None:
    """The iterator among ``iters`` that ``index`` is, or None (a constant index: a dimension of extent 1)."""
    return next((it for it in iters if index.same_as(it.var)), None)


def _is_channel(index: tirx.PrimExpr, channel: tirx.Var) -> bool:
    """Whether ``index`` is ``channel``, or ``channel % V`` (the lane of a weight packed in blocks of ``V``)."""
    return index.same_as(channel) or (isinstance(index, tirx.FloorMod) and index.a.same_as(channel))


def _uses(expr: tirx.PrimExpr, variables: set) -> bool:
    """Whether ``expr`` reads one of ``variables``."""
    return any(var in variables for var in tirx.analysis.undefined_vars(expr))


def _data_producer(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> s_tir.schedule.SBlockRV | None:
    """The block that writes the first buffer ``block`` reads (a convolution's or pool's padded input), if any."""
    data = sch.get(block).reads[0].source
    for producer in sch.get_producers(block):
        if sch.get(producer).writes[0].source.same_as(data):
            return producer
    return None


def _same_block(sch: s_tir.Schedule, info: SBlockInfo, block: s_tir.schedule.SBlockRV | None) -> bool:
    return block is not None and sch.get(info.block_rv).same_as(sch.get(block))


def _vectorize_innermost(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, simd: int) -> None:
    """Vectorize the innermost loop of ``block`` in ``simd``-wide pieces (nothing for ``simd == 1``)."""
    if simd == 1:
        return
    loop = sch.get_loops(block)[-1]
    if _static_extent(sch, loop) != simd:
        loop = sch.split(loop, factors=[None, simd])[1]
    sch.vectorize(loop)


def parallel_vectorize(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """Run a spatial block's loops in parallel with vectors along its innermost loop (the channels of an NHWC tensor).

    The vectors are the largest power-of-two divisor of the innermost extent, up to ``lanes``, and the loops
    outside them are fused into one parallel loop: each vector then reads consecutive elements of the output and of
    any per-channel operand (bias, scale), which stay contiguous loads. Only where that divisor is under 8 (an odd
    or narrow row) are all the loops fused and vectorized together, the vectors crossing rows. With a symbolic
    extent among the loops, only the outer loops are fused (parallel) and the innermost one is vectorized on its
    own: a loop fused across a symbolic extent divides every element's index by a variable.
    """
    loops = sch.get_loops(block)
    if len(loops) > 1 and any(_static_extent(sch, loop) is None for loop in loops):
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
        _vectorize_innermost(sch, block, power_of_two_divisor(_known_divisor(sch.get(loops[-1]).extent), lanes))
        return
    inner = _static_extent(sch, loops[-1])
    simd = power_of_two_divisor(inner, lanes) if inner is not None else 1
    if len(loops) == 1 or simd < min(8, lanes):
        _parallel_vectorize_flat(sch, loops, lanes)
        return
    *outer, lane = sch.split(loops[-1], factors=[None, simd]) if inner != simd else [loops[-1]]
    sch.parallel(sch.fuse(*loops[:-1], *outer))
    sch.vectorize(lane)


def interleaving_factor(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> int | None:
    """The constant ``C`` where ``block`` reads an input at its innermost iterator ``i`` modulo ``C`` in an outer
    dimension (an NCHW image written as NHWC pixel rows: ``y[h, w·C + c] = x[c, h, w]``, ``c = i mod C``), else
    None: vectors along ``i`` would gather every lane from another row of ``x``. (``i mod C`` in the innermost
    dimension, a flattened index or a per-channel operand, reads consecutive elements.)"""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    extent = _static_extent(sch, loops[-1]) if loops else None
    if not stmt.iter_vars or extent is None:
        return None
    inner = stmt.iter_vars[-1].var
    factors = [
        factor for region in stmt.reads for bounds in region.region[:-1] for factor in _moduli_of(bounds.min, inner)
    ]
    return min((f for f in factors if 1 < f < extent and extent % f == 0), default=None)


def _moduli_of(expr: tirx.PrimExpr, var: tirx.Var) -> list[int]:
    """The constants that ``var`` is taken modulo anywhere in ``expr`` (arithmetic and casts)."""
    found = []
    if isinstance(expr, tirx.FloorMod) and expr.a.same_as(var) and isinstance(expr.b, tirx.IntImm):
        found.append(int(expr.b.value))
    for child in (getattr(expr, name, None) for name in ("a", "b", "value")):
        if isinstance(child, tvm.ir.expr.Expr):
            found += _moduli_of(child, var)
    return found


def parallel_interleave(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, factor: int) -> None:
    """A block that interleaves ``factor`` rows of its input (`interleaving_factor`): the innermost loop split into
    (position, row), the row loop unrolled inside, so each input row is read in order; the outer loops parallel."""
    *outer, inner = sch.get_loops(block)
    sch.unroll(sch.split(inner, factors=[None, factor])[1])
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _parallel_vectorize_flat(sch: s_tir.Schedule, loops: list[s_tir.schedule.LoopRV], lanes: int) -> None:
    """Fuse ``loops``, run the outer part in parallel and vectorize the inner part."""
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    vec = power_of_two_divisor(_known_divisor(sch.get(fused).extent), lanes)
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


def _known_divisor(extent: int | tirx.PrimExpr) -> int:
    """The extent itself when static, else the largest integer known to divide it (``16 · n`` → 16; a bare symbol
    → 1): symbolic extents get the tiles and vector widths that divide every size they take."""
    if isinstance(extent, int | tirx.IntImm):
        return int(extent)
    modular = _ANALYZER.modular_set(extent)
    return int(modular.coeff) if int(modular.base) == 0 and int(modular.coeff) > 0 else 1


def _is_one(extent: int | tirx.PrimExpr) -> bool:
    return isinstance(extent, int | tirx.IntImm) and int(extent) == 1


def _static_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


__all__ = [
    "Convolution",
    "Window",
    "Elementwise",
    "ParallelFallback",
    "RowReduction",
    "SingleRowReduction",
    "TiledReduction",
    "conv_tile",
    "cpu_rules",
    "parallel_rows",
    "parallel_vectorize",
    "schedule_convolution",
    "schedule_tiled_reduction",
    "vector_registers",
]
