"""Channels-last convolutions: the Relax module's conv2d layers in NHWC with HWIO weights, before legalization.

torch hands convolutions over in NCHW, where the output channels, the axis a CPU schedule vectorizes, are the
outermost and the reduction over input channels is strided. Relax's ``ConvertLayout`` rewrites every conv2d to
NHWC data and HWIO weights and carries the layout through the operators that can follow it (batch norm,
elementwise, pooling, means, concat), so permutations remain only at the graph's boundaries and before operators
that cannot (flatten, reshape); `ClipAsMinMax` first rewrites ``clip`` (hardswish), which it cannot carry.
`SinkPermutations` cancels the permutations torch code writes itself around NHWC blocks (ConvNeXt),
`FoldConstantLayouts` applies the weights' permutations at compile time, and `packed_conv2d` legalizes the
convolutions with their weights in blocks of the schedule's register tile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from lowbit.backends.tvm.fastmath import Legalizer
from lowbit.backends.tvm.kernels.generic.common import power_of_two_divisor
from lowbit.backends.tvm.schedule import conv_tile

log = logging.getLogger(__name__)

#: The layouts ``ConvertLayout`` gives conv2d: data, then weight (output channels innermost: one vector of them).
CONV2D_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


@mutator
class _ConstantLayoutFolder(PyExprMutator):
    """Replaces ``permute_dims`` and ``reshape`` of a constant by the constant they compute, and passes conv2d
    its constant weight directly (not through a variable), as `packed_conv2d` needs it."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (the functor's method name)
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d":
            weight = self._constant(call.args[1])  # the constant itself as the argument, for `packed_conv2d`
            if weight is not None:
                return relax.Call(call.op, [call.args[0], relax.const(weight)], call.attrs)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name not in ("relax.permute_dims", "relax.reshape"):
            return call
        value = self._constant(call.args[0])
        if value is None or not isinstance(call.ty, relax.TensorType):
            return call
        if call.op.name == "relax.permute_dims":
            axes = call.attrs.axes
            folded = np.transpose(value, None if axes is None else [int(a) for a in axes])
        else:
            shape = call.ty.shape
            if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
                return call
            folded = value.reshape([int(d) for d in shape])
        return relax.const(np.ascontiguousarray(folded), value.dtype.name)

    def _constant(self, expr: relax.Expr) -> np.ndarray | None:
        if isinstance(expr, relax.Var):
            expr = self.lookup_binding(expr)
        return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


@mutator
class _ClipAsMinMax(PyExprMutator):
    """Rewrites ``clip(x, lo, hi)`` (hardswish, hardsigmoid, ReLU6) as ``minimum(maximum(x, lo), hi)``."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (the functor's method name)
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.clip":
            return call
        bounds = [getattr(bound.value, "value", bound.value) for bound in call.args[1:]]
        if not all(isinstance(bound, int | float) for bound in bounds):
            return call
        (low, high), x = bounds, call.args[0]
        dtype = x.ty.dtype
        return relax.op.minimum(relax.op.maximum(x, relax.const(low, dtype)), relax.const(high, dtype))


@tvm.transform.module_pass(opt_level=0, name="ClipAsMinMax")
class ClipAsMinMax:
    """``clip`` as ``maximum`` then ``minimum``, which ``ConvertLayout`` carries through (it has no layout rule
    for ``clip``, so a hardswish between two convolutions would cost two permutations)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return _rewrite_functions(mod, _ClipAsMinMax(mod))


#: Elementwise binary operators a permutation moves through.
_ELEMENTWISE = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


@mutator
class _PermutationSinker(PyExprMutator):
    """Moves ``permute_dims`` after elementwise operators and cancels a permutation followed by its inverse."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        #: ``(x, axes) → y`` for each binding ``y = permute_dims(x, axes)`` of the input functions.
        self.permuted: dict[tuple[relax.Expr, tuple[int, ...]], relax.Var] = {}
        for func in mod.functions.values():
            if isinstance(func, relax.Function):
                for var, value in relax.analysis.get_var2val(func).items():
                    if (found := _permutation_of(value)) is not None:
                        self.permuted[(found[0], tuple(found[1]))] = var

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (the functor's method name)
        call = super().visit_call_(call)
        name = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
        if name == "relax.permute_dims" and call.attrs.axes is not None:
            return self._compose(call.args[0], [int(a) for a in call.attrs.axes])
        if name in _ELEMENTWISE and isinstance(call.ty, relax.TensorType):
            return self._sink(call)
        return call

    def _permutation(self, expr: relax.Expr) -> tuple[relax.Expr, list[int]] | None:
        return _permutation_of(self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr)

    def _compose(self, x: relax.Expr, axes: list[int]) -> relax.Expr:
        inner = self._permutation(x)
        if inner is not None:
            x, axes = inner[0], [inner[1][a] for a in axes]
        return x if axes == sorted(axes) else relax.op.permute_dims(x, axes)

    def _sink(self, call: relax.Call) -> relax.Expr:
        """``op(permute(a, p), permute(b, p) or constant)`` → ``permute(op(a, b or constant'), p)``; an operand
        ``b`` that is also permuted by ``p``'s inverse elsewhere is read in that order."""
        permuted = [self._permutation(arg) for arg in call.args]
        axes = next((found[1] for found in permuted if found is not None), None)
        rank = len(call.ty.shape) if call.ty.shape is not None else -1
        if axes is None or len(axes) != rank:
            return call
        inverse = [axes.index(i) for i in range(rank)]
        args = []
        for arg, found in zip(call.args, permuted):
            value = self.lookup_binding(arg) if isinstance(arg, relax.Var) else arg
            if found is not None and found[1] == axes:
                args.append(found[0])
            elif (arg, tuple(inverse)) in self.permuted:  # a value also used permuted (a block's residual input)
                args.append(self.permuted[(arg, tuple(inverse))])
            elif isinstance(value, tvm.ir.expr.Constant):
                array = value.value.numpy()
                array = array.reshape((1,) * (rank - array.ndim) + array.shape).transpose(inverse)
                args.append(relax.const(np.ascontiguousarray(array)))
            else:
                return call
        return relax.op.permute_dims(relax.Call(call.op, args, call.attrs), axes)


def _permutation_of(value: relax.Expr | None) -> tuple[relax.Expr, list[int]] | None:
    """``(x, axes)`` if ``value`` is ``permute_dims(x, axes)`` with explicit axes."""
    if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.permute_dims") and value.attrs.axes:
        return value.args[0], [int(a) for a in value.attrs.axes]
    return None


@tvm.transform.module_pass(opt_level=0, name="SinkPermutations")
class SinkPermutations:
    """Cancel the permutations that torch code writes around channels-last blocks (ConvNeXt permutes to NHWC
    for its layer norm and linears, back to NCHW for the residual add), once the convolutions are NHWC too:
    a permutation moves past elementwise operators (constants permuted at compile time) until it meets its
    inverse, and both go."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return relax.transform.DeadCodeElimination()(_rewrite_functions(mod, _PermutationSinker(mod)))


@tvm.transform.module_pass(opt_level=0, name="FoldConstantLayouts")
class FoldConstantLayouts:
    """Evaluate ``permute_dims`` and ``reshape`` of constants (the converted weights) at compile time, with NumPy.

    Relax's ``FoldConstant`` does the same by building and running a kernel per call, which for a vision model's
    few hundred weights costs more than the rest of the compilation.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return relax.transform.DeadCodeElimination()(_rewrite_functions(mod, _ConstantLayoutFolder(mod)))


def _rewrite_functions(mod: tvm.IRModule, rewriter: PyExprMutator) -> tvm.IRModule:
    """``mod`` with each Relax function rewritten by ``rewriter``."""
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def pointwise_convolution(
    bb: relax.BlockBuilder, x: relax.Expr, weight: torch.Tensor, bias: torch.Tensor | None
) -> relax.Expr:
    """``x · weightᵀ + bias`` over the last axis of a 4-D ``x`` as a 1x1 NHWC convolution (HWIO weight).

    A linear layer on a channels-last image (ConvNeXt's pointwise layers) is then tiled over pixels × output
    channels like every other convolution, instead of running as a matmul of the flattened rows.
    """
    kernel = weight.detach().to(torch.float32).t().contiguous().reshape(1, 1, *weight.shape[::-1])
    y = bb.emit(relax.op.nn.conv2d(x, relax.const(kernel.numpy()), data_layout="NHWC", kernel_layout="HWIO"))
    if bias is None:
        return y
    return bb.emit(relax.op.add(y, relax.const(bias.detach().to(torch.float32).numpy())))


def pointwise_rows(
    bb: relax.BlockBuilder, x: relax.Expr, weight: torch.Tensor, bias: torch.Tensor | None
) -> relax.Expr:
    """``x · weightᵀ + bias`` for a 2-D ``x`` of static rows (tokens) as `pointwise_convolution` over one image row
    of them: the rows get the convolution's register tile (output columns × channel vectors) and its packed,
    prefetched weight blocks."""
    rows, columns = (int(d) for d in x.ty.shape)
    image = bb.emit(relax.op.reshape(x, (1, 1, rows, columns)))
    y = pointwise_convolution(bb, image, weight, bias)
    return relax.op.reshape(y, (rows, int(weight.shape[0])))


def packed_conv2d(lanes: int, registers: int) -> Legalizer:
    """The legalization of an NHWC conv2d with a constant fp32 HWIO weight, the weight packed at compile time.

    The weight is stored in blocks of as many output channels as the `schedule.Convolution` register tile
    holds, ``(O / V, KH, KW, I, V)``, so that a task streams one contiguous block instead of reading ``V``
    channels out of every row of ``O`` (a stride of a page or more for wide layers). Other conv2d calls get
    TVM's default legalization.
    """

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        attrs, (x, weight) = call.attrs, call.args
        layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
        if layouts != ("NHWC", "HWIO", "NHWC") or not isinstance(weight, tvm.ir.expr.Constant):
            return call
        if {str(x.ty.dtype), str(weight.ty.dtype), str(call.ty.dtype)} != {"float32"} or not _static(call.ty.shape):
            return call
        kernel = weight.value.numpy()
        height, width, inputs, outputs = kernel.shape
        simd = power_of_two_divisor(outputs, lanes)
        block = simd * conv_tile(int(call.ty.shape[2]), outputs // simd, registers)[1]
        packed = kernel.reshape(height, width, inputs, outputs // block, block).transpose(3, 0, 1, 2, 4)
        options = [[int(v) for v in values] for values in (attrs.strides, attrs.padding, attrs.dilation)]
        return bb.call_te(
            _blocked_conv2d,
            x,
            relax.const(np.ascontiguousarray(packed)),
            *options,
            int(attrs.groups),
            primfunc_name_hint="conv2d",
        )

    return legalize


def _blocked_conv2d(
    x: te.Tensor, w: te.Tensor, strides: list[int], padding: list[int], dilation: list[int], groups: int
) -> te.Tensor:
    """NHWC conv2d with a weight packed as ``(O / V, KH, KW, I / groups, V)``; ``padding`` is (top, left,
    bottom, right)."""
    batch, height, width, _ = (int(d) for d in x.shape)
    blocks, kernel_h, kernel_w, per_group, block = (int(d) for d in w.shape)
    top, left, bottom, right = padding
    data = topi.nn.pad(x, [0, top, left, 0], [0, bottom, right, 0], name="pad_temp") if any(padding) else x
    out_h = (height + top + bottom - dilation[0] * (kernel_h - 1) - 1) // strides[0] + 1
    out_w = (width + left + right - dilation[1] * (kernel_w - 1) - 1) // strides[1] + 1
    out_per_group = blocks * block // groups
    rh, rw = te.reduce_axis((0, kernel_h), name="rh"), te.reduce_axis((0, kernel_w), name="rw")
    rc = te.reduce_axis((0, per_group), name="rc")

    def channel(o: tirx.PrimExpr) -> tirx.PrimExpr:
        return rc if groups == 1 else o // out_per_group * per_group + rc

    return te.compute(
        (batch, out_h, out_w, blocks * block),
        lambda n, i, j, o: te.sum(
            data[n, i * strides[0] + rh * dilation[0], j * strides[1] + rw * dilation[1], channel(o)]
            * w[o // block, rh, rw, rc, o % block],
            axis=[rh, rw, rc],
        ),
        name="conv2d_nhwc",
    )


def _static(shape: Any) -> bool:
    return shape is not None and all(isinstance(d, tvm.tirx.IntImm) for d in shape)


@tvm.transform.module_pass(opt_level=0, name="ChannelsLast")
class ChannelsLast:
    """A module with conv2d layers: `ClipAsMinMax`, ``ConvertLayout``, `SinkPermutations`, `FoldConstantLayouts`.

    A module without one is left as it is (``ConvertLayout`` fails on some graphs it has nothing to do in, such as
    recurrent layers); where ``ConvertLayout`` fails on a module with convolutions, they stay NCHW (correct, slower)
    and a warning says so. ``converted`` run right after ``ConvertLayout``, while each weight is still a
    permutation of its constant.
    """

    def __init__(self, converted: Sequence[tvm.transform.Pass] = ()) -> None:
        self.converted = list(converted)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not _has_conv2d(mod):
            return mod
        try:
            converted = relax.transform.ConvertLayout(CONV2D_LAYOUTS)(ClipAsMinMax()(mod))
        except Exception as error:  # an upstream pass on arbitrary graphs: any failure keeps NCHW
            log.warning("convolutions stay NCHW: Relax's ConvertLayout failed (%s)", str(error).splitlines()[0])
            return mod
        for rewrite in self.converted:
            converted = rewrite(converted)
        return FoldConstantLayouts()(SinkPermutations()(converted))


def _has_conv2d(mod: tvm.IRModule) -> bool:
    conv2d, found = tvm.ir.Op.get("relax.nn.conv2d"), []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: found.append(e) if isinstance(e, relax.Call) and e.op == conv2d else None
            )
    return bool(found)


def channels_last(converted: Sequence[tvm.transform.Pass] = ()) -> list[tvm.transform.Pass]:
    """The passes that turn a module's conv2d layers channels-last, the weights permuted at compile time
    (``converted``: `ChannelsLast`)."""
    return [ChannelsLast(converted)]


__all__ = [
    "CONV2D_LAYOUTS",
    "ChannelsLast",
    "ClipAsMinMax",
    "FoldConstantLayouts",
    "SinkPermutations",
    "channels_last",
    "packed_conv2d",
    "pointwise_convolution",
    "pointwise_rows",
]
