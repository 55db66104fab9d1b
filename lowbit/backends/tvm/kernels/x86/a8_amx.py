"""AMX int8 GEMM for ``torch.ops.lowbit.linear_packed_a8`` with 8-bit weights on x86 CPUs with AMX-INT8.

The values are `a8_linear`'s (the same int8 codes, the same per-group int32 sums, the same float
epilogue in the same order); the int32 dot products come from AMX tiles. ``tdpbsud`` multiplies a
tile of 16 rows × 64 signed bytes (the int8 codes of 16 rows of ``x``, row-major) by a tile of 16
rows × 64 unsigned bytes (16 quads of input columns × 16 output rows × 4 codes: `a8_linear.interleave`
with 16-row tiles, so a weight tile is 1 KiB of contiguous words) into 16 × 16 int32, exactly (no
saturation). Each parallel task owns 32 output rows and walks the rows of ``x`` 32 at a time: four
accumulator tiles (2 row blocks × 2 weight blocks), two tiles of codes, two of weights; at the end of
each group the accumulators are stored and the float epilogue adds the group's terms.

The prologue (per row, in parallel, columns in vector lanes): ``max |x|``, the codes ``xq`` and
their per-group sums. Linux hands out the AMX tile state on request: every call asks for it
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, a no-op once granted) and every task
loads its tile configuration and releases the tiles at its end.

Built for a symbolic row count (`PackedLinearSpec.row_blocks`, `LinearKernel.tail_rows`: any ``m`` rows, the
input neither padded nor the output cut by the lowering), it walks ``⌈m / 32⌉`` whole blocks: the codes of the rows
after ``m`` are zero and their outputs are not stored, so every tile, buffer and loop inside a block keeps its static
shape.

Layers with fewer than `MIN_ROWS` rows, a static row count or output width that is not a multiple of 32,
groups that are not a multiple of 64 columns, codes of other widths, or a target without AMX-INT8
get a reason from `supports` (`a8_gemm` or `a8_linear` take them).
"""

from __future__ import annotations

import functools

import torch
from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic.activations import layout_reason
from lowbit.backends.tvm.kernels.generic.common import fenced, finish
from lowbit.backends.tvm.kernels.generic.rows import padded_rows
from lowbit.backends.tvm.kernels.spec import KernelPlan, LinearKernel, PackedLinearSpec, Tensors, row_count
from lowbit.backends.tvm.kernels.x86 import a8_linear
from lowbit.backends.tvm.target import has_features
from lowbit.ir import packing
from lowbit.ir.ops_a8 import ACT_ABSMAX_FLOOR, ACT_QMAX, ACT_QMIN

KERNEL_NAME = "a8_amx_x86"
#: Rows and columns of a tile of int32 accumulators; bytes of one tile row; rows and output rows per task block.
TILE, TILE_BYTES, BLOCK = 16, 64, 32
#: Fewest rows of ``x`` the AMX GEMM takes.
MIN_ROWS = 32
#: Linux ``arch_prctl`` request for the AMX tile data state (syscall number, request, feature).
ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = (tirx.const(v, "int64") for v in (158, 0x1023, 18))


class X86A8Amx(LinearKernel):
    """The AMX GEMM of the module doc (no knobs: the tile shapes are fixed by the hardware)."""

    name = KERNEL_NAME
    knobs: dict[str, tuple[int, ...]] = {}
    symbolic_rows = True
    tail_rows = True

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        if spec.row_blocks and spec.batch % TILE:
            return f"row blocks of {spec.batch} rows are not whole AMX tiles of {TILE} rows"
        if not spec.row_blocks and (spec.batch < MIN_ROWS or spec.batch % BLOCK):
            return f"batch={spec.batch} is not a multiple of {BLOCK} rows of at least {MIN_ROWS} (the AMX blocks)"
        if not has_features(target, "amx-int8", "amx-tile", "avx512bw"):
            return "the AMX GEMM needs AMX-INT8 (target CPU has none)"
        if spec.bits != 8:
            return f"the AMX GEMM takes 8-bit codes, got {spec.bits}"
        layout = layout_reason(spec, "AMX GEMM", (8,), BLOCK, TILE_BYTES)
        return layout or a8_linear.KERNEL.supports(spec, tensors, target)

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        return {}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """Constants: 16-row weight words, scales ``(G, N)``, zero points ``(G, N)`` int32 (a 1×1 placeholder when
        symmetric), bias ``(N,)`` (``(1,)`` placeholder), the static step (``(1,)``, unused when dynamic)."""
        words = a8_linear.interleave(tensors["qweight"], 8, spec.in_features, 1, TILE)
        scales = tensors["scales"].to(torch.float32).t().contiguous()
        zeros = tensors.get("zeros")
        zeros = torch.zeros(1, 1, dtype=torch.int32) if zeros is None else zeros.to(torch.int32).t().contiguous()
        bias = tensors.get("bias")
        bias = torch.zeros(1) if bias is None else bias.to(torch.float32).contiguous()
        step = torch.ones(1) if spec.act_dynamic else tensors["act_scale"].to(torch.float32).reshape(1)
        return KernelPlan(a8_amx_func(spec), [words, scales, zeros, bias, step], KERNEL_NAME, knobs)


KERNEL = X86A8Amx()


def _tile(name: str, *args: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def a8_amx_func(spec: PackedLinearSpec, name: str | None = None) -> tirx.PrimFunc:
    """The PrimFunc ``(x, words, scales, zeros, bias, step, y)`` of the module doc for one layer."""
    return finish(_kernel(spec), name)


@functools.cache
def _kernel(spec: PackedLinearSpec) -> tirx.PrimFunc:
    """The unmarked PrimFunc of `a8_amx_func`, parsed once per layer shape (parsing TVMScript takes ~0.2 s; a
    model repeats a few shapes many times)."""
    symbolic = spec.row_blocks
    m_rows = row_count() if symbolic else spec.batch
    # A symbolic row count runs whole 32-row blocks: the rows after ``m_rows`` have zero codes and their outputs are
    # not stored.
    padded = padded_rows(m_rows, BLOCK) if symbolic else m_rows
    k_in, n_out, group, groups = spec.in_features, spec.out_features, spec.group_size, spec.groups
    dynamic, asym, has_bias = spec.act_dynamic, spec.asymmetric, spec.has_bias
    zrows, zcols = (groups, n_out) if asym else (1, 1)
    brows = n_out if has_bias else 1
    default_zero = int(packing.default_zero(8))
    lanes = 16
    # Tile registers: accumulators 0-3 (rows 0-15 × weights 0-15, rows 0-15 × weights 16-31, then rows 16-31),
    # codes of rows 0-15 and 16-31, weights 0-15 and 16-31.
    c00, c01, c10, c11, a0, a1, b0, b1 = (tirx.const(t, "uint8") for t in range(8))

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((m_rows, k_in), "float32"),
        words: T.Buffer((n_out // TILE, k_in // 4, TILE_BYTES), "uint8"),
        scales: T.Buffer((groups, n_out), "float32"),
        zeros: T.Buffer((zrows, zcols), "int32"),
        bias: T.Buffer((brows,), "float32"),
        step: T.Buffer((1,), "float32"),
        y: T.Buffer((m_rows, n_out), "float32"),
    ) -> None:
        T.func_attr({"tirx.noalias": True})
        xq = T.decl_buffer((padded, k_in), "int8")
        mult = T.decl_buffer((padded,), "float32")
        asum = T.decl_buffer((padded, groups), "int32")
        for m in T.parallel(m_rows):
            part = T.decl_buffer((lanes,), "float32")
            sums = T.decl_buffer((lanes,), "int32")
            if dynamic:
                for lane in T.vectorized(lanes):
                    part[lane] = T.float32(0)
                for ko in range(k_in // lanes):
                    for lane in T.vectorized(lanes):
                        part[lane] = T.max(part[lane], T.fabs(x[m, ko * lanes + lane]))
                for lane in range(1, lanes):
                    part[0] = T.max(part[0], part[lane])
                mult[m] = T.float32(127.0) / T.max(part[0], T.float32(ACT_ABSMAX_FLOOR))
            for ko in range(k_in // lanes):
                for lane in T.vectorized(lanes):
                    if dynamic:
                        xq[m, ko * lanes + lane] = T.Cast(
                            "int8",
                            T.max(
                                T.min(T.round(x[m, ko * lanes + lane] * mult[m]), T.float32(ACT_QMAX)),
                                T.float32(ACT_QMIN),
                            ),
                        )
                    else:
                        xq[m, ko * lanes + lane] = T.Cast(
                            "int8",
                            T.max(
                                T.min(T.round(x[m, ko * lanes + lane] / step[0]), T.float32(ACT_QMAX)),
                                T.float32(ACT_QMIN),
                            ),
                        )
            for g in range(groups):
                for lane in T.vectorized(lanes):
                    sums[lane] = 0
                for ko in range(group // lanes):
                    for lane in T.vectorized(lanes):
                        sums[lane] = sums[lane] + T.Cast("int32", xq[m, g * group + ko * lanes + lane])
                asum[m, g] = 0
                for lane in range(lanes):
                    asum[m, g] = asum[m, g] + sums[lane]
        if symbolic:
            for m in range(padded - m_rows):
                for k in T.vectorized(k_in):
                    xq[m_rows + m, k] = T.int8(0)
                for g in range(groups):
                    asum[m_rows + m, g] = 0
                mult[m_rows + m] = T.float32(1)
        T.evaluate(T.call_extern("int64", "syscall", ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA))
        for task in T.parallel(n_out // BLOCK):
            config = T.decl_buffer((64,), "uint8")
            dots = T.decl_buffer((BLOCK, BLOCK), "int32")
            acc = T.decl_buffer((BLOCK, BLOCK), "float32")
            for i in range(64):
                config[i] = T.uint8(0)
            config[0] = T.uint8(1)
            for t in range(8):
                config[16 + 2 * t] = T.uint8(TILE_BYTES)
                config[48 + t] = T.uint8(TILE)
            T.evaluate(_tile("ldtilecfg", T.address_of(config[0])))
            for block in range(padded // BLOCK):
                for i, j in T.grid(BLOCK, BLOCK):
                    acc[i, j] = T.float32(0)
                for g in range(groups):
                    T.evaluate(_tile("tilezero", c00))
                    T.evaluate(_tile("tilezero", c01))
                    T.evaluate(_tile("tilezero", c10))
                    T.evaluate(_tile("tilezero", c11))
                    for kk in range(group // TILE_BYTES):
                        k0 = g * group + kk * TILE_BYTES
                        T.evaluate(_tile("tileloadd64", a0, T.address_of(xq[block * BLOCK, k0]), T.int64(k_in)))
                        T.evaluate(
                            _tile(
                                "tileloadd64",
                                a1,
                                T.address_of(xq[block * BLOCK + TILE, k0]),
                                T.int64(k_in),
                            )
                        )
                        T.evaluate(
                            _tile(
                                "tileloadd64",
                                b0,
                                T.address_of(words[task * 2, k0 // 4, 0]),
                                T.int64(TILE_BYTES),
                            )
                        )
                        T.evaluate(
                            _tile(
                                "tileloadd64",
                                b1,
                                T.address_of(words[task * 2 + 1, k0 // 4, 0]),
                                T.int64(TILE_BYTES),
                            )
                        )
                        T.evaluate(_tile("tdpbsud", c00, a0, b0))
                        T.evaluate(_tile("tdpbsud", c01, a0, b1))
                        T.evaluate(_tile("tdpbsud", c10, a1, b0))
                        T.evaluate(_tile("tdpbsud", c11, a1, b1))
                    T.evaluate(_tile("tilestored64", c00, T.address_of(dots[0, 0]), T.int64(BLOCK * 4)))
                    T.evaluate(_tile("tilestored64", c01, T.address_of(dots[0, TILE]), T.int64(BLOCK * 4)))
                    T.evaluate(_tile("tilestored64", c10, T.address_of(dots[TILE, 0]), T.int64(BLOCK * 4)))
                    T.evaluate(_tile("tilestored64", c11, T.address_of(dots[TILE, TILE]), T.int64(BLOCK * 4)))
                    for i in range(BLOCK):
                        for j in T.vectorized(BLOCK):
                            if asym:
                                acc[i, j] = acc[i, j] + fenced(
                                    T.Cast(
                                        "float32", dots[i, j] - zeros[g, task * BLOCK + j] * asum[block * BLOCK + i, g]
                                    )
                                    * scales[g, task * BLOCK + j]
                                )
                            else:
                                acc[i, j] = acc[i, j] + fenced(
                                    T.Cast("float32", dots[i, j] - default_zero * asum[block * BLOCK + i, g])
                                    * scales[g, task * BLOCK + j]
                                )
                for i in range(BLOCK):
                    if not symbolic or block * BLOCK + i < m_rows:
                        for j in T.vectorized(BLOCK):
                            if dynamic and has_bias:
                                y[block * BLOCK + i, task * BLOCK + j] = (
                                    acc[i, j] / mult[block * BLOCK + i] + bias[task * BLOCK + j]
                                )
                            elif dynamic:
                                y[block * BLOCK + i, task * BLOCK + j] = acc[i, j] / mult[block * BLOCK + i]
                            elif has_bias:
                                y[block * BLOCK + i, task * BLOCK + j] = (
                                    fenced(acc[i, j] * step[0]) + bias[task * BLOCK + j]
                                )
                            else:
                                y[block * BLOCK + i, task * BLOCK + j] = acc[i, j] * step[0]
            T.evaluate(_tile("tilerelease"))

    return kernel


__all__ = ["KERNEL", "KERNEL_NAME", "MIN_ROWS", "X86A8Amx", "a8_amx_func"]
