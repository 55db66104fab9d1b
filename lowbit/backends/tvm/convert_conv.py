"""Lowering of packed convolutions (``lowbit.conv_packed`` / ``conv_packed_a8``) to Relax.

Each call first becomes Relax's ``conv1d``/``conv2d`` on the weight dequantized at compile time (a Relax constant),
after the static int8 fake-quantization of the input ``clip(round(x / Δ), −128, 127) · Δ`` for ``conv_packed_a8``,
and the bias as an ``add``: operators that the channels-last conversion (`layout`) carries to NHWC.

A 2-D ``conv_packed_a8`` of one group or one group per channel that an int8 kernel of the toolchain takes
(`kernels.generic.conv`: the linear int8 GEMM over the patches of the NHWC input; the depthwise kernels) also
gets its planned kernel in the module, tagged with the weight constant. `Int8ConvCalls`, run right after the layout
conversion, replaces the NHWC ``conv2d`` on that weight by a ``call_tir`` of the kernel on the unquantized input
(the kernel quantizes it), so the layers around it stay NHWC; the bias ``add`` that follows is the reference's last
step. Where nothing else reads the values between the kernel, that ``add`` and an activation after it (ReLU, a
clamp such as ReLU6, hardswish, SiLU), a kernel that applies epilogues (`LinearKernel.epilogues`) is planned again
with them in its output stage and replaces the chain: one pass over the output instead of three, the same float32
operations. Everything else (weight-only packed convolutions, grouped int8 ones other than depthwise, 1-D ones)
runs as the fp32 convolution and is recorded as a fallback with its reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import numpy as np
import torch
import tvm
from torch import fx
from torch.fx.operator_schemas import normalize_function
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.target import Target

from lowbit.backends.tvm.convert import (
    FALLBACK,
    LoweredLinear,
    PackedLinearConverter,
    layer_spec,
    packed_constant,
    static_shape,
    tuned_plan,
)
from lowbit.backends.tvm.kernels.generic.activations import word_columns
from lowbit.backends.tvm.kernels.generic.conv import ConvSpec, patch_weight
from lowbit.backends.tvm.kernels.spec import KernelPlan, LinearKernel, Tensors
from lowbit.errors import BackendError
from lowbit.ir import ops_a8, ops_conv
from lowbit.ir.annotations import packed_layer

#: How the frontend names the packed convolution ops (``OpOverload.__name__``).
CONV_PACKED_NAME = ops_conv.conv_packed.__name__
CONV_PACKED_A8_NAME = ops_conv.conv_packed_a8.__name__
#: Attributes of a planned int8 convolution kernel: the weight constant of the conv2d it replaces, its constants, and
#: where it can apply the layer's bias and activation itself, what planning that form takes (`_fused_plan`).
WEIGHT_ATTR, CONSTS_ATTR, EPILOGUE_ATTR = "lowbit.conv_weight", "lowbit.conv_consts", "lowbit.conv_epilogue"
#: Columns of an int8 kernel's weight word (the patch width is rounded up to whole words).
_WORD_COLUMNS = 4


class PackedConvConverter:
    """``custom_convert_map`` entry: a packed convolution → Relax convolution on its dequantized weight, with the
    int8 kernel that replaces it where one takes it (module doc); each layer is appended to ``linears``."""

    def __init__(self, gm: fx.GraphModule, linears: PackedLinearConverter) -> None:
        self.gm = gm
        self.linears = linears

    def __call__(self, node: fx.Node, importer: Any) -> relax.Expr:
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        x = importer.env[call["x"]]
        if x.ty.dtype != "float32":
            raise BackendError(f"node '{node.name}': the TVM backend takes float32 activations, got {x.ty.dtype}")
        a8 = node.target is ops_conv.conv_packed_a8
        names = ("qweight", "scales", "zeros", "g_idx", "bias") + (("act_scale",) if a8 else ())
        tensors = {name: packed_constant(self.gm, node, call.get(name)) for name in names}
        geometry = [call[name] for name in ("kernel_size", "stride", "padding", "dilation", "groups")]
        weight = ops_conv.conv_weight(
            tensors["qweight"],
            tensors["scales"],
            tensors["zeros"],
            tensors["g_idx"],
            call["bits"],
            call["group_size"],
            call["in_features"],
            geometry[0],
        )
        bb = importer.block_builder
        if a8:
            x = _fake_quantize(bb, x, tensors["act_scale"])
        const = relax.const(weight.contiguous().cpu().numpy())
        out = bb.emit(_conv(x, const, *geometry[1:]))
        layer = packed_layer(node, call["qweight"]) or None
        planned, reason = (None, _FLOAT_REASON)
        if not static_shape(out):  # a symbolic batch: the rows of one image, repeated per image
            rows, symbolic = math.prod(int(d) for d in list(out.ty.shape)[2:]), True
            reason = _SYMBOLIC_REASON if a8 else reason
        else:
            out_shape = [int(d) for d in out.ty.shape]
            rows, symbolic = out_shape[0] * math.prod(out_shape[2:]), False
            if a8:
                planned, reason = self._int8_kernel(call, tensors, [int(d) for d in x.ty.shape], out_shape)
        if planned is not None:
            spec, plan, fused = planned
            func = plan.func.with_attr(WEIGHT_ATTR, const).with_attr(CONSTS_ATTR, _constants(plan))
            if fused is not None:
                func = func.with_attr(EPILOGUE_ATTR, fused)
            bb.add_func(func, f"lowbit_conv_{plan.name}")
            self.linears.linears.append(LoweredLinear(node.name, spec, plan.name, layer=layer))
        else:
            self.linears.linears.append(
                LoweredLinear(node.name, layer_spec(call, rows, tensors, a8, symbolic), FALLBACK, reason, None, layer)
            )
        if tensors["bias"] is not None:
            shape = (1, weight.shape[0]) + (1,) * len(geometry[0])
            out = bb.emit(relax.op.add(out, relax.const(tensors["bias"].reshape(shape).cpu().numpy())))
        return out

    def _int8_kernel(
        self, call: dict, tensors: dict, image: list[int], out_shape: list[int]
    ) -> tuple[tuple[ConvSpec, KernelPlan, dict[str, Any] | None] | None, str]:
        """The spec and plan of the first int8 kernel of the toolchain that takes the layer, with its fused plan
        (`_fused_plan`, where the kernel applies epilogues), or None and why not."""
        if len(call["kernel_size"]) != 2:
            return None, "a 1-D int8 convolution has no kernel: an fp32 convolution on its dequantized weight runs it"
        groups = call["groups"]
        depthwise = groups == image[1] == out_shape[1]
        if groups != 1 and not depthwise:
            return None, (
                f"a grouped int8 convolution ({groups} groups) has no int8 kernel: the fp32 NHWC convolution on the "
                "dequantized weight runs it"
            )
        whole_rows = tensors["scales"].shape[1] == 1 and tensors["g_idx"] is None
        width = 1 if depthwise else word_columns(call["bits"], _WORD_COLUMNS)
        columns = -(-call["in_features"] // width) * width if whole_rows else call["in_features"]
        base = layer_spec(call, out_shape[0] * out_shape[2] * out_shape[3], tensors, True)
        group_size = columns if whole_rows else base.group_size
        spec = ConvSpec(
            **{**vars(base), "in_features": columns, "group_size": group_size, "has_bias": False},
            image=(image[0], image[2], image[3], image[1]),
            out_size=tuple(out_shape[2:]),
            kernel_size=tuple(call["kernel_size"]),
            stride=tuple(call["stride"]),
            padding=tuple(call["padding"]),
            dilation=tuple(call["dilation"]),
            channels_last=whole_rows,
            conv_groups=groups,
        )
        patched = {
            **tensors,
            "qweight": tensors["qweight"]
            if depthwise
            else patch_weight(
                tensors["qweight"], tensors["zeros"], call["bits"], image[1], spec.kernel_size, columns, whole_rows
            ),
            "bias": None,
        }
        toolchain = self.linears.toolchain
        reason = f"{toolchain.name} has no int8 convolution kernel"
        for kernel in toolchain.kernels(spec):
            if not kernel.convolutions:
                continue
            reason = kernel.supports(spec, patched, toolchain.target)
            if reason is None:
                plan = tuned_plan(kernel, spec, patched, toolchain.target, self.linears.tuner)
                fused = _fused_plan(kernel, spec, patched, toolchain.target, plan.knobs) if kernel.epilogues else None
                return (spec, plan, fused), ""
        return None, f"no int8 convolution kernel takes it: {reason}"


#: The kernels an `EPILOGUE_ATTR` names, by name (stateless rules, registered as the lowering plans with them).
_EPILOGUE_KERNELS: dict[str, LinearKernel] = {}


def _fused_plan(
    kernel: LinearKernel, spec: ConvSpec, tensors: Tensors, target: Target, knobs: dict[str, int]
) -> dict[str, Any]:
    """What `_plan_fused` needs to plan the layer's kernel again with a bias and an epilogue: the kernel's name,
    the spec, knobs and target (JSON and text), the layer's constants (Relax constants)."""
    _EPILOGUE_KERNELS[kernel.name] = kernel
    return {
        "kernel": kernel.name,
        "spec": json.dumps(dataclasses.asdict(spec)),
        "knobs": json.dumps(knobs),
        "target": str(target),
        "tensors": {
            name: relax.const(tensor.detach().cpu().contiguous().numpy())
            for name, tensor in tensors.items()
            if tensor is not None and name != "bias"
        },
    }


def _plan_fused(
    fused: Any, bias: np.ndarray, epilogue: tuple[tuple[str, float], ...]
) -> tuple[tvm.tirx.PrimFunc, list[relax.Constant]] | None:
    """The kernel that `_fused_plan` describes, planned with the per-channel ``bias`` and the ``epilogue``, and its
    constants; None where its kernel is not registered in this process or does not take that epilogue."""
    kernel = _EPILOGUE_KERNELS.get(str(fused["kernel"]))
    if kernel is None:
        return None
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(str(fused["spec"])).items()}
    spec = ConvSpec(**{**fields, "has_bias": True, "epilogue": epilogue})
    tensors = {name: torch.from_numpy(const.value.numpy()) for name, const in fused["tensors"].items()}
    tensors["bias"] = torch.from_numpy(np.ascontiguousarray(bias)).reshape(-1)
    knobs = {str(k): int(v) for k, v in json.loads(str(fused["knobs"])).items()}
    target = Target(str(fused["target"]))
    if kernel.supports(spec, tensors, target) is not None:
        return None
    planned = kernel.plan(spec, tensors, target, knobs)
    return planned.func, _constants(planned)


def _constants(plan: KernelPlan) -> list[relax.Constant]:
    return [relax.const(t.detach().cpu().contiguous().numpy()) for t in plan.consts]


_FLOAT_REASON = (
    "weight-only packed convolution: the fp32 convolution on the dequantized weight runs it (float activations; "
    "the weight is stored dequantized)"
)


#: Why an int8 convolution of an input with a symbolic batch runs on its dequantized weight.
_SYMBOLIC_REASON = (
    "the int8 convolution kernels take a static batch (the input's batch is symbolic): an fp32 convolution on the "
    "dequantized weight runs it, on int8-rounded activations"
)


def _fake_quantize(bb: relax.BlockBuilder, x: relax.Expr, act_scale: torch.Tensor) -> relax.Expr:
    """``clip(round(x / Δ), −128, 127) · Δ``, the static int8 input of `lowbit.ir.ops_a8`."""
    step = relax.const(act_scale.to(torch.float32).cpu().numpy())
    codes = bb.emit(relax.op.round(relax.op.divide(x, step)))
    clipped = bb.emit(relax.op.clip(codes, ops_a8.ACT_QMIN, ops_a8.ACT_QMAX))
    return bb.emit(relax.op.multiply(clipped, step))


def _conv(
    x: relax.Expr, const: relax.Constant, stride: list[int], padding: list[int], dilation: list[int], groups: int
) -> relax.Expr:
    if len(stride) == 1:
        return relax.op.nn.conv1d(x, const, strides=stride, padding=padding, dilation=dilation, groups=groups)
    return relax.op.nn.conv2d(x, const, strides=stride, padding=padding, dilation=dilation, groups=groups)


#: Operators between a fake-quantized convolution's input and its ``conv2d`` after the layout conversion.
_QUANTIZE_CHAIN = frozenset(
    f"relax.{name}" for name in ("multiply", "clip", "minimum", "maximum", "round", "divide", "permute_dims")
)


@mutator
class _Int8ConvCalls(PyExprMutator):
    """Replaces each NHWC ``conv2d`` whose weight a planned int8 kernel is tagged with by the kernel's call."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.kernels = [
            (gvar, func)
            for gvar, func in mod.functions_items()
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs and WEIGHT_ATTR in func.attrs
        ]
        self.replaced = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (the functor's method name)
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d" or call.attrs.data_layout != "NHWC":
            return call
        weight = self._source(call.args[1])
        found = next((item for item in self.kernels if item[1].attrs[WEIGHT_ATTR].same_as(weight)), None)
        x = self._unquantized(call.args[0])
        if found is None or x is None:
            return call
        batch, height, width, channels = (int(d) for d in x.ty.shape)
        x = self.builder_.emit(relax.op.reshape(x, (batch, height, width * channels)))
        gvar, func = found
        out = [int(d) for d in call.ty.shape]
        shape = [int(d) for d in func.params[-1].shape]  # (pixels, C) or (B, OH, OW, C)
        kernel = self.builder_.emit(
            relax.call_tir(gvar, [x, *func.attrs[CONSTS_ATTR]], out_ty=relax.TensorType(shape, "float32"))
        )
        self.replaced += 1
        return relax.op.reshape(kernel, out)

    def _source(self, expr: relax.Expr) -> relax.Expr:
        """The constant a weight was permuted from (the layout conversion's ``permute_dims``)."""
        expr = self._bound(expr)
        if isinstance(expr, relax.Call) and expr.op.name == "relax.permute_dims":
            return self._bound(expr.args[0])
        return expr

    def _unquantized(self, expr: relax.Expr) -> relax.Expr | None:
        """The NHWC input of a fake-quantized ``conv2d`` input: the chain followed back to the ``divide``, its
        permutations applied to the divided value."""
        axes: list[int] | None = None
        while True:
            value = self._bound(expr)
            if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
                return None
            name = value.op.name
            if name not in _QUANTIZE_CHAIN:
                return None
            if name == "relax.permute_dims":
                step = [int(a) for a in value.attrs.axes]
                axes = step if axes is None else [step[a] for a in axes]
            if name == "relax.divide":
                x = value.args[0]
                return x if axes is None else self.builder_.emit(relax.op.permute_dims(x, axes))
            expr = value.args[0]

    def _bound(self, expr: relax.Expr) -> relax.Expr:
        while isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is None:
                return expr
            expr = bound
        return expr


@dataclasses.dataclass(frozen=True)
class _Fusion:
    """A kernel call whose output (reshaped to the image) only feeds a per-channel constant ``add``, then the
    activation ``steps``: the chain ends at the binding whose value is ``terminal``."""

    kernel: relax.Call
    bias: np.ndarray
    steps: tuple[tuple[str, float], ...]
    terminal: relax.Call


class _Chains:
    """The bindings of a function and who uses each variable, to find `_Fusion` chains."""

    def __init__(self, mod: tvm.IRModule, func: relax.Function) -> None:
        self.mod = mod
        self.values: dict[relax.Var, relax.Expr] = {}
        self.users: dict[relax.Var, list[relax.Var | None]] = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                self.values[binding.var] = binding.value
                for var in relax.analysis.free_vars(binding.value):
                    self.users.setdefault(var, []).append(binding.var)
        for var in relax.analysis.free_vars(func.body.body):
            self.users.setdefault(var, []).append(None)

    def fusions(self) -> list[_Fusion]:
        found = []
        for var, value in self.values.items():
            if _op_name(value) != "relax.call_tir" or EPILOGUE_ATTR not in (self._kernel(value).attrs or {}):
                continue
            reshaped = self._only_user(var, "relax.reshape")
            added = self._only_user(reshaped, "relax.add") if reshaped is not None else None
            bias = self._array(self.values[added].args[1]) if added is not None else None
            channels = int(value.ty.shape[-1])
            if bias is None or list(bias.shape) != [1, 1, 1, channels] or bias.dtype != np.float32:
                continue
            steps, last = self._activation(added)
            found.append(_Fusion(value, bias, steps, self.values[last]))
        return found

    def _activation(self, var: relax.Var) -> tuple[tuple[tuple[str, float], ...], relax.Var]:
        """The epilogue steps of the activation that takes ``var`` alone (ReLU, a clamp, hardswish, SiLU or
        ``x · sigmoid(x)``), and the variable of its result (``var`` itself where none does)."""
        users = self.users.get(var, [])
        if len(users) == 2:
            found = self._hardswish(var, users)
            return found if found[0] else self._sigmoid_product(var, users)
        user = users[0] if len(users) == 1 else None
        value = self.values.get(user) if user is not None else None
        if _op_name(value) in _UNARY_STEPS:
            return (_UNARY_STEPS[_op_name(value)],), user
        steps: list[tuple[str, float]] = []
        while value is not None and _op_name(value) in ("relax.maximum", "relax.minimum"):
            constant = self._scalar(value.args[1])
            if constant is None or not value.args[0].same_as(var) or len(steps) == 2:
                break
            steps.append((_op_name(value).removeprefix("relax."), constant))
            var = user
            users = self.users.get(var, [])
            user = users[0] if len(users) == 1 else None
            value = self.values.get(user) if user is not None else None
        return tuple(steps), var

    def _hardswish(
        self, var: relax.Var, users: list[relax.Var | None]
    ) -> tuple[tuple[tuple[str, float], ...], relax.Var]:
        """Relax's ``hardswish`` of ``var`` (its two ``users``): ``multiply(x, divide(minimum(maximum(add(x, 3), 0),
        6), 6))``."""
        none: tuple[tuple[tuple[str, float], ...], relax.Var] = ((), var)
        if any(user is None for user in users):
            return none
        shifted = [user for user in users if _op_name(self.values[user]) == "relax.add"]
        product = [user for user in users if _op_name(self.values[user]) == "relax.multiply"]
        if len(shifted) != 1 or len(product) != 1 or self._scalar(self.values[shifted[0]].args[1]) != 3.0:
            return none
        chain = shifted[0]
        for op, constant in (("relax.maximum", 0.0), ("relax.minimum", 6.0), ("relax.divide", 6.0)):
            chain = self._only_user(chain, op)
            if chain is None or self._scalar(self.values[chain].args[1]) != constant:
                return none
        if not any(user.same_as(product[0]) for user in self.users.get(chain, [])):
            return none
        return (("hardswish", 0.0),), product[0]

    def _sigmoid_product(
        self, var: relax.Var, users: list[relax.Var | None]
    ) -> tuple[tuple[tuple[str, float], ...], relax.Var]:
        """SiLU written as ``multiply(x, sigmoid(x))`` of ``var`` (its two ``users``), which legalizes to the
        operations of ``silu``."""
        none: tuple[tuple[tuple[str, float], ...], relax.Var] = ((), var)
        if any(user is None for user in users):
            return none
        gate = [user for user in users if _op_name(self.values[user]) == "relax.sigmoid"]
        product = [user for user in users if _op_name(self.values[user]) == "relax.multiply"]
        if len(gate) != 1 or len(product) != 1:
            return none
        gated = self._only_user(gate[0], "relax.multiply")
        return ((("silu", 0.0),), product[0]) if gated is not None and gated.same_as(product[0]) else none

    def _only_user(self, var: relax.Var, op: str) -> relax.Var | None:
        """The binding variable of ``var``'s one user when that user is ``op`` on ``var`` first (commutative
        ``multiply``: either side), else None."""
        users = self.users.get(var, [])
        if len(users) != 1 or users[0] is None:
            return None
        value = self.values[users[0]]
        if _op_name(value) != op or not (value.args[0].same_as(var) or op == "relax.multiply"):
            return None
        return users[0]

    def _array(self, expr: relax.Expr) -> np.ndarray | None:
        """The values of a constant, or of a permutation of one (the layout conversion's, not yet folded)."""
        while isinstance(expr, relax.Var) and expr in self.values:
            expr = self.values[expr]
        if _op_name(expr) == "relax.permute_dims":
            array = self._array(expr.args[0])
            return None if array is None else np.transpose(array, [int(a) for a in expr.attrs.axes])
        return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None

    def _scalar(self, expr: relax.Expr) -> float | None:
        array = self._array(expr)
        return float(array.reshape(())) if array is not None and array.size == 1 and array.dtype == np.float32 else None

    def _kernel(self, call: relax.Call) -> tvm.tirx.PrimFunc:
        return self.mod[call.args[0]]


#: Relax's one-operator activations and the epilogue step that computes each (`kernels.generic.conv.EPILOGUE_STEPS`).
_UNARY_STEPS = {"relax.nn.relu": ("maximum", 0.0), "relax.nn.silu": ("silu", 0.0)}


def _op_name(value: relax.Expr | None) -> str | None:
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None


@mutator
class _FusedEpilogues(PyExprMutator):
    """Replaces each `_Fusion` chain's last binding by the kernel planned with the chain's bias and activation."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod
        self.fusions: list[_Fusion] = []

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (the functor's method name)
        fusion = next((item for item in self.fusions if item.terminal.same_as(call)), None)
        planned = None
        if fusion is not None:
            planned = _plan_fused(self.mod[fusion.kernel.args[0]].attrs[EPILOGUE_ATTR], fusion.bias, fusion.steps)
        if planned is None:
            return self._one_reshape(super().visit_call_(call))
        func, consts = planned
        gvar = self.builder_.add_func(func, f"{fusion.kernel.args[0].name_hint}_fused")
        x = self.visit_expr(fusion.kernel.args[1][0])
        shape = [int(d) for d in func.params[-1].shape]
        out = self.builder_.emit(relax.call_tir(gvar, [x, *consts], out_ty=relax.TensorType(shape, "float32")))
        return relax.op.reshape(out, [int(d) for d in call.ty.shape])

    def _one_reshape(self, call: relax.Call) -> relax.Expr:
        """A ``reshape`` of a ``reshape`` (a fused kernel's image, then the next kernel's pixel rows) as one: each
        is a call of the VM."""
        if _op_name(call) != "relax.reshape" or not isinstance(call.args[0], relax.Var):
            return call
        inner = self.lookup_binding(call.args[0])
        return relax.op.reshape(inner.args[0], call.args[1]) if _op_name(inner) == "relax.reshape" else call


@tvm.transform.module_pass(opt_level=0, name="Int8ConvCalls")
class Int8ConvCalls:
    """The int8 convolution kernels planned at lowering, called in place of their NHWC ``conv2d`` (module doc);
    run after the layout conversion. Where a kernel can apply its layer's bias ``add`` and the activation after it
    (ReLU, a clamp such as ReLU6, hardswish, SiLU) and nothing else reads the values between, the kernel planned
    with them replaces the chain. The kernels' tags are removed; kernels left unused are dropped."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Int8ConvCalls(mod)
        if not rewriter.kernels:
            return mod
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        mod = rewriter.builder_.get()
        fuser = _FusedEpilogues(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                fuser.fusions = _Chains(mod, func).fusions()
                fuser.builder_.update_func(gvar, fuser.visit_expr(func))
        for gvar, func in fuser.builder_.get().functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs and WEIGHT_ATTR in func.attrs:
                tags = (WEIGHT_ATTR, CONSTS_ATTR, EPILOGUE_ATTR)
                fuser.builder_.update_func(gvar, functools.reduce(lambda f, tag: f.without_attr(tag), tags, func))
        return relax.transform.DeadCodeElimination()(fuser.builder_.get())


__all__ = ["CONV_PACKED_A8_NAME", "CONV_PACKED_NAME", "Int8ConvCalls", "PackedConvConverter"]
