"""Vectorizable legalizations of the transcendental operators (exp, erf, tanh, sigmoid).

Relax legalizes ``exp``/``erf``/``tanh`` to LLVM intrinsics that the x86 and ARM
backends turn into one libm call per element: softmax, GELU and SiLU then dominate a
transformer's run time (a 256×1536 GELU costs more than the matmul before it). TOPI's
``fast_exp``/``fast_erf``/``fast_tanh`` are branch-free polynomials that vectorize;
their error is a few float32 ulps (checked against torch in the tests), far below the
error of any quantized layer around them.

`legalize_map` is handed to ``relax.transform.LegalizeOps`` before TVM's default
legalization, so only these operators change. `silu_of` is the same SiLU on one value, for a
kernel's output stage that applies it in place of the operator.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, te, tirx, topi
from tvm.ir.prim.expr import BinaryOpExpr

Legalizer = Callable[[relax.BlockBuilder, relax.Call], relax.Expr]


def _softmax(x: te.Tensor, axis: int) -> te.Tensor:
    axis = axis % len(x.shape)
    reduce_axes = [axis]
    peak = topi.max(x, axis=reduce_axes, keepdims=True)
    exp = topi.fast_exp(topi.subtract(x, peak))
    inverse = topi.divide(tirx.const(1.0, x.dtype), topi.sum(exp, axis=reduce_axes, keepdims=True))
    return topi.multiply(exp, inverse)  # one division per row


def _sigmoid(x: te.Tensor) -> te.Tensor:
    one = tirx.const(1.0, x.dtype)
    return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))


def _silu(x: te.Tensor) -> te.Tensor:
    """``x · sigmoid(x)`` with the fast sigmoid."""
    return topi.multiply(x, _sigmoid(x))


def silu_of(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """The float32 SiLU of one ``value`` with the operations of the ``relax.nn.silu`` legalization (`_silu`): its
    stages' expressions inlined into one, ``value`` bound once."""
    source, var = te.placeholder((), "float32", name="x"), tirx.Var("x", "float32")
    return tirx.Let(var, value, _inlined(_silu(source)(), source, var))


def _inlined(expr: tirx.PrimExpr, source: te.Tensor, value: tirx.PrimExpr) -> tirx.PrimExpr:
    """``expr`` with each read of a scalar stage replaced by that stage's expression, down to ``source``, which
    reads ``value``: the nodes of TOPI's elementwise float32 operators (arithmetic, casts, intrinsic calls)."""
    if isinstance(expr, (tirx.FloatImm, tirx.IntImm)):
        return expr
    if isinstance(expr, BinaryOpExpr):
        return type(expr)(_inlined(expr.a, source, value), _inlined(expr.b, source, value))
    if isinstance(expr, tirx.Cast):
        return tirx.Cast(expr.ty, _inlined(expr.value, source, value))
    if isinstance(expr, tvm.ir.expr.Call) and expr.op.name == "te.tensor_load":
        tensor = expr.args[0]
        return value if tensor.same_as(source) else _inlined(tensor.op.body[tensor.value_index], source, value)
    if isinstance(expr, tvm.ir.expr.Call):
        args = [_inlined(arg, source, value) for arg in expr.args]
        return tvm.ir.expr.Call(expr.op, args, expr.attrs, expr.ty_args, ret_ty=expr.ty)
    raise TypeError(f"no inlining of a {type(expr).__name__} node")


def _gelu(x: te.Tensor) -> te.Tensor:
    half = tirx.const(0.5, x.dtype)
    return x * (half + topi.fast_erf(x * tirx.const(0.5**0.5, x.dtype)) * half)


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    inner = tirx.const((2.0 / 3.141592653589793) ** 0.5, x.dtype) * (x + tirx.const(0.044715, x.dtype) * x * x * x)
    return tirx.const(0.5, x.dtype) * x * (tirx.const(1.0, x.dtype) + topi.fast_tanh(inner))


def _float32_only(te_func: Callable[..., te.Tensor], name: str, *attrs: str) -> Legalizer:
    """A legalizer that uses ``te_func`` on float32 inputs and TVM's default otherwise (returns None)."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if call.args[0].ty.dtype != "float32":
            return call  # LegalizeOps then applies its default rule
        return bb.call_te(te_func, call.args[0], *(getattr(call.attrs, a) for a in attrs), primfunc_name_hint=name)

    return legalize


def legalize_map() -> dict[str, Legalizer]:
    """Relax operator name → fast legalization (float32 only)."""
    return {
        "relax.exp": _float32_only(topi.fast_exp, "fast_exp"),
        "relax.tanh": _float32_only(topi.fast_tanh, "fast_tanh"),
        "relax.erf": _float32_only(topi.fast_erf, "fast_erf"),
        "relax.sigmoid": _float32_only(_sigmoid, "fast_sigmoid"),
        "relax.nn.silu": _float32_only(_silu, "fast_silu"),
        "relax.nn.gelu": _float32_only(_gelu, "fast_gelu"),
        "relax.nn.gelu_tanh": _float32_only(_gelu_tanh, "fast_gelu_tanh"),
        "relax.nn.softmax": _float32_only(_softmax, "fast_softmax", "axis"),
    }


__all__ = ["legalize_map", "silu_of"]
