"""Lower a lowbit GraphModule to a Relax IRModule and build it.

Ordinary operators go through TVM's torch frontend (its FX importer, extended with the ATen
overloads that graphs traced by torch.export keep, and a few fixes in `_GraphImporter`).
Each ``torch.ops.lowbit.linear_packed`` call becomes a ``relax.call_tir`` of a TIR kernel
whose packed weight, scales, zero points and bias are Relax constants:

* the packed-weight kernels when the layout allows it: `kernels.packed_gemm` from a few
  rows on (prefill), `kernels.packed_linear` for a GEMV or where the panel GEMM does not
  fit, the architecture's int8 kernel for ``linear_packed_a8``. An act-order ``g_idx`` of
  whole groups and a partial last group are first rewritten to contiguous whole groups
  (`contiguous_groups`: the input's columns taken in group order, padded with zeros);
* otherwise (3-bit codes, uneven groups, a shape a kernel does not tile) the weight is
  dequantized here to fp32 and multiplied by the scheduled dense kernel (`kernels.dense`).
  Each such layer is listed in `Lowering.fallbacks`.

fp32 linears whose weight is a graph constant run on the dense kernel too (`_GraphImporter`).

`build` runs TVM's CPU Relax pipeline with the default schedules of
`lowbit.backends.tvm.schedule` applied after legalization, so no operator runs
unscheduled. Shapes are static: the module is specialized to the example inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import tvm
from torch.fx.operator_schemas import normalize_function
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
from tvm.relax.frontend.torch.fx_translator import TorchFXImporter
from tvm.s_tir import dlight
from tvm.target import Target

from lowbit.backends.tvm import fastmath, schedule
from lowbit.backends.tvm.inline import inline_wrapped_regions
from lowbit.backends.tvm.kernels import a8_linear, packed_gemm, packed_linear
from lowbit.backends.tvm.kernels.dense import dense_plan
from lowbit.backends.tvm.kernels.common import KernelPlan
from lowbit.backends.tvm.kernels.packed_linear import PackedLinearSpec
from lowbit.backends.tvm.target import float32_lanes, target_arch
from lowbit.errors import BackendError
from lowbit.ir import ops, ops_a8, packing

log = logging.getLogger(__name__)

#: How the frontend names ``torch.ops.lowbit.linear_packed.default`` (``OpOverload.__name__``).
LINEAR_PACKED_NAME = ops.linear_packed.__name__
#: ... and ``torch.ops.lowbit.linear_packed_a8.default`` (int8 activations).
LINEAR_PACKED_A8_NAME = ops_a8.linear_packed_a8.__name__
#: The int8-activation kernel module of each CPU architecture (`kernels.common` plan contract).
A8_KERNELS = {"x86_64": "lowbit.backends.tvm.kernels.a8_linear", "aarch64": "lowbit.backends.tvm.kernels.a8_linear_arm"}


@dataclass(frozen=True)
class LoweredLinear:
    """How one ``linear_packed``/``linear_packed_a8`` call was lowered.

    ``kernel`` is ``"packed"`` (`kernels.packed_linear`), ``"packed_gemm"``, ``"packed_a8"`` or ``"dense"``.
    """

    node: str
    spec: PackedLinearSpec
    kernel: str
    reason: str | None = None


@dataclass(frozen=True)
class InputSpec:
    """One graph input: placeholder name, static shape and torch dtype name (``"float32"``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Lowering:
    """A Relax module for a graph, with the record of how its packed linears were lowered."""

    mod: tvm.IRModule
    target: Target
    inputs: list[InputSpec]
    linears: list[LoweredLinear] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[LoweredLinear]:
        """Packed layers that run as dequantized fp32 dense kernels, with the reason."""
        return [linear for linear in self.linears if linear.kernel == "dense"]


def lower(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], target: Target, tuner: Any = None) -> Lowering:
    """Import ``gm`` specialized to the shapes and dtypes of its inputs (see `input_specs`).

    ``tuner`` (a `lowbit.backends.tvm.tuning.Tuner`) chooses the knobs of each low-bit
    kernel; without it every kernel uses its hand schedule.
    """
    if target.kind.name == "cuda":
        from lowbit.backends.tvm import cuda  # builds on this module's importer

        return cuda.lower(gm, example_inputs, target, tuner)
    if target.kind.name != "llvm":
        raise BackendError(f"the TVM backend lowers for CPU (llvm) and CUDA targets, not '{target.kind.name}'")
    gm = inline_wrapped_regions(gm)
    inputs = input_specs(gm, example_inputs)
    converter = _PackedLinearConverter(gm, target, tuner)
    input_info = [(spec.shape, spec.dtype) for spec in inputs]
    try:
        mod = _GraphImporter(float32_lanes(target)).from_fx(
            gm, input_info, keep_params_as_input=False, unwrap_unit_return_tuple=True, no_bind_return_tuple=False,
            custom_convert_map={LINEAR_PACKED_NAME: converter, LINEAR_PACKED_A8_NAME: converter})
    except (AssertionError, KeyError, NotImplementedError) as error:  # how the frontend reports unsupported ops
        raise BackendError(f"TVM's torch frontend cannot import this graph: {error}") from error
    lowering = Lowering(mod, target, inputs, converter.linears)
    log.info("lowered graph: %d packed linear(s), %d on the dense fallback", len(lowering.linears),
             len(lowering.fallbacks))
    return lowering


def input_specs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> list[InputSpec]:
    """The graph's inputs: the leading ones shaped like ``example_inputs``, the rest from placeholder metadata.

    Graphs traced from keyword inputs (torch.export) record each placeholder's example
    value in ``node.meta["val"]``; `lowbit.compile` hands the backend only the
    positional example inputs.
    """
    inputs = _check_inputs(example_inputs)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(inputs) > len(placeholders):
        raise BackendError(f"{len(inputs)} example inputs for a graph with {len(placeholders)} inputs")
    specs = []
    for index, node in enumerate(placeholders):
        value = inputs[index] if index < len(inputs) else node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise BackendError(f"graph input '{node.target}' has no example tensor; pass it in example_inputs")
        specs.append(InputSpec(str(node.target), tuple(int(d) for d in value.shape),
                               str(value.dtype).removeprefix("torch.")))
    return specs


def build(lowering: Lowering) -> relax.VMExecutable:
    """Schedule every TIR function of a lowered module and compile it for the VM."""
    mod = schedule_module(lowering)
    missing = unscheduled_functions(mod)
    if missing:
        log.warning("no default schedule fits %s: they run as plain loop nests", ", ".join(missing))
    target = lowering.target
    with target:
        rest = tvm.transform.Sequential(cpu_pipeline.dataflow_lower_passes(target) + cpu_pipeline.finalize_passes(target))
        return tvm.compile(mod, target=target, relax_pipeline=rest)


def schedule_module(lowering: Lowering) -> tvm.IRModule:
    """Legalize and fuse the Relax module, then give each TIR function a default CPU schedule.

    ``DecomposeOpsForInference`` runs first so batch norm uses its running statistics
    (Relax's ``batch_norm`` otherwise legalizes to the training-mode computation).
    """
    target = lowering.target
    passes = (
        [relax.transform.DecomposeOpsForInference()]
        + cpu_pipeline.library_dispatch_passes(target)
        + [relax.transform.LegalizeOps(fastmath.legalize_map())]
        + cpu_pipeline.legalize_passes(target)
        + [relax.transform.DeadCodeElimination(), dlight.ApplyDefaultSchedule(*schedule.cpu_rules())]
    )
    with target:
        return tvm.transform.Sequential(passes)(lowering.mod)


def unscheduled_functions(mod: tvm.IRModule) -> list[str]:
    """Names of the TIR functions in ``mod`` that no schedule was applied to."""
    return sorted(
        gvar.name_hint for gvar, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc) and not (func.attrs and func.attrs.get("tirx.is_scheduled"))
    )


class _GraphImporter(TorchFXImporter, ExportedProgramImporter):
    """TVM's FX importer that also knows the ATen overloads (``add.Tensor``, ``view.default``, ...).

    Graphs traced through torch.export keep ATen calls next to ``call_module`` layers;
    `from_fx` alone knows only torch functions and modules, `from_exported_program` only
    ATen. The two importers share their base class and per-node conventions, so the ATen
    table of the latter is merged under the FX table (FX names win where both exist).

    With ``lanes`` (a CPU target's fp32 vector width), an fp32 linear layer whose weight is
    a graph constant runs on the dense kernel (`kernels.dense`, the weight laid out in
    panels at compile time) instead of Relax's ``linear``, a matmul with the transposed
    weight whose strided reads left it at half of torch's speed.
    """

    def __init__(self, lanes: int | None = None) -> None:
        super().__init__()
        self.lanes = lanes

    def _linear_module(self, node: fx.Node) -> relax.Expr:
        module = self.named_modules[node.target]
        dense = self._dense_linear(node.name, self.env[node.args[0]], self.params[module.weight],
                                   self.params.get(module.bias))
        return dense if dense is not None else super()._linear_module(node)

    def _linear(self, node: fx.Node) -> relax.Expr:
        args = self.retrieve_args(node)
        dense = self._dense_linear(node.name, args[0], args[1], args[2] if len(args) > 2 else None)
        return dense if dense is not None else super()._linear(node)

    def _dense_linear(self, name: str, x: relax.Expr, weight: relax.Expr, bias: relax.Expr | None) -> relax.Expr | None:
        """``call_tir`` of the dense kernel for ``x · weightᵀ + bias``, or None unless every operand allows it."""
        operands = [weight] + ([bias] if bias is not None else [])
        if self.lanes is None or not all(isinstance(t, tvm.ir.expr.Constant) and t.value.dtype == "float32"
                                         for t in operands):
            return None
        if x.ty.dtype != "float32" or len(weight.value.shape) != 2 or not all(
                isinstance(d, tvm.tirx.IntImm) for d in x.ty.shape):
            return None
        as_torch = [torch.from_numpy(t.value.numpy()) for t in operands]
        n_out, k_in = as_torch[0].shape

        def call(x2d: relax.Expr, rows: int) -> relax.Call:
            func, consts = dense_plan(as_torch[0], as_torch[1] if bias is not None else None, rows, self.lanes)
            return call_kernel(self.block_builder, func, "lowbit_fp32_linear", x2d, consts, n_out)

        log.debug("node '%s': fp32 linear %dx%d on the dense kernel", name, k_in, n_out)
        return emit_on_rows(self.block_builder, x, n_out, call)

    def create_convert_map(self) -> dict[Any, Any]:
        aten = ExportedProgramImporter.create_convert_map(self)
        return {**aten, "to.device": self._to_device, "new_ones.default": self._new_ones_typed,
                "scaled_dot_product_attention.default": self._attention,
                "diff.default": self._diff,
                "cumsum.default": self._cumsum_promoted, **TorchFXImporter.create_convert_map(self)}

    def _new_ones_typed(self, node: fx.Node) -> relax.Expr:
        """``aten.new_ones(x, size, dtype=...)``: the upstream converter ignores ``dtype``."""
        ones = self._new_ones(node)
        dtype = node.kwargs.get("dtype")
        if dtype is None:
            return ones
        return self.block_builder.emit(relax.op.astype(ones, self._convert_data_type(dtype, self.env)))

    def _attention(self, node: fx.Node) -> relax.Expr:
        """``aten.scaled_dot_product_attention`` on ``(..., L, E)`` tensors with a float or boolean mask.

        Written out as ``softmax(q kᵀ · scale + mask) v`` because Relax's fused attention
        takes float masks of one exact shape only; a boolean mask keeps ``True``
        positions and sends the others to ``-inf``, as torch does.
        """
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        if call.get("dropout_p", 0.0) or call.get("is_causal", False):
            raise BackendError(f"node '{node.name}': attention with dropout or is_causal is not lowered")
        bb = self.block_builder
        query, key, value = (self.env[call[name]] for name in ("query", "key", "value"))
        head_dim = int(query.ty.shape[-1])
        scale = call.get("scale") or 1.0 / math.sqrt(head_dim)
        dtype = query.ty.dtype
        key_t = bb.emit(relax.op.permute_dims(key, [*range(len(key.ty.shape) - 2), len(key.ty.shape) - 1,
                                                    len(key.ty.shape) - 2]))
        scores = bb.emit(relax.op.multiply(relax.op.matmul(query, key_t), relax.const(scale, dtype)))
        mask = call.get("attn_mask")
        if mask is not None:
            mask = self.env[mask]
            if mask.ty.dtype == "bool":
                mask = bb.emit(relax.op.where(mask, relax.const(0.0, dtype), relax.const(float("-inf"), dtype)))
            scores = bb.emit(relax.op.add(scores, mask))
        return bb.emit(relax.op.matmul(bb.emit(relax.op.nn.softmax(scores, axis=-1)), value))

    def _diff(self, node: fx.Node) -> relax.Expr:
        """``aten.diff(x, n, dim, prepend, append)``: ``n`` times ``x[1:] - x[:-1]`` along ``dim``.

        transformers' Llama mask code calls it on position ids (to detect packed sequences).
        """
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        bb = self.block_builder
        parts = [self.env[call[name]] for name in ("prepend", "input", "append") if call.get(name) is not None]
        dim = call.get("dim", -1) % len(parts[0].ty.shape)
        x = bb.emit(relax.op.concat(parts, axis=dim)) if len(parts) > 1 else parts[0]
        for _ in range(call.get("n", 1)):
            length = int(x.ty.shape[dim])
            later = relax.op.strided_slice(x, axes=[dim], begin=[1], end=[length])
            earlier = relax.op.strided_slice(x, axes=[dim], begin=[0], end=[length - 1])
            x = bb.emit(relax.op.subtract(later, earlier))
        return x

    def _cumsum_promoted(self, node: fx.Node) -> relax.Expr:
        """``aten.cumsum`` with torch's promotion: bool and integer inputs sum in int64 unless ``dtype`` is given."""
        x = self.env[node.args[0]]
        if "dtype" in node.kwargs or x.ty.dtype not in ("bool", "int8", "uint8", "int16", "int32"):
            return self._cumsum(node)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        return self.block_builder.emit(relax.op.cumsum(x, dim, "int64"))

    def _to_device(self, node: fx.Node) -> relax.Expr:
        """``aten.to.device(x, device, dtype, ...)``: on one CPU device only the dtype can change."""
        x = self.env[node.args[0]]
        dtype = self._convert_data_type(node.args[2] if len(node.args) > 2 else node.kwargs["dtype"], self.env)
        return x if dtype == x.ty.dtype else self.block_builder.emit(relax.op.astype(x, dtype))


class _PackedLinearConverter:
    """``custom_convert_map`` entry: ``linear_packed``/``linear_packed_a8`` node → ``call_tir`` of a kernel.

    An int8-activation layer whose layout the architecture's A8 kernel does not take runs
    as the reference's fake-quantized input (`a8_linear.fake_quant_func`) times the
    dequantized weight on the dense kernel.
    """

    def __init__(self, gm: fx.GraphModule, target: Target, tuner: Any = None) -> None:
        self.gm = gm
        self.target = target
        self.tuner = tuner
        self.lanes = float32_lanes(target)
        self.linears: list[LoweredLinear] = []

    def __call__(self, node: fx.Node, importer: Any) -> relax.Expr:
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        x = importer.env[call["x"]]
        if x.ty.dtype != "float32":
            raise BackendError(f"node '{node.name}': the TVM kernels take float32 activations, got {x.ty.dtype}")
        a8 = node.target is ops_a8.linear_packed_a8
        names = ("qweight", "scales", "zeros", "g_idx", "bias") + (("act_scale",) if a8 else ())
        tensors = {name: self._tensor(call[name]) for name in names}
        rows = math.prod([int(d) for d in x.ty.shape][:-1])
        spec, tensors, order = contiguous_groups(layer_spec(call, rows, tensors, a8), tensors, node.name)
        bb = importer.block_builder
        return emit_on_rows(bb, x, spec.out_features, lambda x2d, _: self._call_kernel(
            bb, node.name, grouped_columns(bb, x2d, order, spec.in_features), spec, tensors))

    def _call_kernel(self, bb: relax.BlockBuilder, name: str, x: relax.Expr, spec: PackedLinearSpec,
                     tensors: dict[str, torch.Tensor | None]) -> relax.Call:
        """``call_tir`` of the packed kernel's plan, or of the dense kernel when the layout needs the fallback."""
        planned = self._plan_float(spec, tensors) if spec.act_bits is None else self._plan_a8(spec, tensors)
        reason = planned if isinstance(planned, str) else None
        if isinstance(planned, KernelPlan):
            gemm = planned.name == packed_gemm.KERNEL_NAME
            kernel = "packed_a8" if spec.act_bits is not None else "packed_gemm" if gemm else "packed"
            func, consts = planned.func, planned.consts
        else:
            log.info("node '%s': dense fallback (%s)", name, reason)
            if spec.act_bits is not None:
                x = bb.emit(self._fake_quant(bb, x, spec, tensors["act_scale"]))
            weight = packing.dequantize(tensors["qweight"], tensors["scales"], tensors["zeros"], tensors["g_idx"],
                                        spec.bits, spec.group_size, spec.in_features)
            kernel = "dense"
            func, consts = dense_plan(weight, tensors["bias"], spec.batch, self.lanes)
        self.linears.append(LoweredLinear(name, spec, kernel, reason))
        return call_kernel(bb, func, f"lowbit_{kernel}_linear", x, consts, spec.out_features)

    def _plan_float(self, spec: PackedLinearSpec, tensors: dict[str, torch.Tensor | None]) -> KernelPlan | str:
        """The panel GEMM's plan from `packed_gemm.MIN_ROWS` rows on, where it takes the layer, else the packed GEMV's."""
        if spec.batch >= packed_gemm.MIN_ROWS:
            planned = self._plan(packed_gemm, spec, tensors)
            if isinstance(planned, KernelPlan):
                return planned
            log.debug("panel GEMM declined %s: %s", spec, planned)
        return self._plan(packed_linear, spec, tensors)

    def _plan_a8(self, spec: PackedLinearSpec, tensors: dict[str, torch.Tensor | None]) -> KernelPlan | str:
        """The plan of the target architecture's int8-activation kernel, or why there is none."""
        arch = target_arch(self.target)
        if arch not in A8_KERNELS:
            return f"no int8-activation kernel for {arch}"
        return self._plan(importlib.import_module(A8_KERNELS[arch]), spec, tensors)

    def _fake_quant(self, bb: relax.BlockBuilder, x: relax.Expr, spec: PackedLinearSpec,
                    act_scale: torch.Tensor | None) -> relax.Call:
        """``call_tir`` computing the reference's fake-quantized input ``x̂`` (the dense fallback's input)."""
        gvar = bb.add_func(a8_linear.fake_quant_func(spec.batch, spec.in_features, act_scale is None),
                           "lowbit_fake_quant_a8")
        args = [x] + ([] if act_scale is None else [relax.const(act_scale.reshape(1).numpy())])
        return relax.call_tir(gvar, args, out_ty=relax.TensorType((spec.batch, spec.in_features), "float32"))

    def _plan(self, kernel: ModuleType, spec: PackedLinearSpec,
              tensors: dict[str, torch.Tensor | None]) -> KernelPlan | str:
        return tuned_plan(kernel, spec, tensors, self.target, self.tuner)

    def _tensor(self, arg: Any) -> torch.Tensor | None:
        """The tensor a ``get_attr`` argument names (None stays None)."""
        if arg is None:
            return None
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            raise BackendError(f"linear_packed weights must be graph constants (get_attr nodes), got {arg!r}")
        value = functools.reduce(getattr, str(arg.target).split("."), self.gm)
        if value.dtype in (torch.float32, torch.uint8, torch.int32):
            return value.detach()
        raise BackendError(f"'{arg.target}' has dtype {value.dtype}; the packed format stores uint8/int32/float32")


def contiguous_groups(spec: PackedLinearSpec, tensors: dict[str, torch.Tensor | None], name: str
                      ) -> tuple[PackedLinearSpec, dict[str, torch.Tensor | None], torch.Tensor | None]:
    """The layer rewritten so that its groups are whole and contiguous, as the packed kernels need them, and the
    order to take the input's columns in (None: as they are).

    ``y = Σ_k x_k · w_k`` does not depend on the order of ``k``: an act-order ``g_idx``
    whose groups each hold ``group_size`` columns (the last one possibly fewer) becomes
    contiguous groups by sorting the weight's columns by group, and the input's alike. A
    partial last group is padded to a whole one with zero codes; the input gets as many
    zero columns (``spec.in_features`` grows), which add nothing to any sum.
    """
    k_in, group = spec.in_features, spec.group_size
    padded = spec.groups * group
    order = None
    if spec.has_g_idx:
        g_idx = tensors["g_idx"].to(torch.int64)
        counts = torch.bincount(g_idx, minlength=spec.groups)
        if len(counts) != spec.groups or bool((counts[:-1] != group).any()) or int(counts[-1]) != k_in - padded + group:
            return spec, tensors, None  # groups of other sizes: the dense fallback says why
        order = torch.sort(g_idx, stable=True).indices
    elif padded == k_in:
        return spec, tensors, None
    codes = packing.unpack(tensors["qweight"], spec.bits, k_in)
    codes = torch.nn.functional.pad(codes if order is None else codes[:, order], (0, padded - k_in))
    tensors = {**tensors, "qweight": packing.pack(codes.contiguous(), spec.bits), "g_idx": None}
    log.info("node '%s': %d input columns %s into %d whole groups of %d", name, k_in,
             "sorted by group" if order is not None else "padded", spec.groups, group)
    return dataclasses.replace(spec, in_features=padded, has_g_idx=False), tensors, order


def grouped_columns(bb: relax.BlockBuilder, x: relax.Expr, order: torch.Tensor | None, padded: int) -> relax.Expr:
    """The 2-D input of a layer rewritten by `contiguous_groups`: its columns taken in ``order``, then zero columns
    up to ``padded``."""
    if order is not None:
        x = bb.emit(relax.op.take(x, relax.const(order.to(torch.int32).numpy()), axis=1, mode="clip"))
    k_in = int(x.ty.shape[1])
    return bb.emit(relax.op.nn.pad(x, [0, 0, 0, padded - k_in])) if padded != k_in else x


#: Alignment of a tensor's data that TVM's DLPack import requires.
DLPACK_ALIGNMENT = 64


def to_tvm(value: torch.Tensor, device: str = "cpu") -> tvm.runtime.Tensor:
    """``value`` as a TVM tensor, contiguous on ``device`` and shared where possible; copied once more when its data
    is not `DLPACK_ALIGNMENT`-aligned (a slice, an array from numpy), which TVM's DLPack import refuses."""
    tensor = value.detach().to(device).contiguous()
    if tensor.data_ptr() % DLPACK_ALIGNMENT:
        tensor = tensor.clone()
    return tvm.runtime.from_dlpack(tensor)


def emit_on_rows(bb: relax.BlockBuilder, x: relax.Expr, n_out: int,
                 call: Callable[[relax.Expr, int], relax.Expr]) -> relax.Expr:
    """``call(x2d, rows)``, a ``(rows, n_out)`` result, on ``x`` flattened to rows; the leading dimensions restored."""
    shape = [int(d) for d in x.ty.shape]
    rows = math.prod(shape[:-1])
    x2d = bb.emit(relax.op.reshape(x, (rows, shape[-1]))) if len(shape) != 2 else x
    out = bb.emit(call(x2d, rows))
    return bb.emit(relax.op.reshape(out, (*shape[:-1], n_out))) if len(shape) != 2 else out


def call_kernel(bb: relax.BlockBuilder, func: tvm.tirx.PrimFunc, name: str, x: relax.Expr,
                consts: Sequence[torch.Tensor], n_out: int) -> relax.Call:
    """``call_tir`` of a linear kernel ``func(x, *consts, y)`` with ``consts`` as Relax constants."""
    gvar = bb.add_func(func, name)
    args = [x] + [relax.const(t.detach().cpu().contiguous().numpy()) for t in consts]
    return relax.call_tir(gvar, args, out_ty=relax.TensorType((int(x.ty.shape[0]), n_out), "float32"))


def layer_spec(call: Mapping[str, Any], rows: int, tensors: Mapping[str, torch.Tensor | None],
               a8: bool) -> PackedLinearSpec:
    """The spec of one ``linear_packed``/``linear_packed_a8`` call (normalized kwargs) on ``rows`` input rows."""
    return PackedLinearSpec(
        batch=rows, in_features=call["in_features"], out_features=tensors["qweight"].shape[0],
        bits=call["bits"], group_size=call["group_size"], asymmetric=tensors["zeros"] is not None,
        has_bias=tensors["bias"] is not None, has_g_idx=tensors["g_idx"] is not None,
        act_bits=8 if a8 else None, act_dynamic=tensors.get("act_scale") is None,
    )


def tuned_plan(kernel: ModuleType, spec: PackedLinearSpec, tensors: Mapping[str, torch.Tensor | None],
               target: Target, tuner: Any) -> KernelPlan | str:
    """``kernel``'s plan for a layer with the tuner's knobs (the hand schedule without a tuner or a record)."""
    planned = kernel.plan(spec, tensors, target)
    if isinstance(planned, str) or tuner is None:
        return planned
    knobs = tuner.knobs(kernel, spec, tensors)
    if knobs is None or knobs == planned.knobs:
        return planned
    return kernel.plan(spec, tensors, target, knobs=knobs)


def _check_inputs(example_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    inputs = list(example_inputs)
    for index, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            raise BackendError(f"example input {index} is a {type(value).__name__}; the TVM backend takes tensors")
    return inputs


__all__ = ["A8_KERNELS", "LINEAR_PACKED_A8_NAME", "LINEAR_PACKED_NAME", "InputSpec", "LoweredLinear", "Lowering", "input_specs", "build", "layer_spec", "lower", "schedule_module", "tuned_plan", "unscheduled_functions"]
