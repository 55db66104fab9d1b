"""CUDA targets of the TVM backend: lowering, GPU schedules, build, export and load.

Lowering imports the graph with the same torch frontend as the CPU path (`lower`) and
turns every lowbit linear into a ``call_tir`` of a CUDA kernel plan:

* ``linear_packed`` → `kernels.cuda_linear` (packed words decoded in registers, warp
  reduction, shared-memory tiles of ``x``);
* ``linear_packed_a8`` → `kernels.cuda_a8_linear` (in-kernel int8 activations, ``__dp4a``,
  bit-exact against the reference);
* an act-order ``g_idx`` of whole groups and a partial last group are first made contiguous
  whole groups, as on the CPU (`lower.contiguous_groups`);
* a layout a kernel cannot take (3-bit codes, uneven groups) is dequantized at compile
  time and multiplied by a scheduled fp32 matmul (A8 layers first fake-quantize their
  input exactly as the reference does); each such layer is listed in
  `Lowering.fallbacks` with the kernel's reason.

Every other operator is legalized and scheduled by TVM's dlight GPU rules (Matmul,
GEMV, Reduction, GeneralReduction, Fallback); a PrimFunc left without thread bindings
is a `BackendError`. The build keeps the generated CUDA source (TVM compiles it to a
device binary only where a CUDA driver is loaded, and then through `nvcc_compile`);
`save` compiles it with ``nvcc`` into a fatbin (SASS for the target's ``sm_XX`` plus its
PTX, so newer GPUs can JIT it) and links it into the library as a data symbol. `load`
refuses on a machine without a CUDA device and otherwise hands TVM's runtime the
embedded fatbin instead of compiling the source again.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import math
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import tvm
import tvm_ffi
from torch import fx
from torch.fx.operator_schemas import normalize_function
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import dlight
from tvm.target import Target

from lowbit.backends.tvm.inline import inline_wrapped_regions
from lowbit.backends.tvm.kernels import cuda_a8_linear, cuda_linear
from lowbit.backends.tvm.kernels.common import KernelPlan
from lowbit.backends.tvm.kernels.packed_linear import PackedLinearSpec
from lowbit.backends.tvm.lower import (
    LINEAR_PACKED_A8_NAME,
    LINEAR_PACKED_NAME,
    InputSpec,
    LoweredLinear,
    Lowering,
    _GraphImporter,
    call_kernel,
    contiguous_groups,
    emit_on_rows,
    grouped_columns,
    input_specs,
    layer_spec,
    to_tvm,
    tuned_plan,
)
from lowbit.backends.tvm.target import cuda_arch
from lowbit.errors import ArtifactError, BackendError
from lowbit.ir import ops_a8, packing

log = logging.getLogger(__name__)

LIBRARY_FILE = "model.so"
#: The symbol under which `save` links the nvcc fatbin into the library (``_size`` holds its length).
FATBIN_SYMBOL = "lowbit_cuda_fatbin"
SIGNATURE_FILE = "signature.json"
NVCC = "nvcc"
#: TVM's hooks around CUDA code generation: one sees the generated source, one compiles it.
POSTPROC_HOOK = "tvm_callback_cuda_postproc"
COMPILE_HOOK = "tvm_callback_cuda_compile"


def gpu_rules() -> list[dlight.ScheduleRule]:
    """dlight's GPU rules for the ordinary operators, most specific first."""
    return [dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback()]


def lower(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], target: Target, tuner: Any = None) -> Lowering:
    """Import ``gm`` for a CUDA target, specialized to the shapes of its inputs (module doc).

    ``tuner`` (a `lowbit.backends.tvm.tuning.Tuner`) supplies recorded knobs of the CUDA
    kernels; without it (or a record) they use their hand schedules.
    """
    cuda_arch(target)  # an arch this backend supports
    gm = inline_wrapped_regions(gm)
    inputs = input_specs(gm, example_inputs)
    converter = _LinearConverter(gm, target, tuner)
    convert = {LINEAR_PACKED_NAME: converter, LINEAR_PACKED_A8_NAME: converter}
    try:
        mod = _GraphImporter().from_fx(gm, [(spec.shape, spec.dtype) for spec in inputs], keep_params_as_input=False,
                                       unwrap_unit_return_tuple=True, no_bind_return_tuple=False,
                                       custom_convert_map=convert)
    except (AssertionError, KeyError, NotImplementedError) as error:  # how the frontend reports unsupported ops
        raise BackendError(f"TVM's torch frontend cannot import this graph: {error}") from error
    lowering = Lowering(mod, target, inputs, converter.linears)
    log.info("lowered graph for CUDA %s: %d low-bit linear(s), %d on the fp32 fallback", cuda_arch(target),
             len(lowering.linears), len(lowering.fallbacks))
    return lowering


def schedule_module(lowering: Lowering) -> tvm.IRModule:
    """Legalize and fuse the Relax module, then schedule every remaining TIR function with `gpu_rules`."""
    target = lowering.target
    passes = (
        [relax.transform.DecomposeOpsForInference()]
        + cuda_pipeline.library_dispatch_passes(target)
        + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
           relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination(),
           dlight.ApplyDefaultSchedule(*gpu_rules())]
    )
    with target:
        return tvm.transform.Sequential(passes)(lowering.mod)


def unbound_functions(mod: tvm.IRModule) -> list[str]:
    """Names of the TIR functions of ``mod`` with a block outside every GPU thread binding."""
    return sorted(gvar.name_hint for gvar, func in mod.functions_items()
                  if isinstance(func, tirx.PrimFunc) and not _all_blocks_bound(func))


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


@dataclasses.dataclass
class CUDABuild:
    """A built module: the VM executable and the CUDA source of its kernels."""

    executable: relax.VMExecutable
    source: str


def build(lowering: Lowering) -> CUDABuild:
    """Schedule, check that every function is bound to threads, and compile for the VM.

    Raises `BackendError` naming the functions no GPU schedule bound. Where a CUDA driver
    is loaded, TVM compiles the kernels right away: with `nvcc_compile` (no fast-math).
    """
    mod = schedule_module(lowering)
    unbound = unbound_functions(mod)
    if unbound:
        raise BackendError(f"no GPU schedule bound {', '.join(unbound)} to CUDA threads; "
                           "it would not run on the device")
    target = lowering.target
    sources: list[str] = []

    def record(code: str, _: Target) -> str:
        sources.append(str(code))
        return code

    with contextlib.ExitStack() as stack:
        stack.enter_context(_global_hook(POSTPROC_HOOK, record))
        if cuda_available():
            stack.enter_context(_global_hook(COMPILE_HOOK, functools.partial(_compile_for_runtime,
                                                                             arch=cuda_arch(target))))
        stack.enter_context(target)
        rest = tvm.transform.Sequential(cuda_pipeline.dataflow_lower_passes(target)
                                        + cuda_pipeline.finalize_passes(target))
        executable = tvm.compile(mod, target=target, relax_pipeline=rest)
    if len(sources) != 1:
        raise BackendError(f"expected one CUDA module from the build, got {len(sources)}")
    return CUDABuild(executable, sources[0])


def cuda_available() -> bool:
    """Whether TVM's CUDA runtime is loaded and sees a device (needs the NVIDIA driver)."""
    return bool(tvm.runtime.enabled("cuda")) and bool(tvm.cuda(0).exist)


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
    gencode = ["-arch", arch] if fmt == "ptx" else ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]
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


class CUDARunner:
    """A model compiled for a CUDA target; runs on ``tvm.cuda(0)`` where there is one.

    Inputs are torch tensors (CPU or CUDA), positionally or by placeholder name; outputs
    come back on the device of the first input. On a machine without a CUDA device the
    runner exists for export only (``runnable`` is False).
    """

    def __init__(self, executable: Any, target: Target, inputs: Sequence[InputSpec],
                 linears: Sequence[LoweredLinear] = (), source: str | None = None) -> None:
        self.executable = executable
        self.target = target
        self.arch = cuda_arch(target)
        self.inputs = list(inputs)
        self.linears = list(linears)
        self.source = source
        self._main = relax.VirtualMachine(executable, tvm.cuda(0))["main"] if cuda_available() else None

    @property
    def runnable(self) -> bool:
        """Whether this machine has a CUDA device to run the module on."""
        return self._main is not None

    @property
    def fallbacks(self) -> list[LoweredLinear]:
        """Low-bit linears that run as dequantized fp32 matmuls (with the reason)."""
        return [linear for linear in self.linears if linear.kernel == "dense"]

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        if not self.runnable:
            raise BackendError(f"this module is compiled for CUDA {self.arch} and this machine has no CUDA device; "
                               "export it and run it on a GPU machine")
        values = _bind(self.inputs, args, kwargs)
        device = values[0].device if values else torch.device("cpu")
        tensors = [to_tvm(v, "cuda") for v in values]
        return _to_torch(self._main(*tensors), device)


def save(runner: CUDARunner, directory: Path) -> list[str]:
    """Write ``model.so`` (host code, CUDA module, weights, and the nvcc fatbin embedded) and the signature."""
    if runner.source is None:
        raise BackendError("this CUDA runner has no kernel source to compile; build it with lowbit's CUDA backend")
    directory = Path(directory)
    fatbin = nvcc_compile(runner.source, runner.arch)
    with tempfile.TemporaryDirectory(prefix="lowbit-fatbin-") as tmp:
        runner.executable.export_library(str(directory / LIBRARY_FILE), addons=[_fatbin_object(fatbin, Path(tmp))])
    signature = {
        "arch": "cuda",
        "cuda_arch": runner.arch,
        "source_sha256": _sha256(runner.source.encode()),
        "fatbin_sha256": _sha256(fatbin),
        "inputs": [dataclasses.asdict(spec) for spec in runner.inputs],
        "linears": [dataclasses.asdict(linear) for linear in runner.linears],
    }
    (directory / SIGNATURE_FILE).write_text(json.dumps(signature, indent=2) + "\n")
    log.info("exported CUDA %s module: fatbin of %d bytes", runner.arch, len(fatbin))
    return [LIBRARY_FILE, SIGNATURE_FILE]


def embedded_fatbin(library: Path) -> bytes:
    """The fatbin that `save` embedded in ``library`` (loads the library's host code, needs no GPU)."""
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
    result = subprocess.run([compiler, "-c", "-fPIC", str(tmp / "fatbin.S"), "-o", str(tmp / "fatbin.o")],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BackendError(f"assembling the embedded fatbin failed: {result.stderr}")
    return str(tmp / "fatbin.o")


def load(directory: Path, target: Target) -> CUDARunner:
    """A runner for an exported CUDA module; `ArtifactError` on a machine without a CUDA device."""
    directory = Path(directory)
    signature = json.loads((directory / SIGNATURE_FILE).read_text())
    arch = signature.get("cuda_arch")
    if signature.get("arch") != "cuda" or arch is None:
        raise ArtifactError(f"{directory} does not hold a CUDA library (signature arch {signature.get('arch')!r})")
    if not cuda_available():
        raise ArtifactError(f"{directory} holds a library for target cuda ({arch}); this machine has no CUDA device "
                            "or driver (TVM's CUDA runtime cannot load). Run it on a machine with an NVIDIA GPU")
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
    inputs = [InputSpec(item["name"], tuple(item["shape"]), item["dtype"]) for item in signature["inputs"]]
    linears = [LoweredLinear(item["node"], PackedLinearSpec(**item["spec"]), item["kernel"], item["reason"])
               for item in signature["linears"]]
    return CUDARunner(module, target, inputs, linears)


class _LinearConverter:
    """``custom_convert_map`` entry for ``linear_packed`` and ``linear_packed_a8`` nodes."""

    def __init__(self, gm: fx.GraphModule, target: Target, tuner: Any = None) -> None:
        self.gm = gm
        self.target = target
        self.tuner = tuner
        self.linears: list[LoweredLinear] = []

    def __call__(self, node: fx.Node, importer: Any) -> relax.Expr:
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        x = importer.env[call["x"]]
        if x.ty.dtype != "float32":
            raise BackendError(f"node '{node.name}': the CUDA kernels take float32 activations, got {x.ty.dtype}")
        a8 = node.target is ops_a8.linear_packed_a8
        names = ("qweight", "scales", "zeros", "g_idx", "bias") + (("act_scale",) if a8 else ())
        tensors = {name: self._constant(node, call.get(name)) for name in names}
        rows = math.prod([int(d) for d in x.ty.shape][:-1])
        spec, tensors, order = contiguous_groups(layer_spec(call, rows, tensors, a8), tensors, node.name)
        bb = importer.block_builder
        return emit_on_rows(bb, x, spec.out_features, lambda x2d, _: self._call(
            bb, node.name, grouped_columns(bb, x2d, order, spec.in_features), spec, tensors))

    def _call(self, bb: relax.BlockBuilder, name: str, x: relax.Expr, spec: PackedLinearSpec,
              tensors: Mapping[str, torch.Tensor | None]) -> relax.Expr:
        """The layer's kernel on the 2-D input ``x``, or the fp32 fallback with the reason recorded."""
        planned = tuned_plan(cuda_a8_linear if spec.act_bits is not None else cuda_linear, spec, tensors, self.target,
                             self.tuner)
        if isinstance(planned, KernelPlan):
            self.linears.append(LoweredLinear(name, spec, planned.name))
            return call_kernel(bb, planned.func, f"lowbit_{planned.name}", x, planned.consts, spec.out_features)
        log.info("node '%s': fp32 fallback (%s)", name, planned)
        self.linears.append(LoweredLinear(name, spec, "dense", planned))
        return self._fallback(bb, x, spec, tensors)

    @staticmethod
    def _fallback(bb: relax.BlockBuilder, x: relax.Expr, spec: PackedLinearSpec,
                  tensors: Mapping[str, torch.Tensor | None]) -> relax.Expr:
        """``x (or x̂) · Wᵀ + b`` with the weight dequantized here; dlight schedules the matmul."""
        if spec.act_bits is not None:
            step = None if spec.act_dynamic else float(tensors["act_scale"])
            quantize = bb.add_func(cuda_a8_linear.fake_quantize_func(spec.batch, spec.in_features, step),
                                   "lowbit_fake_quantize")
            x = bb.emit(relax.call_tir(quantize, [x], out_ty=relax.TensorType((spec.batch, spec.in_features),
                                                                              "float32")))
        weight = packing.dequantize(tensors["qweight"], tensors["scales"], tensors["zeros"], tensors["g_idx"],
                                    spec.bits, spec.group_size, spec.in_features)
        y = bb.emit(relax.op.matmul(x, relax.const(weight.t().contiguous().numpy())))
        if tensors["bias"] is not None:
            y = bb.emit(relax.op.add(y, relax.const(tensors["bias"].to(torch.float32).numpy())))
        return y

    def _constant(self, node: fx.Node, arg: Any) -> torch.Tensor | None:
        """The tensor a ``get_attr`` argument names (None stays None)."""
        if arg is None:
            return None
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            raise BackendError(f"node '{node.name}': packed weights must be graph constants (get_attr), got {arg!r}")
        value = functools.reduce(getattr, str(arg.target).split("."), self.gm)
        if value.dtype not in (torch.float32, torch.uint8, torch.int32):
            raise BackendError(f"'{arg.target}' has dtype {value.dtype}; the packed format stores uint8/int32/float32")
        return value.detach()


def _bind(specs: Sequence[InputSpec], args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The inputs in graph order, checked against the compiled shapes and dtypes."""
    names = [spec.name for spec in specs]
    unknown = sorted(set(kwargs) - set(names[len(args):]))
    if len(args) > len(names) or unknown:
        raise BackendError(f"this module takes inputs {names}, got {len(args)} positional and {sorted(kwargs)}")
    values = list(args) + [kwargs.get(name) for name in names[len(args):]]
    got = [(tuple(v.shape), str(v.dtype).removeprefix("torch.")) if isinstance(v, torch.Tensor) else type(v).__name__
           for v in values]
    expected = [(spec.shape, spec.dtype) for spec in specs]
    if got != expected:
        raise BackendError(f"this module was compiled for inputs {expected}, got {got}; compile it again for new shapes")
    return values


def _to_torch(value: Any, device: torch.device) -> Any:
    """VM results (a tensor or nested tuples of them) as torch tensors on ``device``."""
    if isinstance(value, tvm.runtime.Tensor):
        return torch.from_dlpack(value).to(device)
    return tuple(_to_torch(item, device) for item in value)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = [
    "FATBIN_SYMBOL",
    "LIBRARY_FILE",
    "SIGNATURE_FILE",
    "CUDABuild",
    "CUDARunner",
    "build",
    "cuda_available",
    "embedded_fatbin",
    "gpu_rules",
    "load",
    "lower",
    "nvcc_compile",
    "save",
    "schedule_module",
    "unbound_functions",
]
