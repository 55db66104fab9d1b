"""x86 tensor intrinsics for the int8-activation kernels: an 8×4 unsigned × signed dot product.

One call computes, for 8 output rows ``i`` and 4 consecutive input columns ``k``,
``C[i] += Σ_k int32(A[k]) · int32(B[i, k])`` with ``A`` the 4 int8 activations (broadcast
to every row) and ``B`` the 8×4 weight codes as uint8 (32 contiguous bytes, row-major):
one 256-bit register of codes, eight int32 lanes of ``C``. Implementations:

* ``AVX2_U7``: ``vpmaddubsw`` (``llvm.x86.avx2.pmadd.ub.sw``: unsigned codes × signed
  activations, adjacent pairs summed into int16 with saturation) then ``vpmaddwd``
  against ones (``llvm.x86.avx2.pmadd.wd``: pairs of int16 summed into int32). Exact
  when codes are ≤ 127: a pair sums to at most ``2·127·128 = 32512 < 2^15``, so it
  covers 2- and 4-bit codes;
* ``AVX2_U8``: full 8-bit codes would saturate ``vpmaddubsw``, so the codes are split
  into nibbles, ``q = 16·hi + lo``; each nibble product goes through ``vpmaddubsw``
  exactly and ``vpmaddwd`` weighs the pairs by 1 and 16 (both fit int32);
* ``VNNI``: ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd.256``; AVX-512 VNNI with VL, or
  AVX-VNNI) sums four unsigned × signed products into each int32 lane without
  saturation, so it is exact for every uint8 code;
* ``VNNI_512``: the same on 16 output rows (64 bytes of codes, one zmm register,
  ``llvm.x86.avx512.vpdpbusd.512``), for the register-blocked GEMM of `kernels.x86.a8_gemm`.

Values are written inline, not bound to names: a vector bound in TVMScript becomes a
buffer, which inside a parallel loop TVM allocates from the workspace pool per task.
`register` parses and registers them under the names below (the kernels call it before
tensorizing), without importing ``tvm.s_tir.tensor_intrin`` (its import costs ~40 s).
"""

from __future__ import annotations

import functools

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

#: Output rows and input columns one intrinsic call covers (``VNNI_512``: ``WIDE_ROWS`` rows).
ROWS, COLUMNS = 8, 4
WIDE_ROWS = 16

AVX2_U7 = "lowbit_dot_8x4_u7s8_avx2"
AVX2_U8 = "lowbit_dot_8x4_u8s8_avx2"
VNNI = "lowbit_dot_8x4_u8s8_vnni"
VNNI_512 = "lowbit_dot_16x4_u8s8_vnni512"


@functools.cache
def register() -> None:
    """Parse the intrinsics' TVMScript and register them under the names above; once, when a kernel first
    tensorizes (parsing takes most of a second, which importing this module does not pay)."""

    @T.prim_func(s_tir=True)
    def dot_desc(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((8, 4), "uint8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def dot_avx2_u7(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((8, 4), "uint8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                B.vload([0, 0], "uint8x32"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32"),
                dtype="int16x16",
            )
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs,
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            )

    @T.prim_func(s_tir=True)
    def dot_avx2_u8(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((8, 4), "uint8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            low = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                B.vload([0, 0], "uint8x32") & T.broadcast(T.uint8(15), 32),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32"),
                dtype="int16x16",
            )
            high = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                B.vload([0, 0], "uint8x32") >> T.broadcast(T.uint8(4), 32),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32"),
                dtype="int16x16",
            )
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                low,
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            ) + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                high,
                T.broadcast(T.int16(16), 16),
                dtype="int32x8",
            )

    @T.prim_func(s_tir=True)
    def dot_vnni(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((8, 4), "uint8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            C[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"),
                C[T.ramp(T.int32(0), 1, 8)],
                B.vload([0, 0], "uint8x32"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32"),
                dtype="int32x8",
            )

    @T.prim_func(s_tir=True)
    def wide_desc(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((16, 4), "uint8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def dot_vnni512(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((16, 4), "uint8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C[T.ramp(T.int32(0), 1, 16)],
                B.vload([0, 0], "uint8x64"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 16), dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(AVX2_U7, dot_desc, dot_avx2_u7, override=True)
    TensorIntrin.register(AVX2_U8, dot_desc, dot_avx2_u8, override=True)
    TensorIntrin.register(VNNI, dot_desc, dot_vnni, override=True)
    TensorIntrin.register(VNNI_512, wide_desc, dot_vnni512, override=True)


__all__ = ["AVX2_U7", "AVX2_U8", "COLUMNS", "ROWS", "VNNI", "VNNI_512", "WIDE_ROWS", "register"]
