"""The LLVM CPU toolchain (x86 and aarch64): packed kernels, the dense fallback, lowbit's CPU schedules, export.

Float-activation layers run on `packed_gemm` from `packed_gemm.MIN_ROWS` rows on (prefill) and `packed_linear`
otherwise (or where the panel GEMM does not fit); int8-activation layers on the architecture's int8 kernel. The
fallback, and every fp32 linear with a constant weight, is the dense kernel (`kernels.generic.dense`). The build
runs TVM's CPU Relax pipeline with the schedules of `lowbit.backends.tvm.schedule` applied after legalization, so
no operator runs unscheduled. aarch64 libraries are linked with a cross compiler; loading checks that this machine
has the architecture and the x86 features the library was compiled for.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.s_tir import dlight
from tvm.support import cc
from tvm.target import Target

from lowbit.backends.tvm import fastmath, layout, parallel, schedule, stack
from lowbit.backends.tvm.build_guard import bounded_build
from lowbit.backends.tvm.convert import (
    Lowering,
    call_kernel,
    dequantized_weight,
    emit_on_rows,
)
from lowbit.backends.tvm.convert_conv import Int8ConvCalls
from lowbit.backends.tvm.kernels.arm import a8_depthwise as arm_a8_depthwise
from lowbit.backends.tvm.kernels.arm import a8_linear as arm_a8_linear
from lowbit.backends.tvm.kernels.generic import packed_gemm, packed_linear
from lowbit.backends.tvm.kernels.generic.activations import fake_quant_cpu_func
from lowbit.backends.tvm.kernels.generic.dense import dense_plan
from lowbit.backends.tvm.kernels.spec import LinearKernel, PackedLinearSpec, Tensors
from lowbit.backends.tvm.kernels.x86 import a8_amx as x86_a8_amx
from lowbit.backends.tvm.kernels.x86 import a8_depthwise as x86_a8_depthwise
from lowbit.backends.tvm.kernels.x86 import a8_gemm as x86_a8_gemm
from lowbit.backends.tvm.kernels.x86 import a8_linear as x86_a8_linear
from lowbit.backends.tvm.runner import (
    LIBRARY_FILE,
    SIGNATURE_FILE,
    CPURunner,
    Runner,
    signature_inputs,
    signature_linears,
    write_signature,
)
from lowbit.backends.tvm.target import (
    float32_lanes,
    has_features,
    host_arch,
    target_arch,
    x86_host_target,
)
from lowbit.backends.tvm.toolchains.base import Toolchain
from lowbit.errors import ArtifactError, BackendError

log = logging.getLogger(__name__)

#: The aarch64 cross compiler used to link ARM libraries, and the Debian package that has it.
ARM_CXX = "aarch64-linux-gnu-g++"
ARM_CXX_PACKAGE = "g++-aarch64-linux-gnu"
#: x86 features a library may be compiled to use; loading checks the host has each one the library needs.
X86_FEATURES = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512vnni",
    "avxvnni",
    "amx-tile",
    "amx-int8",
)
#: The int8-activation kernels of each CPU architecture, in order of preference.
A8_KERNELS: dict[str, tuple[LinearKernel, ...]] = {
    "x86_64": (x86_a8_linear.KERNEL,),
    "aarch64": (arm_a8_linear.KERNEL,),
}
#: int8-activation GEMMs tried before those from `a8_gemm.MIN_ROWS` rows on (x86: AMX for 8-bit codes in whole
#: blocks of 32 rows, then AVX-512 VNNI).
A8_GEMM_KERNELS: dict[str, tuple[LinearKernel, ...]] = {"x86_64": (x86_a8_amx.KERNEL, x86_a8_gemm.KERNEL)}
#: int8 depthwise convolution kernels, tried first for a depthwise `ConvSpec`.
A8_DEPTHWISE_KERNELS: dict[str, tuple[LinearKernel, ...]] = {
    "x86_64": (x86_a8_depthwise.KERNEL,),
    "aarch64": (arm_a8_depthwise.KERNEL,),
}


def library_compiler(arch: str, what: str) -> Any:
    """The compiler that links a library for ``arch``: None on a machine of that architecture, the aarch64 cross
    compiler for ARM; `BackendError` saying that ``what`` (e.g. "exporting a library") cannot be done otherwise."""
    if arch == host_arch():
        return None
    if arch != "aarch64":
        raise BackendError(f"{what} for {arch} from {host_arch()} is not supported")
    if shutil.which(ARM_CXX) is None:
        raise BackendError(
            f"{what} for ARM needs the cross compiler {ARM_CXX}: install the Debian package {ARM_CXX_PACKAGE}"
        )
    return cc.cross_compiler(ARM_CXX)


class CPUToolchain(Toolchain):
    """An LLVM CPU target: x86-64 (runs here on an x86 host) or aarch64 (cross-compiled, run over RPC or exported)."""

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.arch = target_arch(target)
        self.lanes = float32_lanes(target)
        self.name = f"the {self.arch} CPU"

    def kernels(self, spec: PackedLinearSpec) -> Sequence[LinearKernel]:
        """int8 activations: the architecture's int8 GEMMs from `a8_gemm.MIN_ROWS` rows on, then its int8 kernel;
        float: the panel GEMM from `packed_gemm.MIN_ROWS` rows on, then the packed GEMV."""
        if spec.act_bits is not None:
            gemms = A8_GEMM_KERNELS.get(self.arch, ()) if spec.batch >= x86_a8_gemm.MIN_ROWS else ()
            grouped = A8_DEPTHWISE_KERNELS.get(self.arch, ()) if getattr(spec, "conv_groups", 1) != 1 else ()
            return (*grouped, *gemms, *A8_KERNELS.get(self.arch, ()))
        if spec.batch >= packed_gemm.MIN_ROWS:
            return packed_gemm.KERNEL, packed_linear.KERNEL
        return (packed_linear.KERNEL,)

    def fallback(self, bb: relax.BlockBuilder, x: relax.Expr, spec: PackedLinearSpec, tensors: Tensors) -> relax.Expr:
        """The dense kernel on the dequantized weight; int8-activation layers first fake-quantize their input. A
        symbolic row count (`PackedLinearSpec.row_blocks`) runs Relax's ``linear``, scheduled by the default rules."""
        if spec.act_bits is not None:
            step = None if spec.act_dynamic else float(tensors["act_scale"])
            rows = tvm.te.var("rows", "int64") if spec.row_blocks else spec.batch
            quantize = bb.add_func(fake_quant_cpu_func(rows, spec.in_features, step), "lowbit_fake_quantize")
            x = bb.emit(
                relax.call_tir(quantize, [x], out_ty=relax.TensorType((x.ty.shape[0], spec.in_features), "float32"))
            )
        weight = dequantized_weight(spec, tensors)
        if spec.row_blocks:
            bias = tensors["bias"]
            constants = [relax.const(t.to(torch.float32).contiguous().numpy()) for t in (weight, bias) if t is not None]
            return relax.op.linear(x, *constants)
        func, consts = dense_plan(weight, tensors["bias"], spec.batch, self.lanes)
        return call_kernel(bb, func, "lowbit_dense_linear", x, consts, spec.out_features)

    def constant_linear(
        self, bb: relax.BlockBuilder, x: relax.Expr, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> relax.Expr:
        """A 1x1 convolution (`layout.pointwise_convolution`), tiled like the other convolutions: on a 4-D input (a
        channels-last image) as it is, and on rows (tokens) padded to a whole register tile as one image row of
        them (`layout.pointwise_rows`); fewer rows than a tile, or a symbolic count, run the dense kernel with the
        weight laid out in panels at compile time."""
        if len(x.ty.shape) == 4:
            return layout.pointwise_convolution(bb, x, weight, bias)
        n_out, row_tile = weight.shape[0], packed_gemm.tile_rows(self.lanes)

        def call(x2d: relax.Expr, rows: int | tvm.tirx.PrimExpr) -> relax.Expr:
            if isinstance(rows, int) and rows % row_tile == 0:
                return layout.pointwise_rows(bb, x2d, weight, bias)
            func, consts = dense_plan(weight, bias, rows, self.lanes)
            return call_kernel(bb, func, "lowbit_fp32_linear", x2d, consts, n_out)

        return emit_on_rows(bb, x, n_out, call, row_tile)

    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        """Legalize and fuse the Relax module, then give each TIR function a default CPU schedule; parallel loops
        too small to pay for a fork and join of the thread pool then run serially (`parallel.serial_small_loops`).

        ``DecomposeOpsForInference`` runs first so batch norm uses its running statistics
        (Relax's ``batch_norm`` otherwise legalizes to the training-mode computation).
        """
        target = self.target
        packed_conv2d = layout.packed_conv2d(self.lanes, schedule.vector_registers(target))
        passes = (
            layout.channels_last([Int8ConvCalls()])
            + [relax.transform.DecomposeOpsForInference()]
            + cpu_pipeline.library_dispatch_passes(target)
            + [relax.transform.LegalizeOps({**fastmath.legalize_map(), "relax.nn.conv2d": packed_conv2d})]
            + cpu_pipeline.legalize_passes(target)
            + [relax.transform.DeadCodeElimination(), dlight.ApplyDefaultSchedule(*schedule.cpu_rules())]
            + [parallel.serial_small_loops]
        )
        with target:
            return tvm.transform.Sequential(passes)(mod)

    def build(self, lowering: Lowering, tuning: Sequence[Any] = ()) -> CPURunner:
        """Schedule every TIR function of a lowered module and compile it for the VM."""
        executable = self.compile_module(lowering.mod)
        for linear in lowering.fallbacks:
            log.warning("%s runs as a dequantized fp32 dense kernel: %s", linear.node, linear.reason)
        return CPURunner(executable, self.arch, features(self.target), lowering.inputs, lowering.linears, tuning)

    def compile_module(self, mod: tvm.IRModule) -> Any:
        """A Relax module scheduled (`schedule`) and compiled to a VM executable, within the build time limit
        (`build_guard.bounded_build`: `BuildTimeoutError` names the function that does not compile)."""
        mod = self.schedule(mod)
        missing = unscheduled_functions(mod)
        if missing:
            log.warning("no default schedule fits %s: they run as plain loop nests", ", ".join(missing))
        target = self.target

        def build() -> Any:
            with torch.no_grad(), target:
                rest = tvm.transform.Sequential(
                    cpu_pipeline.dataflow_lower_passes(target) + cpu_pipeline.finalize_passes(target)
                )
                return tvm.compile(mod, target=target, relax_pipeline=rest, tir_pipeline=stack.PIPELINE)

        return bounded_build(build, mod, target)

    def save(self, runner: Runner, directory: Path) -> list[str]:
        """Write the shared library (weights embedded) and the signature; libraries for aarch64 are linked with
        the cross compiler ``aarch64-linux-gnu-g++``."""
        if not isinstance(runner, CPURunner):
            raise BackendError(f"the CPU toolchain exports CPU modules, not a {type(runner).__name__}")
        fcompile = library_compiler(runner.arch, "exporting a library")
        runner.executable.export_library(str(directory / LIBRARY_FILE), fcompile=fcompile)
        write_signature(directory, runner.signature())
        return [LIBRARY_FILE, SIGNATURE_FILE]

    def load(self, directory: Path, signature: Mapping[str, Any]) -> CPURunner:
        """A runner for a saved library, after checking this machine can run it (architecture, CPU features)."""
        arch, needed = signature["arch"], signature["features"]
        check_loadable(directory, arch, needed)
        return CPURunner(
            tvm.runtime.load_module(str(directory / LIBRARY_FILE)),
            arch,
            needed,
            signature_inputs(signature),
            signature_linears(signature),
        )


def check_loadable(directory: Path, arch: str, needed: Sequence[str]) -> None:
    """`ArtifactError` unless this machine has the library's architecture and the x86 features it was built for."""
    if arch != host_arch():
        raise ArtifactError(
            f"{directory} holds a library for {arch}; this machine is {host_arch()}. Run it on a matching device"
        )
    if arch == "x86_64":
        host = Target(x86_host_target())
        missing = [feature for feature in needed if not has_features(host, feature)]
        if missing:
            raise ArtifactError(
                f"{directory} was compiled for a CPU with {', '.join(missing)}, "
                "which this machine lacks; compile it again here"
            )


def unscheduled_functions(mod: tvm.IRModule) -> list[str]:
    """Names of the TIR functions in ``mod`` that no schedule was applied to."""
    return sorted(
        gvar.name_hint
        for gvar, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc) and not (func.attrs and func.attrs.get("tirx.is_scheduled"))
    )


def features(target: Target) -> list[str]:
    """The x86 features an LLVM target compiles for (empty for other architectures)."""
    if target_arch(target) != "x86_64":
        return []
    return [feature for feature in X86_FEATURES if has_features(target, feature)]


__all__ = [
    "A8_DEPTHWISE_KERNELS",
    "A8_GEMM_KERNELS",
    "A8_KERNELS",
    "ARM_CXX",
    "ARM_CXX_PACKAGE",
    "X86_FEATURES",
    "CPUToolchain",
    "features",
    "library_compiler",
    "unscheduled_functions",
]
