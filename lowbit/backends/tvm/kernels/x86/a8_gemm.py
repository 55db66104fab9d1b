"""Register-blocked int8 GEMM for ``torch.ops.lowbit.linear_packed_a8`` on x86 with AVX-512 VNNI (many rows).

The computation is `a8_linear`'s, value for value (same int8 codes, the same per-group
int32 sums, the same float epilogue in the same order), on weight tiles of 16 output rows:
one 64-byte word of codes fills a zmm register and one ``vpdpbusd`` (`intrin.VNNI_512`)
adds 4 input columns of one row of ``x`` into 16 int32 lanes. A register tile holds
``row_tile`` rows of ``x`` × ``row_vectors`` weight tiles, up to 32 independent
accumulators: each unpacked word feeds ``row_tile`` products and each broadcast
activation quad ``row_vectors``, so the loop is bound by ``vpdpbusd`` throughput, not by
loads. Words are laid out by `a8_linear.interleave` with 16-row tiles, so a register
tile reads its ``row_vectors`` words side by side and a task streams its panel in order.

The activation prologue (absmax, int8 codes, per-group code sums) runs once per call,
rows in parallel and columns in vector lanes, before the tiles.

A convolution whose output channels are not a multiple of 16 (24, 40, 72, 88: `padded_outputs`) runs on weight
rows padded with zero codes up to whole tiles, as one task-wide group of tiles; each register tile stores its
first columns only (``y_stored``, right after the tile). Every stored output is computed as without the padding.

It takes layers of at least `MIN_ROWS` rows; fewer rows (a GEMV reads each weight once
and has nothing to reuse) stay on `a8_linear`, whose tuning records it leaves alone.
Targets without AVX-512 VNNI get a reason from `supports`, and `a8_linear` takes the layer.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from tvm import s_tir, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic.activations import layout_reason
from lowbit.backends.tvm.kernels.generic.common import (
    divisor_at_most,
    finish,
    layer_consts,
    loops_below,
    power_of_two_divisor,
    scale_storage,
)
from lowbit.backends.tvm.kernels.generic.conv import (
    ConvSpec,
    pointwise,
    schedule_code_sums,
    schedule_patches,
    sums_by_pixel,
)
from lowbit.backends.tvm.kernels.spec import KernelPlan, LinearKernel, PackedLinearSpec, Tensors
from lowbit.backends.tvm.kernels.x86 import a8_linear
from lowbit.backends.tvm.kernels.x86 import intrin as intrin_x86
from lowbit.backends.tvm.target import has_features
from lowbit.errors import BackendError

log = logging.getLogger(__name__)

KERNEL_NAME = "a8_gemm_x86"
#: Output rows of one weight tile: one zmm register of int32 accumulators.
ROWS, COLUMNS = intrin_x86.WIDE_ROWS, intrin_x86.COLUMNS
#: Fewest rows of ``x`` the GEMM takes; fewer go to the GEMV of `a8_linear`.
MIN_ROWS = 16
#: Independent accumulators a register tile aims at in the hand schedule (``vpdpbusd``: 2 per cycle, 5 cycles of
#: latency), and the most it takes (the zmm registers also hold the weight words).
BUSY_ACCUMULATORS, MAX_ACCUMULATORS = 12, 28
#: Most 16-row tiles of a padded convolution, which runs its tiles as one group (`padded_outputs`).
MAX_PADDED_VECTORS = 8
#: Tuning space: ``row_tile`` rows of ``x`` × ``row_vectors`` 16-row weight tiles per register tile;
#: ``out_tile`` output rows (a multiple of ``16 · row_vectors``) per parallel task.
KNOBS: dict[str, tuple[int, ...]] = {
    "row_tile": (2, 4, 6, 8),
    "out_tile": (32, 48, 64, 80, 96, 112, 128, 192, 256),
    "row_vectors": (1, 2, 3, 4, 5, 6, 7, 8),
}


class X86A8Gemm(LinearKernel):
    """The register-blocked GEMM of the module doc, for x86 LLVM targets with AVX-512 VNNI and many rows."""

    name = KERNEL_NAME
    knobs = KNOBS
    convolutions = True
    symbolic_rows = True
    epilogues = True

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        if spec.batch < MIN_ROWS:
            return f"batch={spec.batch} is below the GEMM's {MIN_ROWS} rows (the GEMV takes it)"
        if not has_features(target, "avx512vnni", "avx512bw"):
            return "the int8 GEMM needs AVX-512 VNNI (zmm vpdpbusd)"
        padded = _padded_spec(spec)
        layout = layout_reason(padded, "int8 GEMM", a8_linear.KERNEL_BITS, ROWS, COLUMNS)
        return layout or a8_linear.KERNEL.supports(padded, tensors, target)

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule: register tiles of the most 16-row weight tiles up to 4 that divide the outputs (all of
        a padded convolution's, and all of 5 or 7), in tasks of up to 64 output rows; the fewest rows that make
        `BUSY_ACCUMULATORS` accumulators (4 rows × 4 tiles, 4 × 3, 8 × 2; 7 × 7 pixels: tiles of 7 rows)."""
        outputs = padded_outputs(spec)
        tiles = outputs // ROWS
        vectors = max(v for v in (1, 2, 3, 4) if tiles % v == 0)
        if outputs != spec.out_features or (vectors == 1 and tiles <= MAX_PADDED_VECTORS):
            vectors = tiles
        fits = [r for r in KNOBS["row_tile"] if divisor_at_most(spec.batch, r) * vectors <= MAX_ACCUMULATORS]
        busy = [r for r in fits if divisor_at_most(spec.batch, r) * vectors >= BUSY_ACCUMULATORS]
        rows = busy[0] if busy else max(fits, key=lambda r: divisor_at_most(spec.batch, r))
        groups = [k for k in range(1, tiles // vectors + 1) if tiles % (vectors * k) == 0 and k * vectors <= 4]
        tile = ROWS * vectors * max(groups, default=1)
        return {"row_tile": rows, "out_tile": tile, "row_vectors": vectors}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """The constants of `a8_linear` (its ``build``), laid out for 16-row tiles (rows padded to whole tiles)."""
        outputs = padded_outputs(spec)
        if outputs % knobs["out_tile"] or knobs["out_tile"] % ROWS:
            raise BackendError(f"out_tile={knobs['out_tile']} does not tile out_features={outputs} in rows of {ROWS}")
        vectors = tile_vectors(knobs["out_tile"], knobs["row_vectors"])
        if outputs != spec.out_features and (knobs["out_tile"] != outputs or vectors != outputs // ROWS):
            raise BackendError(f"a convolution padded to {outputs} outputs runs them as one tile group")
        tensors = _padded_tensors(tensors, spec.out_features, outputs)
        scale_dtype = scale_storage(tensors["scales"])
        func = a8_gemm_func(spec, knobs["row_tile"], knobs["out_tile"], vectors, scale_dtype=scale_dtype)
        consts = layer_consts(
            a8_linear.interleave(tensors["qweight"], spec.bits, spec.in_features, vectors, ROWS),
            tensors,
            lambda values: a8_linear.blocked(values, vectors, ROWS),
            torch.int32,
            scale_dtype,
        )
        if not spec.act_dynamic:
            consts.append(tensors["act_scale"].to(torch.float32).reshape(1))
        return KernelPlan(func, consts, KERNEL_NAME, knobs)


KERNEL = X86A8Gemm()


def padded_outputs(spec: PackedLinearSpec) -> int:
    """The weight rows the kernel computes: a convolution's outputs rounded up to whole 16-row tiles, where they
    make at most `MAX_PADDED_VECTORS` tiles; a linear layer's as they are."""
    padded = -(-spec.out_features // ROWS) * ROWS
    return padded if isinstance(spec, ConvSpec) and padded // ROWS <= MAX_PADDED_VECTORS else spec.out_features


def _padded_spec(spec: PackedLinearSpec) -> PackedLinearSpec:
    outputs = padded_outputs(spec)
    return spec if outputs == spec.out_features else dataclasses.replace(spec, out_features=outputs)


def _padded_tensors(tensors: Tensors, outputs: int, padded: int) -> Tensors:
    """The per-output constants with ``padded − outputs`` more rows: zero bytes of codes, zero scales, zero points
    and bias (their outputs are computed, never stored)."""
    if padded == outputs:
        return tensors

    def pad(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or tensor.dim() == 0 or tensor.shape[0] != outputs:
            return tensor
        return torch.cat([tensor, tensor.new_zeros((padded - outputs, *tensor.shape[1:]))])

    per_output = ("qweight", "scales", "zeros", "bias")
    return {name: pad(tensor) if name in per_output else tensor for name, tensor in tensors.items()}


def tile_vectors(out_tile: int, row_vectors: int) -> int:
    """16-row tiles computed together: ``row_vectors``, reduced to divide the task's ``out_tile / 16`` tiles."""
    return divisor_at_most(out_tile // ROWS, row_vectors)


def a8_gemm_func(
    spec: PackedLinearSpec,
    row_tile: int,
    out_tile: int,
    vectors: int,
    name: str | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tirx.PrimFunc:
    """The scheduled PrimFunc; arguments ``x (M, K) f32``, the constants of `build` (scales as ``scale_dtype``),
    output ``y (M, N) f32``."""
    rows = divisor_at_most(spec.batch, row_tile)  # tensorize needs whole tiles
    intrin_x86.register()
    padded = _padded_spec(spec)
    stored = spec.out_features if padded is not spec else None
    sch = s_tir.Schedule(
        a8_linear.a8_linear_compute(padded, vectors, rows=ROWS, scale_dtype=scale_dtype, stored=stored)
    )
    _schedule(sch, padded, rows, out_tile, vectors)
    log.debug("scheduled %s: row_tile=%d, out_tile=%d, row_vectors=%d", spec, rows, out_tile, vectors)
    return finish(sch.mod["main"], name)


def _schedule(sch: s_tir.Schedule, spec: PackedLinearSpec, row_tile: int, out_tile: int, vectors: int) -> None:
    """Parallel output tasks; register tiles of ``row_tile`` rows × ``vectors`` weight tiles; the prologue."""
    loops = a8_linear.schedule_tiles(
        sch, intrin_x86.VNNI_512, ROWS, row_tile, out_tile, vectors, a8_linear.row_tasks(spec, row_tile, out_tile)
    )
    a8_linear.finish_accumulators(sch, loops)
    _schedule_prologue(sch, spec, loops.rows, out_tile == spec.out_features)
    if any(sch.get(block).name_hint == "y_stored" for block in sch.get_child_blocks(sch.get_sblock("root"))):
        stored = sch.get_sblock("y_stored")
        sch.reverse_compute_at(stored, loops.rows, preserve_unit_loops=True)
        row, column = sch.get_loops(stored)[-2:]
        sch.unroll(row)
        sch.vectorize(sch.split(column, factors=[None, power_of_two_divisor(spec.out_features, 16)])[-1])


def _schedule_prologue(
    sch: s_tir.Schedule, spec: PackedLinearSpec, rows: s_tir.schedule.LoopRV, one_group: bool
) -> None:
    """Activation codes (a convolution's patches: `conv.schedule_patches`), row maxima and code sums: rows in
    parallel, columns in vector lanes. A convolution whose code sums come from its pixels (`conv.sums_by_pixel`)
    gathers each register tile's patches and adds their code sums under the tile's loop ``rows``, where the
    tile reads them; so does a `conv.pointwise` one whose outputs are ``one_group`` of tiles (each row's codes
    are made once): no parallel loop of its own, the tile reads them from L1.

    The maxima and sums reduce into one vector of partial results per row (``rfactor``, row-major, so the lanes
    of a row are contiguous), then across it: exact, an int32 sum and a maximum do not depend on the order.
    """
    width = power_of_two_divisor(spec.in_features, 16)
    reductions: list[tuple[str, int]] = []
    tiled = isinstance(spec, ConvSpec) and pointwise(spec) and one_group
    if sums_by_pixel(spec):
        schedule_patches(sch, spec, rows)
        schedule_code_sums(sch, spec, rows)
    elif tiled:
        # The sums first: a block moves under the tile once its consumers are there.
        partial = _vector_partials(sch, "asum", power_of_two_divisor(spec.group_size, 16))
        sch.compute_at(sch.get_sblock("asum"), rows, preserve_unit_loops=True)
        sch.compute_at(partial, rows, preserve_unit_loops=True)
        lane, *inner = loops_below(sch, partial, rows)  # the partials' iterators in order: the lane first
        sch.reorder(*inner, lane)
        sch.vectorize(lane)
        schedule_patches(sch, spec, rows)
    elif isinstance(spec, ConvSpec):
        schedule_patches(sch, spec)
        reductions.append(("asum", power_of_two_divisor(spec.group_size, 16)))
    else:
        xq_m, xq_k = sch.get_loops(sch.get_sblock("xq"))
        sch.parallel(xq_m)
        sch.vectorize(sch.split(xq_k, factors=[None, width])[-1])
        reductions.append(("asum", power_of_two_divisor(spec.group_size, 16)))
    if spec.act_dynamic:
        reductions.append(("absmax", width))
    for name, lanes in reductions:
        partial = _vector_partials(sch, name, lanes)
        sch.vectorize(sch.get_loops(partial)[-1])
        sch.parallel(sch.get_loops(partial)[0])


def _vector_partials(sch: s_tir.Schedule, name: str, lanes: int) -> s_tir.schedule.SBlockRV:
    """The reduction ``name`` over its last loop split into ``lanes`` partial results per row (``rfactor``, the
    lanes innermost), then reduced across them; the partials' block."""
    block = sch.get_sblock(name)
    _, k_inner = sch.split(sch.get_loops(block)[-1], factors=[None, lanes])
    return sch.rfactor(k_inner, len(sch.get_loops(block)) - 2)


__all__ = ["KERNEL", "KERNEL_NAME", "KNOBS", "MIN_ROWS", "X86A8Gemm", "a8_gemm_func", "tile_vectors"]
