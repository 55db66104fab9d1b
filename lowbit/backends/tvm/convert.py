"""Lowering: a lowbit GraphModule → a `Lowering` (a Relax module and how each low-bit linear was lowered).

Ordinary operators go through `frontend.import_graph`; a packed table lookup (``embedding_packed``) becomes a
``call_tir`` of the gather-dequantize kernel (`PackedEmbeddingConverter`). Each ``torch.ops.lowbit.linear_packed`` /
``linear_packed_a8`` call becomes a ``relax.call_tir`` of the first kernel of the toolchain's ordered list that
supports the layer (`kernels.spec.LinearKernel`), its packed weight, scales, zero points and bias passed as Relax
constants. An act-order ``g_idx`` of whole groups and a partial last group are first rewritten to contiguous whole
groups (`contiguous_groups`). A layer no kernel takes (3-bit codes, uneven groups, a shape a kernel does not tile)
runs on the toolchain's fallback, a dequantized fp32 weight, and is listed in `Lowering.fallbacks` with the reason
the last kernel gave and the nearest setting a kernel takes; `lowering.lower` announces each one (a warning)
before anything is built, or with ``strict`` refuses them (`UnsupportedLayerError`). The module is specialized to
the example inputs' shapes, except symbolic dimensions (``compile(..., dynamic_shapes=...)``): a layer over a
symbolic row count runs a kernel that takes any number of rows (`kernels.spec.LinearKernel.tail_rows`), or one that
takes whole blocks of `ROW_BLOCK` rows, on its input padded to them.
Packed convolutions are lowered by `convert_conv` (int8 ones to the int8
kernels of the toolchain where one takes them, others to an fp32 convolution on the dequantized weight, recorded as
a fallback).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import tvm
from torch import fx
from torch.fx.operator_schemas import normalize_function
from tvm import relax
from tvm.target import Target

from lowbit.backends.tvm.frontend import InputSpec
from lowbit.backends.tvm.kernels.generic import rows as rows_module
from lowbit.backends.tvm.kernels.generic.common import divisor_at_most
from lowbit.backends.tvm.kernels.generic.embedding import embedding_func
from lowbit.backends.tvm.kernels.spec import (
    KernelPlan,
    LinearKernel,
    PackedLinearSpec,
    Tensors,
)
from lowbit.errors import BackendError, LowbitError, UnsupportedLayerError
from lowbit.ir import ops, ops_a8, ops_embedding, packing
from lowbit.ir.annotations import packed_layer
from lowbit.ir.graph import get_attr_tensor

if TYPE_CHECKING:
    from lowbit.backends.tvm.toolchains import Toolchain

log = logging.getLogger(__name__)

#: How the frontend names ``torch.ops.lowbit.linear_packed.default`` (``OpOverload.__name__``).
LINEAR_PACKED_NAME = ops.linear_packed.__name__
#: ... and ``torch.ops.lowbit.linear_packed_a8.default`` (int8 activations).
LINEAR_PACKED_A8_NAME = ops_a8.linear_packed_a8.__name__
#: ... and ``torch.ops.lowbit.embedding_packed.default`` (a packed table lookup).
EMBEDDING_PACKED_NAME = ops_embedding.embedding_packed.__name__
#: The packed linear ops, whose layers `lower` counts for its progress bar.
PACKED_LINEARS = (ops.linear_packed, ops_a8.linear_packed_a8)
#: `LoweredLinear.kernel` of a layer on the toolchain's fallback.
FALLBACK = "dense"
#: Rows of one block of a symbolic row count: a layer's input is padded to whole blocks for kernels that take any
#: number of them (`kernels.spec.LinearKernel.symbolic_rows`); the int8 GEMM takes 16 rows and more.
ROW_BLOCK = 16
#: A static row count with no divisor of at least `MIN_ROW_TILE` up to `ROW_TILE_MULTIPLE` (197 tokens: prime) is
#: padded to a multiple of `ROW_TILE_MULTIPLE`: the kernels' register tiles take rows by a divisor of the count, and
#: one row per tile ran ViT-S's int8 GEMMs at a third of the ``vpdpbusd`` peak.
ROW_TILE_MULTIPLE, MIN_ROW_TILE = 8, 4
#: Code widths and group sizes tried, nearest first, for the setting to suggest instead of a fallback.
_BITS = (2, 4, 8)
_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class LoweredLinear:
    """How one ``linear_packed``/``linear_packed_a8`` call was lowered: ``kernel`` is the name of the kernel that
    runs it (``"packed_gemm"``, ``"a8_linear_x86"``, ``"cuda_linear"``, ...), or ``"dense"`` with the ``reason``."""

    node: str
    spec: PackedLinearSpec
    kernel: str
    reason: str | None = None
    #: A fallback layer: the nearest setting a kernel takes (``"bits=4"``), if one differs in a single option.
    nearest: str | None = None
    #: The module path of the layer the packed weight belongs to (``"encoder.fc1"``), where known.
    layer: str | None = None

    def describe(self) -> str:
        """``"layer (node): reason"``, with the nearest supported setting where there is one."""
        nearest = f"; nearest supported setting: {self.nearest}" if self.nearest else ""
        where = f"{self.layer} ({self.node})" if self.layer else self.node
        return f"{where}: {self.reason}{nearest}"


def fallbacks(linears: Sequence[LoweredLinear]) -> list[LoweredLinear]:
    """The layers of ``linears`` that run on the fallback (a dequantized fp32 weight), with the reason."""
    return [linear for linear in linears if linear.kernel == FALLBACK]


@dataclass
class Lowering:
    """A Relax module for a graph, with the record of how its low-bit linears were lowered."""

    mod: tvm.IRModule
    target: Target
    inputs: list[InputSpec]
    linears: list[LoweredLinear] = field(default_factory=list)
    #: The symbolic dimensions of the inputs by name (`lowbit.ir.shapes.SymbolicDim`).
    dims: dict[str, Any] = field(default_factory=dict)

    @property
    def fallbacks(self) -> list[LoweredLinear]:
        """Low-bit layers that run as dequantized fp32 dense kernels, with the reason."""
        return fallbacks(self.linears)


def announce_fallbacks(linears: Sequence[LoweredLinear], toolchain: str, strict: bool = False) -> None:
    """Warn about each layer on the fallback, or raise `UnsupportedLayerError` naming them all when ``strict``."""
    if strict and linears:
        layers = "\n".join(f"  {linear.describe()}" for linear in linears)
        raise UnsupportedLayerError(
            f"strict=True: no kernel of {toolchain} takes {len(linears)} low-bit layer(s), which would run as "
            f"dequantized fp32:\n{layers}\nquantize them with a supported setting, or compile with strict=False"
        )
    for linear in linears:
        log.warning("a low-bit layer runs on the dequantized fp32 fallback: %s", linear.describe())


class PackedLinearConverter:
    """``custom_convert_map`` entry: ``linear_packed``/``linear_packed_a8`` node → ``call_tir`` of a kernel.

    The kernel is the first of ``toolchain.kernels(spec)`` that supports the layer; without one, the
    toolchain's fallback runs and the last kernel's reason is recorded.
    """

    def __init__(
        self, gm: fx.GraphModule, toolchain: Toolchain, tuner: Any = None, done: Callable[[], Any] = lambda: None
    ) -> None:
        self.gm = gm
        self.toolchain = toolchain
        self.tuner = tuner
        self.done = done  # called after each layer (a progress bar's update)
        self.linears: list[LoweredLinear] = []

    def __call__(self, node: fx.Node, importer: Any) -> relax.Expr:
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        x = importer.env[call["x"]]
        if x.ty.dtype != "float32":
            raise BackendError(f"node '{node.name}': the TVM kernels take float32 activations, got {x.ty.dtype}")
        a8 = node.target is ops_a8.linear_packed_a8
        names = ("qweight", "scales", "zeros", "g_idx", "bias") + (("act_scale",) if a8 else ())
        tensors = {name: self._tensor(node, call.get(name)) for name in names}
        symbolic = not static_shape(x)
        given = None if symbolic else math.prod([int(d) for d in x.ty.shape][:-1])
        rows = ROW_BLOCK if given is None else tiled_rows(given)
        spec, tensors, order = contiguous_groups(layer_spec(call, rows, tensors, a8, symbolic), tensors, node.name)
        bb = importer.block_builder
        layer = packed_layer(node, call["qweight"]) or None
        kernel, planned, reason = self._plan(spec, tensors)
        # Only a kernel that takes whole blocks of rows needs them padded; the fallback takes any row count.
        blocks = spec.row_blocks and kernel is not None and not kernel.tail_rows
        out = emit_on_rows(
            bb,
            x,
            spec.out_features,
            lambda x2d, _: self._call(
                bb,
                node.name,
                layer,
                grouped_columns(bb, x2d, order, spec.in_features),
                spec,
                tensors,
                (planned, reason, blocks),
            ),
            ROW_BLOCK if blocks else ROW_TILE_MULTIPLE if given is not None and rows != given else 1,
        )
        self.done()
        return out

    def _call(
        self,
        bb: relax.BlockBuilder,
        name: str,
        layer: str | None,
        x: relax.Expr,
        spec: PackedLinearSpec,
        tensors: Tensors,
        chosen: tuple[KernelPlan | None, str | None, bool],
    ) -> relax.Expr:
        """The layer's kernel on the 2-D input ``x``, or the fallback with the reason recorded (``chosen``: the plan
        or the reason there is none, and whether the kernel takes a count of row blocks)."""
        planned, reason, blocks = chosen
        if planned is not None:
            self.linears.append(LoweredLinear(name, spec, planned.name, layer=layer))
            counts = [x.ty.shape[0] // spec.batch] if blocks else []
            return call_kernel(bb, planned.func, f"lowbit_{planned.name}", x, planned.consts, spec.out_features, counts)
        self.linears.append(LoweredLinear(name, spec, FALLBACK, reason, self._nearest(spec, tensors), layer))
        return self.toolchain.fallback(bb, x, spec, tensors)

    def _nearest(self, spec: PackedLinearSpec, tensors: Tensors) -> str | None:
        """The first of `_alternatives` that a kernel of the toolchain supports, as ``"option=value"``."""
        target = self.toolchain.target
        for setting, other in _alternatives(spec):
            if any(kernel.supports(other, tensors, target) is None for kernel in self.toolchain.kernels(other)):
                return setting
        return None

    def _plan(
        self, spec: PackedLinearSpec, tensors: Tensors
    ) -> tuple[LinearKernel | None, KernelPlan | None, str | None]:
        """The first kernel that supports the layer and its plan, else None, None and the last kernel's reason."""
        kernels = self.toolchain.kernels(spec)
        reason = f"{self.toolchain.name} has no kernel for {_activations(spec)}"
        for kernel in kernels:
            reason = kernel.supports(spec, tensors, self.toolchain.target)
            if reason is None and spec.row_blocks and not kernel.symbolic_rows:
                reason = f"kernel '{kernel.name}' takes a static row count (the input has symbolic dimensions)"
            if reason is None:
                tuner = None if spec.row_blocks else self.tuner  # tuning measures one row count
                return kernel, tuned_plan(kernel, spec, tensors, self.toolchain.target, tuner), None
            log.debug("%s declined %s: %s", kernel.name, spec, reason)
        return None, None, reason

    def _tensor(self, node: fx.Node, arg: Any) -> torch.Tensor | None:
        return packed_constant(self.gm, node, arg)


class PackedEmbeddingConverter:
    """``custom_convert_map`` entry: ``embedding_packed`` node → ``call_tir`` of the gather-dequantize kernel on the
    ids flattened to one row, its table passed as Relax constants; the ids' shape is restored around the result."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def __call__(self, node: fx.Node, importer: Any) -> relax.Expr:
        call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        ids = importer.env[call["ids"]]
        tables = [packed_constant(self.gm, node, call.get(name)) for name in ("qweight", "scales", "zeros")]
        shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in ids.ty.shape]
        count, dim = math.prod(shape), call["embedding_dim"]
        func = embedding_func(
            count if static_shape(ids) else tvm.te.var("count", "int64"),
            tables[0].shape[0],
            dim,
            call["bits"],
            call["group_size"],
            tables[2] is not None,
            ids.ty.dtype,
        )
        bb = importer.block_builder
        flat = bb.emit(relax.op.reshape(ids, (count,))) if len(shape) != 1 else ids
        consts = [relax.const(t.cpu().contiguous().numpy()) for t in tables if t is not None]
        out = bb.emit(
            relax.call_tir(
                bb.add_func(func, "lowbit_embedding"), [flat, *consts], out_ty=relax.TensorType((count, dim), "float32")
            )
        )
        return bb.emit(relax.op.reshape(out, (*shape, dim))) if len(shape) != 1 else out


def packed_constant(gm: fx.GraphModule, node: fx.Node, arg: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` argument of a packed op names (None stays None)."""
    if arg is None:
        return None
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        raise BackendError(f"node '{node.name}': packed weights must be graph constants (get_attr), got {arg!r}")
    try:
        value = get_attr_tensor(gm, arg)
    except LowbitError as error:
        raise BackendError(f"node '{node.name}': {error}") from error
    if value.dtype not in (torch.float32, torch.uint8, torch.int32):
        raise BackendError(f"'{arg.target}' has dtype {value.dtype}; the packed format stores uint8/int32/float32")
    return value.detach()


def _alternatives(spec: PackedLinearSpec) -> list[tuple[str, PackedLinearSpec]]:
    """Settings that differ from ``spec`` in one option, nearest first: contiguous groups, the closest code width
    (the wider one on a tie), the closest group size that divides the input."""
    options = [("contiguous groups (no act-order g_idx)", dataclasses.replace(spec, has_g_idx=False))]
    options = options if spec.has_g_idx else []
    for bits in sorted((b for b in _BITS if b != spec.bits), key=lambda b: (abs(b - spec.bits), -b)):
        options.append((f"bits={bits}", dataclasses.replace(spec, bits=bits)))
    groups = [g for g in _GROUP_SIZES if g != spec.group_size and spec.in_features % g == 0]
    for group in sorted(groups, key=lambda g: (abs(g - spec.group_size), -g)):
        options.append((f"group_size={group}", dataclasses.replace(spec, group_size=group)))
    return options


def _activations(spec: PackedLinearSpec) -> str:
    return "float activations" if spec.act_bits is None else f"int{spec.act_bits} activations"


def tuned_plan(
    kernel: LinearKernel, spec: PackedLinearSpec, tensors: Tensors, target: Target, tuner: Any
) -> KernelPlan:
    """``kernel``'s plan for a supported layer with the tuner's knobs (the hand schedule without a tuner or a
    record)."""
    planned = kernel.plan(spec, tensors, target)
    if tuner is None:
        return planned
    knobs = tuner.knobs(kernel, spec, tensors)
    if knobs is None or knobs == planned.knobs:
        return planned
    return kernel.plan(spec, tensors, target, knobs=knobs)


def contiguous_groups(
    spec: PackedLinearSpec, tensors: Tensors, name: str
) -> tuple[PackedLinearSpec, dict[str, torch.Tensor | None], torch.Tensor | None]:
    """The layer rewritten so that its groups are whole and contiguous, as the packed kernels need them, and the
    order to take the input's columns in (None: as they are).

    ``y = Σ_k x_k · w_k`` does not depend on the order of ``k``: an act-order ``g_idx``
    whose groups each hold ``group_size`` columns (the last one possibly fewer) becomes
    contiguous groups by sorting the weight's columns by group, and the input's alike. A
    partial last group is padded to a whole one with zero codes; the input gets as many
    zero columns (``spec.in_features`` grows), which add nothing to any sum.
    """
    tensors = dict(tensors)
    k_in, group = spec.in_features, spec.group_size
    padded = spec.groups * group
    order = None
    if spec.has_g_idx:
        g_idx = tensors["g_idx"].to(torch.int64)
        counts = torch.bincount(g_idx, minlength=spec.groups)
        if len(counts) != spec.groups or bool((counts[:-1] != group).any()) or int(counts[-1]) != k_in - padded + group:
            return spec, tensors, None  # groups of other sizes: the fallback says why
        order = torch.sort(g_idx, stable=True).indices
    elif padded == k_in:
        return spec, tensors, None
    codes = packing.unpack(tensors["qweight"], spec.bits, k_in)
    codes = torch.nn.functional.pad(codes if order is None else codes[:, order], (0, padded - k_in))
    tensors = {**tensors, "qweight": packing.pack(codes.contiguous(), spec.bits), "g_idx": None}
    log.info(
        "node '%s': %d input columns %s into %d whole groups of %d",
        name,
        k_in,
        "sorted by group" if order is not None else "padded",
        spec.groups,
        group,
    )
    return dataclasses.replace(spec, in_features=padded, has_g_idx=False), tensors, order


def grouped_columns(bb: relax.BlockBuilder, x: relax.Expr, order: torch.Tensor | None, padded: int) -> relax.Expr:
    """The 2-D input of a layer rewritten by `contiguous_groups`: its columns taken in ``order``, then zero columns
    up to ``padded``."""
    if order is not None:
        x = bb.emit(relax.op.take(x, relax.const(order.to(torch.int32).numpy()), axis=1, mode="clip"))
    k_in = int(x.ty.shape[1])
    return bb.emit(relax.op.nn.pad(x, [0, 0, 0, padded - k_in])) if padded != k_in else x


def tiled_rows(rows: int) -> int:
    """The rows a layer's kernel computes for ``rows`` static rows: themselves, or the next multiple of
    `ROW_TILE_MULTIPLE` where none of their divisors up to it reaches `MIN_ROW_TILE`."""
    if rows <= ROW_TILE_MULTIPLE or divisor_at_most(rows, ROW_TILE_MULTIPLE) >= MIN_ROW_TILE:
        return rows
    return -(-rows // ROW_TILE_MULTIPLE) * ROW_TILE_MULTIPLE


def emit_on_rows(
    bb: relax.BlockBuilder,
    x: relax.Expr,
    n_out: int,
    call: Callable[[relax.Expr, int], relax.Expr],
    row_multiple: int = 1,
) -> relax.Expr:
    """``call(x2d, rows)``, a ``(rows, n_out)`` result, on ``x`` flattened to rows; the leading dimensions restored.

    With ``row_multiple``, more rows than that are zero-padded to a multiple of it (the padded rows of the result
    dropped), so a kernel tiled by rows gets whole tiles: 197 tokens have no divisor but 1 up to a tile of 8.
    """
    if not static_shape(x):
        return _emit_on_symbolic_rows(bb, x, n_out, call, row_multiple)
    shape = [int(d) for d in x.ty.shape]
    rows = math.prod(shape[:-1])
    x2d = bb.emit(relax.op.reshape(x, (rows, shape[-1]))) if len(shape) != 2 else x
    padded = -(-rows // row_multiple) * row_multiple if rows > row_multiple else rows
    if padded != rows:
        x2d = bb.emit(relax.op.nn.pad(x2d, [0, padded - rows, 0, 0]))
    out = bb.emit(call(x2d, padded))
    if padded != rows:
        out = bb.emit(relax.op.strided_slice(out, axes=[0], begin=[0], end=[rows]))
    return bb.emit(relax.op.reshape(out, (*shape[:-1], n_out))) if len(shape) != 2 else out


def _emit_on_symbolic_rows(
    bb: relax.BlockBuilder,
    x: relax.Expr,
    n_out: int,
    call: Callable[[relax.Expr, Any], relax.Expr],
    block: int,
) -> relax.Expr:
    """`emit_on_rows` for a symbolic row count: the rows zero-padded to whole blocks (`kernels.generic.rows`), the
    result cut back to them."""
    shape = list(x.ty.shape)
    rows = math.prod(shape[:-1])
    columns = int(shape[-1])
    x2d = bb.emit(relax.op.reshape(x, (rows, columns))) if len(shape) != 2 else x
    padded = rows_module.padded_rows(rows, block)
    if block > 1:
        pad = bb.add_func(rows_module.pad_rows_func(columns, block), "lowbit_pad_rows")
        x2d = bb.emit(relax.call_tir(pad, [x2d], out_ty=relax.TensorType((padded, columns), "float32")))
    out = bb.emit(call(x2d, padded))
    if block > 1:
        first = bb.add_func(rows_module.first_rows_func(n_out), "lowbit_first_rows")
        out = bb.emit(
            relax.call_tir(first, [out, relax.prim_value(rows)], out_ty=relax.TensorType((rows, n_out), "float32"))
        )
    return bb.emit(relax.op.reshape(out, (*shape[:-1], n_out))) if len(shape) != 2 else out


def static_shape(x: relax.Expr) -> bool:
    """Whether every dimension of the tensor ``x`` is a known size (no symbolic dimension)."""
    return all(isinstance(d, tvm.tirx.IntImm) for d in x.ty.shape)


def call_kernel(
    bb: relax.BlockBuilder,
    func: tvm.tirx.PrimFunc,
    name: str,
    x: relax.Expr,
    consts: Sequence[torch.Tensor],
    n_out: int,
    scalars: Sequence[Any] = (),
) -> relax.Call:
    """``call_tir`` of a linear kernel ``func(x, *consts, *scalars, y)`` with ``consts`` as Relax constants
    (``scalars``: the values of its integer arguments, e.g. a count of row blocks)."""
    gvar = bb.add_func(func, name)
    args = [x] + [relax.const(t.detach().cpu().contiguous().numpy()) for t in consts]
    args += [relax.prim_value(value) for value in scalars]
    return relax.call_tir(gvar, args, out_ty=relax.TensorType((x.ty.shape[0], n_out), "float32"))


def dequantized_weight(spec: PackedLinearSpec, tensors: Tensors) -> torch.Tensor:
    """The layer's fp32 weight ``(N, K)``, dequantized at compile time (what the fallbacks multiply by)."""
    return packing.dequantize(
        tensors["qweight"],
        tensors["scales"],
        tensors["zeros"],
        tensors["g_idx"],
        spec.bits,
        spec.group_size,
        spec.in_features,
    )


def layer_spec(
    call: Mapping[str, Any], rows: int, tensors: Tensors, a8: bool, row_blocks: bool = False
) -> PackedLinearSpec:
    """The spec of one ``linear_packed``/``linear_packed_a8`` call (normalized kwargs) on ``rows`` input rows (with
    ``row_blocks``: on any number of blocks of ``rows``)."""
    return PackedLinearSpec(
        batch=rows,
        in_features=call["in_features"],
        out_features=tensors["qweight"].shape[0],
        bits=call["bits"],
        group_size=call["group_size"],
        asymmetric=tensors["zeros"] is not None,
        has_bias=tensors["bias"] is not None,
        has_g_idx=tensors["g_idx"] is not None,
        act_bits=8 if a8 else None,
        act_dynamic=tensors.get("act_scale") is None,
        row_blocks=row_blocks,
    )


__all__ = [
    "EMBEDDING_PACKED_NAME",
    "FALLBACK",
    "LINEAR_PACKED_A8_NAME",
    "LINEAR_PACKED_NAME",
    "ROW_BLOCK",
    "LoweredLinear",
    "Lowering",
    "PackedEmbeddingConverter",
    "PackedLinearConverter",
    "announce_fallbacks",
    "call_kernel",
    "contiguous_groups",
    "dequantized_weight",
    "emit_on_rows",
    "fallbacks",
    "grouped_columns",
    "layer_spec",
    "packed_constant",
    "static_shape",
    "tuned_plan",
]
