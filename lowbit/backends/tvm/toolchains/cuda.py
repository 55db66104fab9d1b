"""The CUDA toolchain: CUDA kernels for the low-bit linears and int8 convolutions, dlight GPU schedules, nvcc
fatbin export.

``linear_packed`` layers run on `kernels.cuda.linear`, ``linear_packed_a8`` on `kernels.cuda.a8_linear` (``__dp4a``,
bit-exact against the reference). A layout neither takes (3-bit codes, uneven groups) is dequantized at compile time
and multiplied by an fp32 matmul (int8-activation layers first fake-quantize their input exactly as the reference
does). Convolutions run channels-last (`layout`), 2-D ``conv_packed_a8`` ones on `kernels.cuda.a8_conv` (the dp4a
GEMM over their NHWC patches, or the direct depthwise kernel). Every other operator is legalized and scheduled by
TVM's dlight GPU rules; a PrimFunc left without thread bindings is a `BackendError`. The build keeps the generated
CUDA source (TVM compiles it to a device binary only where a CUDA driver is loaded, and then through
`nvcc_compile`); `save` compiles it with ``nvcc`` into a fatbin (SASS for the target's ``sm_XX`` plus its PTX, so
newer GPUs can JIT it) and links it into the library as a data symbol. `load` refuses on a machine without a CUDA
device and otherwise hands TVM's runtime the embedded fatbin instead of compiling the source again.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import dlight
from tvm.target import Target

from lowbit.backends.tvm import layout
from lowbit.backends.tvm.convert import Lowering, dequantized_weight
from lowbit.backends.tvm.convert_conv import Int8ConvCalls
from lowbit.backends.tvm.kernels.cuda import a8_conv as cuda_a8_conv
from lowbit.backends.tvm.kernels.cuda import a8_linear as cuda_a8_linear
from lowbit.backends.tvm.kernels.cuda import linear as cuda_linear
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec
from lowbit.backends.tvm.kernels.spec import LinearKernel, PackedLinearSpec, Tensors
from lowbit.backends.tvm.runner import (
    LIBRARY_FILE,
    SIGNATURE_FILE,
    CUDARunner,
    Runner,
    cuda_available,
    signature_inputs,
    signature_linears,
    write_signature,
)
from lowbit.backends.tvm.target import cuda_arch
from lowbit.backends.tvm.toolchains.base import Toolchain
from lowbit.errors import ArtifactError, BackendError

log = logging.getLogger(__name__)

#: The symbol under which `save` links the nvcc fatbin into the library (``_size`` holds its length).
FATBIN_SYMBOL = "lowbit_cuda_fatbin"
NVCC = "nvcc"
#: TVM's hooks around CUDA code generation: one sees the generated source, one compiles it.
POSTPROC_HOOK = "tvm_callback_cuda_postproc"
COMPILE_HOOK = "tvm_callback_cuda_compile"


def gpu_rules() -> list[dlight.ScheduleRule]:
    """dlight's GPU rules for the ordinary operators, most specific first."""
    return [
        dlight.gpu.Matmul(),
        dlight.gpu.GEMV(),
        dlight.gpu.Reduction(),
        dlight.gpu.GeneralReduction(),
        dlight.gpu.Fallback(),
    ]


@dataclasses.dataclass
class CUDABuild:
    """A built module: the VM executable and the CUDA source of its kernels."""

    executable: relax.VMExecutable
    source: str


class CUDAToolchain(Toolchain):
    """A CUDA target (sm_80 or newer) with its x86-64 host."""

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.arch = cuda_arch(target)  # an arch this backend supports
        self.name = f"CUDA {self.arch}"

    def kernels(self, spec: PackedLinearSpec) -> Sequence[LinearKernel]:
        """Float activations: the weight-only kernel; int8: the dp4a kernel, after the convolution kernels for a
        convolution's `ConvSpec`."""
        if spec.act_bits is None:
            return (cuda_linear.KERNEL,)
        return (*(cuda_a8_conv.KERNELS if isinstance(spec, ConvSpec) else ()), cuda_a8_linear.KERNEL)

    def fallback(self, bb: relax.BlockBuilder, x: relax.Expr, spec: PackedLinearSpec, tensors: Tensors) -> relax.Expr:
        """``x (or x̂) · Wᵀ + b`` with the weight dequantized here; dlight schedules the matmul."""
        if spec.act_bits is not None:
            step = None if spec.act_dynamic else float(tensors["act_scale"])
            quantize = bb.add_func(
                cuda_a8_linear.fake_quant_func(spec.batch, spec.in_features, step), "lowbit_fake_quantize"
            )
            x = bb.emit(
                relax.call_tir(quantize, [x], out_ty=relax.TensorType((spec.batch, spec.in_features), "float32"))
            )
        weight = dequantized_weight(spec, tensors)
        y = bb.emit(relax.op.matmul(x, relax.const(weight.t().contiguous().numpy())))
        if tensors["bias"] is not None:
            y = bb.emit(relax.op.add(y, relax.const(tensors["bias"].to(torch.float32).numpy())))
        return y

    def check_tuning(self, tune: Any) -> None:
        if tune:
            raise BackendError(
                "tuning CUDA kernels is not supported (the tuner times kernels on CPUs, locally or "
                "over RPC); compile with tune=None (recorded knobs) or tune=False (hand schedules)"
            )

    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        """Turn the convolutions channels-last, calling the int8 convolution kernels in place of theirs
        (`convert_conv.Int8ConvCalls`); legalize and fuse the Relax module, then schedule every remaining TIR
        function with `gpu_rules`."""
        target = self.target
        passes = (
            layout.channels_last([Int8ConvCalls()])
            + [relax.transform.DecomposeOpsForInference()]
            + cuda_pipeline.library_dispatch_passes(target)
            + [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
                dlight.ApplyDefaultSchedule(*gpu_rules()),
            ]
        )
        with target:
            return tvm.transform.Sequential(passes)(mod)

    def compile(self, lowering: Lowering) -> CUDABuild:
        """Schedule, check that every function is bound to threads, and compile for the VM.

        Raises `BackendError` naming the functions no GPU schedule bound. Where a CUDA driver
        is loaded, TVM compiles the kernels right away: with `nvcc_compile` (no fast-math).
        """
        mod = self.schedule(lowering.mod)
        unbound = unbound_functions(mod)
        if unbound:
            raise BackendError(
                f"no GPU schedule bound {', '.join(unbound)} to CUDA threads; it would not run on the device"
            )
        target = self.target
        sources: list[str] = []

        def record(code: str, _: Target) -> str:
            sources.append(str(code))
            return code

        with contextlib.ExitStack() as stack:
            stack.enter_context(_global_hook(POSTPROC_HOOK, record))
            if cuda_available():
                stack.enter_context(_global_hook(COMPILE_HOOK, functools.partial(_compile_for_runtime, arch=self.arch)))
            stack.enter_context(target)
            rest = tvm.transform.Sequential(
                cuda_pipeline.dataflow_lower_passes(target) + cuda_pipeline.finalize_passes(target)
            )
            executable = tvm.compile(mod, target=target, relax_pipeline=rest)
        if len(sources) != 1:
            raise BackendError(f"expected one CUDA module from the build, got {len(sources)}")
        return CUDABuild(executable, sources[0])

    def build(self, lowering: Lowering, tuning: Sequence[Any] = ()) -> CUDARunner:
        built = self.compile(lowering)
        return CUDARunner(built.executable, self.target, lowering.inputs, lowering.linears, built.source, tuning)

    def save(self, runner: Runner, directory: Path) -> list[str]:
        """Write ``model.so`` (host code, CUDA module, weights, and the nvcc fatbin embedded) and the signature."""
        if not isinstance(runner, CUDARunner):
            raise BackendError(f"the CUDA toolchain exports CUDA modules, not a {type(runner).__name__}")
        if runner.source is None:
            raise BackendError("this CUDA runner has no kernel source to compile; build it with lowbit's CUDA backend")
        fatbin = nvcc_compile(runner.source, runner.arch)
        with tempfile.TemporaryDirectory(prefix="lowbit-fatbin-") as tmp:
            runner.executable.export_library(str(directory / LIBRARY_FILE), addons=[_fatbin_object(fatbin, Path(tmp))])
        write_signature(
            directory,
            {
                "arch": "cuda",
                "cuda_arch": runner.arch,
                "source_sha256": _sha256(runner.source.encode()),
                "fatbin_sha256": _sha256(fatbin),
                **runner.signature(),
            },
        )
        log.info("exported CUDA %s module: fatbin of %d bytes", runner.arch, len(fatbin))
        return [LIBRARY_FILE, SIGNATURE_FILE]

    def load(self, directory: Path, signature: Mapping[str, Any]) -> CUDARunner:
        """A runner for an exported CUDA module; `ArtifactError` on a machine without a CUDA device."""
        arch = signature.get("cuda_arch")
        if signature.get("arch") != "cuda" or arch is None:
            raise ArtifactError(f"{directory} does not hold a CUDA library (signature arch {signature.get('arch')!r})")
        if not cuda_available():
            raise ArtifactError(
                f"{directory} holds a library for target cuda ({arch}); this machine has no CUDA "
                "device or driver (TVM's CUDA runtime cannot load). Run it on a machine with an "
                "NVIDIA GPU"
            )
        library = directory / LIBRARY_FILE
        fatbin = embedded_fatbin(library)
        if _sha256(fatbin) != signature["fatbin_sha256"]:
            raise ArtifactError(f"{library}: the embedded CUDA fatbin does not match its checksum")

        def shipped(source: str) -> bytearray:
            if _sha256(str(source).encode()) != signature["source_sha256"]:
                raise ArtifactError(f"{library}: the CUDA source does not match the embedded fatbin")
            return bytearray(fatbin)

        with _global_hook(COMPILE_HOOK, shipped):
            module = tvm.runtime.load_module(str(library))
        return CUDARunner(module, self.target, signature_inputs(signature), signature_linears(signature))


def unbound_functions(mod: tvm.IRModule) -> list[str]:
    """Names of the TIR functions of ``mod`` with a block outside every GPU thread binding."""
    return sorted(
        gvar.name_hint
        for gvar, func in mod.functions_items()
        if isinstance(func, tirx.PrimFunc) and not _all_blocks_bound(func)
    )


def _all_blocks_bound(func: tirx.PrimFunc) -> bool:
    """Whether every block of ``func`` sits under a loop bound to ``blockIdx``/``threadIdx``."""
    sch = s_tir.Schedule(func)
    pending = list(sch.get_child_blocks(sch.get_sblock("root")))
    while pending:
        block = pending.pop()
        if not any(sch.get(loop).thread_binding is not None for loop in sch.get_loops(block)):
            return False
        pending.extend(sch.get_child_blocks(block))
    return True


def nvcc_compile(source: str, arch: str, fmt: str = "fatbin") -> bytes:
    """Compile CUDA ``source`` with nvcc: ``"ptx"`` for ``arch``, or a ``"fatbin"`` with its SASS and PTX.

    No fast-math: the int8 kernels use explicitly rounded intrinsics anyway, and the
    fp32 operators keep IEEE ``expf``/division.
    """
    if fmt not in ("fatbin", "ptx"):
        raise BackendError(f"nvcc output format must be 'fatbin' or 'ptx', not {fmt!r}")
    if shutil.which(NVCC) is None:
        raise BackendError(f"compiling CUDA kernels needs {NVCC} (the CUDA toolkit) on PATH")
    number = arch.removeprefix("sm_")
    gencode = (
        ["-arch", arch] if fmt == "ptx" else ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]
    )
    with tempfile.TemporaryDirectory(prefix="lowbit-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / f"kernels.{fmt}"
        src.write_text(source)
        command = [NVCC, f"--{fmt}", "-O3", *gencode, "-o", str(out), str(src)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BackendError(f"nvcc failed for {arch} ({' '.join(command)}):\n{result.stdout}{result.stderr}")
        return out.read_bytes()


def _compile_for_runtime(source: str, arch: str) -> bytearray:
    """TVM's compile hook while building where a driver is loaded: nvcc's fatbin for ``arch``."""
    return bytearray(nvcc_compile(str(source), arch))


@contextlib.contextmanager
def _global_hook(name: str, func: Callable[..., Any]) -> Iterator[None]:
    """Register ``func`` as TVM's global function ``name`` for the duration, then restore the previous one."""
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, func, override=True)
    try:
        yield
    finally:
        if previous is None:
            tvm_ffi.remove_global_func(name)
        else:
            tvm_ffi.register_global_func(name, previous, override=True)


def embedded_fatbin(library: Path) -> bytes:
    """The fatbin that `CUDAToolchain.save` embedded in ``library`` (loads the library's host code, needs no GPU)."""
    try:
        handle = ctypes.CDLL(str(library))
        size = ctypes.c_uint64.in_dll(handle, FATBIN_SYMBOL + "_size").value
        return bytes((ctypes.c_ubyte * size).in_dll(handle, FATBIN_SYMBOL))
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{library} has no embedded CUDA fatbin ({error}); export it again") from error


def _fatbin_object(fatbin: bytes, tmp: Path) -> str:
    """An object file defining ``lowbit_cuda_fatbin`` (the bytes) and ``lowbit_cuda_fatbin_size``, to link in."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise BackendError("exporting a CUDA module links the fatbin into the library with a C compiler (gcc)")
    (tmp / "kernels.fatbin").write_bytes(fatbin)
    (tmp / "fatbin.S").write_text(
        f"    .section .rodata\n    .balign 16\n    .globl {FATBIN_SYMBOL}\n{FATBIN_SYMBOL}:\n"
        f'    .incbin "{tmp / "kernels.fatbin"}"\n{FATBIN_SYMBOL}_end:\n    .balign 8\n'
        f"    .globl {FATBIN_SYMBOL}_size\n{FATBIN_SYMBOL}_size:\n    .quad {FATBIN_SYMBOL}_end - {FATBIN_SYMBOL}\n"
        '    .section .note.GNU-stack,"",@progbits\n'
    )
    result = subprocess.run(
        [compiler, "-c", "-fPIC", str(tmp / "fatbin.S"), "-o", str(tmp / "fatbin.o")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BackendError(f"assembling the embedded fatbin failed: {result.stderr}")
    return str(tmp / "fatbin.o")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = [
    "FATBIN_SYMBOL",
    "CUDABuild",
    "CUDAToolchain",
    "embedded_fatbin",
    "gpu_rules",
    "nvcc_compile",
    "unbound_functions",
]
