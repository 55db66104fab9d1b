"""Helpers shared by the kernel generators: constant layouts, knob-free schedule steps, marks on finished kernels."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from tvm import s_tir, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.target import target_arch

#: ``op_pattern`` value of an opaque operator: Relax's FuseOps leaves such calls alone.
OPAQUE_PATTERN = 8
#: LLVM prefetch locality hints: ``prefetchnta``, ``prefetcht1`` (into L2) and ``prefetcht0``.
NTA, L2, T0 = 0, 2, 3
#: Bytes of a cache line: one prefetch brings in one.
LINE_BYTES = 64


#: Code widths the packed weight-only kernels (GEMV and GEMM) unpack: codes never straddle bytes.
KERNEL_BITS: tuple[int, ...] = (2, 4, 8)


def unsupported_reason(spec: PackedLinearSpec) -> str | None:
    """Why ``spec`` cannot run on the packed weight-only kernels (and needs the dense fallback), or None."""
    if spec.bits not in KERNEL_BITS:
        return f"{spec.bits}-bit codes straddle bytes; the packed kernel handles {KERNEL_BITS} bits"
    if spec.has_g_idx:
        return "act-order g_idx permutes groups; the packed kernel needs contiguous groups"
    if spec.in_features % spec.group_size:
        return f"in_features={spec.in_features} is not a multiple of group_size={spec.group_size}"
    if spec.group_size % spec.codes_per_byte:
        return f"group_size={spec.group_size} does not fill whole bytes of {spec.bits}-bit codes"
    return None


def fenced(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """``value`` behind ``llvm.arithmetic.fence``: LLVM may not contract the operation that computes it with the one
    that uses it (a product and the sum after it into one fused multiply-add, which rounds once where the torch
    reference rounds twice)."""
    return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", value)


def scale_storage(scales: torch.Tensor) -> torch.dtype:
    """The type a kernel stores ``scales`` in: float16 when every scale is exactly a float16 number (a quantizer's
    ``scale_dtype: float16`` rounds them so), which halves their bytes and decodes to the same float32 values;
    float32 otherwise."""
    half = scales.to(torch.float16)
    return torch.float16 if bool(torch.equal(half.to(scales.dtype), scales)) else torch.float32


def layer_consts(
    codes: torch.Tensor,
    tensors: Mapping[str, torch.Tensor | None],
    per_group: Callable[[torch.Tensor], torch.Tensor],
    zero_dtype: torch.dtype,
    scale_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """A packed kernel's constants in their usual order: its ``codes``, the scales (as ``scale_dtype``) and [zero
    points] (as ``zero_dtype``) laid out by ``per_group``, [the fp32 bias]."""
    consts = [codes, per_group(tensors["scales"].to(torch.float32).to(scale_dtype))]
    if tensors.get("zeros") is not None:
        consts.append(per_group(tensors["zeros"].to(zero_dtype)))
    if tensors.get("bias") is not None:
        consts.append(tensors["bias"].to(torch.float32).contiguous())
    return consts


def finish(func: tirx.PrimFunc, name: str | None) -> tirx.PrimFunc:
    """Mark a hand-scheduled kernel: scheduled (dlight skips it), opaque (never fused), named if asked.

    Without ``name`` the ``global_symbol`` that ``te.create_prim_func`` sets ("main") is
    dropped, so a Relax module can name the function itself.
    """
    func = func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE_PATTERN)
    return func.without_attr("global_symbol") if name is None else func.with_attr("global_symbol", name)


def prefetch(buffer: tirx.Buffer, offset: tirx.PrimExpr | int, locality: int = 0) -> tirx.Stmt:
    """A read prefetch of the cache line holding element ``offset`` of ``buffer``; ``locality`` is LLVM's hint,
    0 (``prefetchnta``, no temporal locality) to 3 (``prefetcht0``)."""
    return tirx.Evaluate(
        tirx.call_llvm_intrin(
            "void",
            "llvm.prefetch.p0",
            buffer.access_ptr("r", offset=offset),
            tirx.const(0, "int32"),
            tirx.const(locality, "int32"),
            tirx.const(1, "int32"),
        )
    )


def stream_locality(target: Target) -> int | None:
    """The prefetch hint for a GEMV's cold weight stream on ``target``: `NTA` on AMD x86 cores (``-mcpu=znver*``,
    where the kernels were tuned with it), `T0` on other x86 cores (on Emerald Rapids a cold ``prefetchnta``
    stream ran at half the bandwidth of a ``prefetcht0`` one), None elsewhere."""
    if target.kind.name != "llvm" or target_arch(target) != "x86_64":
        return None
    return NTA if str(target.attrs.get("mcpu", "")).startswith("znver") else T0


def prepend_to_loop(sch: s_tir.Schedule, loop: s_tir.schedule.StmtSRef, stmts: list[tirx.Stmt]) -> None:
    """Run ``stmts`` at the start of every iteration of the ``for`` loop at ``loop``."""
    old = loop.stmt
    sch.state.replace(
        loop,
        tirx.For(
            old.loop_var,
            old.min,
            old.extent,
            old.kind,
            tirx.SeqStmt([*stmts, old.body]),
            old.thread_binding,
            old.annotations,
        ),
    )


def power_of_two_divisor(extent: int, limit: int) -> int:
    """The largest power of two that divides ``extent`` and is at most ``limit`` (a vector width)."""
    width = 1
    while width * 2 <= limit and extent % (width * 2) == 0:
        width *= 2
    return width


def divisor_at_most(extent: int, limit: int) -> int:
    """The largest divisor of ``extent`` that is at most ``limit``."""
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


def loops_below(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, loop: s_tir.schedule.LoopRV) -> list:
    """The loops of ``block`` nested inside ``loop`` (after a ``compute_at`` to it)."""
    loops = sch.get_loops(block)
    target = sch.get_sref(loop)
    index = next(i for i, candidate in enumerate(loops) if sch.get_sref(candidate).same_as(target))
    return list(loops[index + 1 :])
