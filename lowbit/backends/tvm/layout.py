"""Channels-last convolutions: the Relax module's conv2d layers in NHWC with HWIO weights, before legalization.

torch hands convolutions over in NCHW, where the output channels, the axis a CPU schedule vectorizes, are the
outermost and the reduction over input channels is strided. Relax's ``ConvertLayout`` rewrites every conv2d to
NHWC data and HWIO weights and carries the layout through the operators that can follow it (batch norm,
elementwise, pooling, means, concat), so permutations remain only at the graph's boundaries and before operators
that cannot (flatten, reshape); `ClipAsMinMax` first rewrites ``clip`` (hardswish), which it cannot carry.
`FoldConstantLayouts` then applies the weights' permutations at compile time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

#: The layouts ``ConvertLayout`` gives conv2d: data, then weight (output channels innermost: one vector of them).
CONV2D_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


@mutator
class _ConstantLayoutFolder(PyExprMutator):
    """Replaces ``permute_dims`` and ``reshape`` of a constant by the constant they compute."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (the functor's method name)
        call = super().visit_call_(call)
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


def channels_last(converted: Sequence[tvm.transform.Pass] = ()) -> list[tvm.transform.Pass]:
    """The passes that turn a module's conv2d layers channels-last, the weights permuted at compile time;
    ``converted`` run right after the conversion, while each weight is still a permutation of its constant."""
    return [ClipAsMinMax(), relax.transform.ConvertLayout(CONV2D_LAYOUTS), *converted, FoldConstantLayouts()]


__all__ = ["CONV2D_LAYOUTS", "ClipAsMinMax", "FoldConstantLayouts", "channels_last"]
