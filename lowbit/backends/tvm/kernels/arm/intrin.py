"""aarch64 tensor intrinsic for the int8-activation kernels: a 4×4 signed dot product with ``sdot``.

One call computes, for 4 output rows ``i`` and 4 consecutive input columns ``k``,
``C[i] += Σ_k int32(A[k]) · int32(B[i, k])`` with ``A`` the 4 int8 activations
(broadcast to every row) and ``B`` the 4×4 weight codes as int8 (16 contiguous bytes,
row-major): one 128-bit NEON register of codes, four int32 lanes of ``C``. ``SDOT``
is ``llvm.aarch64.neon.sdot`` (the dot-product extension, ``+dotprod``: Cortex-A76,
Neoverse-N1 and later), which sums four signed × signed byte products into each int32
lane exactly. Codes must fit int8: the kernel stores 8-bit codes offset by −128.

``I8MM`` is ``llvm.aarch64.neon.smmla`` (the int8 matrix-multiply extension, ``+i8mm``:
Neoverse-N2/V1, Cortex-A710 and later): one call takes a 2×8 int8 tile of activations
``A`` (two rows of ``x``) and a 2×8 tile of codes ``B`` (two output rows), 16 bytes
each, and adds the 2×2 int32 products ``C[m, i] += Σ_k A[m, k] · B[i, k]`` (row-major
``C``), twice the multiply-adds of one ``sdot``.

`register` parses and registers them under the names below (the kernels call it before
tensorizing), without importing ``tvm.s_tir.tensor_intrin`` (its import costs ~40 s).
"""

from __future__ import annotations

import functools

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

#: Output rows and input columns one intrinsic call covers.
ROWS, COLUMNS = 4, 4

SDOT = "lowbit_dot_4x4_s8s8_sdot"
I8MM = "lowbit_mmla_2x2x8_s8s8_i8mm"
#: Rows of ``x``, output rows and input columns of one ``smmla``.
MMLA_ROWS, MMLA_COLUMNS = 2, 8


@functools.cache
def register() -> None:
    """Parse the intrinsics' TVMScript and register them under the names above; once, when a kernel first
    tensorizes (parsing takes most of a second, which importing this module does not pay)."""

    @T.prim_func(s_tir=True)
    def dot_desc(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4, 4), "int8", offset_factor=1, scope="local"),
        C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def dot_sdot(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4, 4), "int8", offset_factor=1, scope="local"),
        C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C[T.ramp(T.int32(0), 1, 4)],
                B.vload([0, 0], "int8x16"),
                a,
                dtype="int32x4",
            )

    @T.prim_func(s_tir=True)
    def mmla_desc(
        A: T.Buffer((2, 8), "int8", offset_factor=1),
        B: T.Buffer((2, 8), "int8", offset_factor=1, scope="local"),
        C: T.Buffer((2, 2), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            for m, i, k in T.grid(2, 2, 8):
                with T.sblock("update"):
                    vm, vi, vk = T.axis.remap("SSR", [m, i, k])
                    C[vm, vi] = C[vm, vi] + T.cast(A[vm, vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def mmla_i8mm(
        A: T.Buffer((2, 8), "int8", offset_factor=1),
        B: T.Buffer((2, 8), "int8", offset_factor=1, scope="local"),
        C: T.Buffer((2, 2), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            C.vstore(
                [0, 0],
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smmla.v4i32.v16i8"),
                    C.vload([0, 0], "int32x4"),
                    A.vload([0, 0], "int8x16"),
                    B.vload([0, 0], "int8x16"),
                    dtype="int32x4",
                ),
            )

    TensorIntrin.register(SDOT, dot_desc, dot_sdot, override=True)
    TensorIntrin.register(I8MM, mmla_desc, mmla_i8mm, override=True)


__all__ = ["COLUMNS", "I8MM", "MMLA_COLUMNS", "MMLA_ROWS", "ROWS", "SDOT", "register"]
