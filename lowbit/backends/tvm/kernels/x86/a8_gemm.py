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

It takes layers of at least `MIN_ROWS` rows; fewer rows (a GEMV reads each weight once
and has nothing to reuse) stay on `a8_linear`, whose tuning records it leaves alone.
Targets without AVX-512 VNNI get a reason from `supports`, and `a8_linear` takes the layer.
"""

from __future__ import annotations

import logging

import torch
from tvm import s_tir, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic.activations import layout_reason
from lowbit.backends.tvm.kernels.generic.common import (
    divisor_at_most,
    finish,
    layer_consts,
    power_of_two_divisor,
    scale_storage,
)
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec, schedule_code_sums, schedule_patches, sums_by_pixel
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
#: Tuning space: ``row_tile`` rows of ``x`` × ``row_vectors`` 16-row weight tiles per register tile;
#: ``out_tile`` output rows (a multiple of ``16 · row_vectors``) per parallel task.
KNOBS: dict[str, tuple[int, ...]] = {
    "row_tile": (2, 4, 6, 8),
    "out_tile": (32, 64, 128, 192, 256),
    "row_vectors": (1, 2, 3, 4),
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
        layout = layout_reason(spec, "int8 GEMM", a8_linear.KERNEL_BITS, ROWS, COLUMNS)
        return layout or a8_linear.KERNEL.supports(spec, tensors, target)

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule: 4 rows × 4 weight tiles (16 accumulators) in tasks of 64 output rows (a convolution
        whose output pixels are not a multiple of 4: up to 8 rows)."""
        tile = max((v for v in KNOBS["out_tile"] if v <= 64 and spec.out_features % v == 0), default=ROWS)
        # A convolution's rows (output pixels) need not be a multiple of 4: 7 × 7 runs in tiles of 7 rows.
        rows = 8 if isinstance(spec, ConvSpec) and spec.batch % 4 else 4
        return {"row_tile": rows, "out_tile": tile, "row_vectors": 4}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """The constants of `a8_linear` (its ``build``), laid out for 16-row tiles."""
        if spec.out_features % knobs["out_tile"] or knobs["out_tile"] % ROWS:
            raise BackendError(
                f"out_tile={knobs['out_tile']} does not tile out_features={spec.out_features} in rows of {ROWS}"
            )
        vectors = tile_vectors(knobs["out_tile"], knobs["row_vectors"])
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
    sch = s_tir.Schedule(a8_linear.a8_linear_compute(spec, vectors, rows=ROWS, scale_dtype=scale_dtype))
    _schedule(sch, spec, rows, out_tile, vectors)
    log.debug("scheduled %s: row_tile=%d, out_tile=%d, row_vectors=%d", spec, rows, out_tile, vectors)
    return finish(sch.mod["main"], name)


def _schedule(sch: s_tir.Schedule, spec: PackedLinearSpec, row_tile: int, out_tile: int, vectors: int) -> None:
    """Parallel output tasks; register tiles of ``row_tile`` rows × ``vectors`` weight tiles; the prologue."""
    loops = a8_linear.schedule_tiles(
        sch, intrin_x86.VNNI_512, ROWS, row_tile, out_tile, vectors, a8_linear.row_tasks(spec, row_tile, out_tile)
    )
    a8_linear.finish_accumulators(sch, loops)
    _schedule_prologue(sch, spec, loops.rows)


def _schedule_prologue(sch: s_tir.Schedule, spec: PackedLinearSpec, rows: s_tir.schedule.LoopRV) -> None:
    """Activation codes (a convolution's patches: `conv.schedule_patches`), row maxima and code sums: rows in
    parallel, columns in vector lanes. A convolution whose code sums come from its pixels (`conv.sums_by_pixel`)
    gathers each register tile's patches and adds their code sums under the tile's loop ``rows``, where the
    tile reads them.

    The maxima and sums reduce into one vector of partial results per row (``rfactor``, row-major, so the lanes
    of a row are contiguous), then across it: exact, an int32 sum and a maximum do not depend on the order.
    """
    width = power_of_two_divisor(spec.in_features, 16)
    reductions: list[tuple[str, int]] = []
    if sums_by_pixel(spec):
        schedule_patches(sch, spec, rows)
        schedule_code_sums(sch, spec, rows)
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
        block = sch.get_sblock(name)
        _, k_inner = sch.split(sch.get_loops(block)[-1], factors=[None, lanes])
        partial = sch.rfactor(k_inner, len(sch.get_loops(block)) - 2)
        sch.vectorize(sch.get_loops(partial)[-1])
        sch.parallel(sch.get_loops(partial)[0])


__all__ = ["KERNEL", "KERNEL_NAME", "KNOBS", "MIN_ROWS", "X86A8Gemm", "a8_gemm_func", "tile_vectors"]
