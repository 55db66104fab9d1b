"""Integer kernel for ``torch.ops.lowbit.linear_packed_a8`` on x86 (W2A8, W4A8, W1.58A8, W8A8).

The reference (`lowbit.ir.ops_a8`) quantizes the input to int8 and multiplies it by
the integer codes group by group; this kernel computes the same values in the same
order, with integer arithmetic where the reference is exact:

1. ``x_int`` per row: dynamic ``s = 127 / max(max_k |x|, 2⁻¹¹⁹)`` (a true division),
   ``x_int = clamp(nearbyint(x · s), −128, 127)``; static ``x_int = clamp(nearbyint(x /
   Δ), −128, 127)``. ``asum[m, g] = Σ_{k∈g} x_int`` is kept for the zero points. A plan with an input norm
   (`X86A8Linear.normed_plan`, a decoder's RMSNorm before its projections) takes ``x`` RMS-normed row by row
   (`rms_normed`) in this stage, so the norm needs no kernel call and no buffer of its own.
2. ``dot[m, g, n] = Σ_{k∈g} x_int · q`` in int32 with the custom 8×4 dot-product
   intrinsic of `kernels.x86.intrin` (``vpmaddubsw``+``vpmaddwd`` on AVX2, ``vpdpbusd`` with
   VNNI): codes are unsigned, activations signed. The zero point is removed
   algebraically, ``Σ x_int · (q − z) = dot − z · asum`` (exact in int32). With VNNI
   (no saturation) and few enough accumulators (`split_lanes`), quad ``l`` of a word is
   only masked, not shifted: it multiplies as ``2^(l·bits) · q`` into an accumulator of
   its own, which ``>> l·bits`` undoes exactly at the end of the group (every term is
   a multiple of ``2^(l·bits)``). That saves the byte shifts and gives ``pb`` times as
   many independent ``vpdpbusd`` chains, so the GEMV is no longer latency-bound.
3. ``acc[m, n] = Σ_g float32(dot − z·asum) · scale[n, g]``, groups in increasing order
   (float32 of an int32 rounds like the reference's float64 → float32; each product is `fenced` from its sum).
4. ``y = acc / s`` (dynamic) or ``acc · Δ`` (static), then (`fenced`) ``+ bias`` (a convolution: then the steps
   of its epilogue, `conv.conv_epilogue`).

Weight layout, made at lowering time from the project's packed rows: output rows in
tiles of 8 and input columns in quads of 4; one 32-byte word holds, for one tile, ``pb
= 8 // bits`` consecutive quads, quad ``l`` in bits ``[l·bits, (l+1)·bits)`` of every
byte, byte ``4·i + c`` for row ``i`` and column ``c``. So one 32-byte load, a shift and
a mask give the 8×4 codes one intrinsic call takes (``pb`` calls per load). The words
of the ``row_vectors`` tiles computed together sit side by side, so each parallel task
streams its weights sequentially from memory. Scales and zero points are blocked the
same way, ``(N/(8·V), G, 8·V)`` (`blocked`): the epilogue runs along output rows in
vectors of 8 and a task reads its groups' values as one contiguous block, not one
line per group at a stride of ``4·N`` bytes. Scales that are all float16 numbers (a
quantizer's ``scale_dtype: float16``) are stored as float16, half the bytes, and widened
to the same float32 values in the epilogue (`common.scale_storage`).

Schedule: parallel tasks of ``out_tile`` output rows; inside, each 8-row tile runs all
rows of ``x`` in register tiles of ``row_tile`` (one unpacked code vector feeds
``row_tile`` accumulators, and the tile's weights stay in cache across row tiles).
When one row tile covers the batch (a GEMV: the weights are read once), the word-row
loop also prefetches the weight stream `PREFETCH_BYTES` ahead, which the hardware
prefetcher alone does not keep up with on a cold stream: ``prefetchnta`` on AMD cores,
``prefetcht0`` on others (on Emerald Rapids a cold ``prefetchnta`` stream ran at half the
bandwidth; `common.stream_locality`). The GEMV also prefetches its first `PREFETCH_BYTES` before
the activation prologue, which the loop never does. The prologue reduces ``max |x|`` in vector lanes (a scalar
float max is a serial chain) and rounds the codes with ``tirx.round``: TVM scalarizes a vector loop that calls
``tirx.nearbyint`` (LLVM then gathered ``x`` and stored the codes byte by byte, about 0.9 µs of a 1536→576 GEMV),
while both lower to the same ``llvm.nearbyint``.
The per-task buffers (unpacked codes, int32 dot products, fp32 accumulators) keep the
default global scope: TVM turns small global allocations into stack arrays that LLVM
keeps in registers, while ``local`` ones come from the workspace pool once per task.
Ternary (W1.58) weights are 2-bit codes and run as W2A8. Anything else (g_idx, 1 or 3
bits, ragged groups, ``N`` not a multiple of 8, fractional zero points, no AVX2) gets a
reason from `X86A8Linear.supports`, and the lowering uses the dense fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from tvm import s_tir, te, tirx
from tvm.target import Target

from lowbit.backends.tvm.kernels.generic import activations
from lowbit.backends.tvm.kernels.generic.activations import (
    activation_codes,
    layout_reason,
    zeros_reason,
)
from lowbit.backends.tvm.kernels.generic.common import (
    LINE_BYTES,
    NTA,
    divisor_at_most,
    fenced,
    finish,
    layer_consts,
    loops_below,
    power_of_two_divisor,
    prefetch,
    prepend_to_loop,
    scale_storage,
    stream_locality,
)
from lowbit.backends.tvm.kernels.generic.conv import (
    ConvSpec,
    code_sums,
    conv_epilogue,
    quantized_input,
    schedule_code_sums,
    schedule_patches,
    sums_by_pixel,
)
from lowbit.backends.tvm.kernels.spec import (
    InputNorm,
    KernelPlan,
    LinearKernel,
    PackedLinearSpec,
    Tensors,
    resolve_knobs,
    row_block_count,
)
from lowbit.backends.tvm.kernels.x86 import intrin as intrin_x86
from lowbit.backends.tvm.target import has_features, target_arch
from lowbit.errors import BackendError
from lowbit.ir import packing

log = logging.getLogger(__name__)

KERNEL_NAME = "a8_linear_x86"
KERNEL_BITS: tuple[int, ...] = (2, 4, 8)
ROWS, COLUMNS = intrin_x86.ROWS, intrin_x86.COLUMNS
#: Bytes of one interleaved weight word (one AVX2 register).
WORD_BYTES = ROWS * COLUMNS
#: Tuning space: ``row_tile`` rows of ``x`` share each unpacked code vector; ``out_tile``
#: output rows (a multiple of 8) per parallel task; ``row_vectors`` 8-row weight tiles computed
#: together (independent accumulator chains hide the latency of ``vpdpbusd``).
KNOBS: dict[str, tuple[int, ...]] = {
    "row_tile": (1, 2, 4, 8),
    "out_tile": (8, 16, 32, 64, 128),
    "row_vectors": (1, 2, 4),
}
#: Parallel tasks a convolution's kernel makes at least, splitting its rows where its outputs make fewer.
MIN_TASKS = 8
#: torch's float sum over a contiguous row (`norm_sum_stages`): vector lanes, interleaved accumulators, vectors an
#: accumulator adds before its sum joins the chain of block sums; rows of more than `MAX_NORM_COLUMNS` columns
#: would add a second level of that chain, which the input norm does not reproduce.
SUM_LANES, SUM_SLOTS, SUM_BLOCK = 8, 4, 16
MAX_NORM_COLUMNS = SUM_LANES * SUM_SLOTS * SUM_BLOCK * SUM_BLOCK - 1
#: How far ahead of the word being unpacked a GEMV prefetches its weight stream (bytes).
PREFETCH_BYTES = 4096
#: Independent ``vpdpbusd`` chains that keep it busy (4 cycles latency × 2 per cycle on Zen 4): a schedule
#: with fewer (rows × weight tiles) splits lanes, if the accumulators fit half the AVX-512 vector registers.
BUSY_CHAINS, MAX_LANE_ACCUMULATORS = 8, 16


def unsupported_reason(spec: PackedLinearSpec) -> str | None:
    """Why the integer kernel cannot compute ``spec`` (the shape and format alone), or None."""
    return layout_reason(spec, "int8 kernel", KERNEL_BITS, ROWS, COLUMNS)


def word_columns(bits: int) -> int:
    """Input columns one interleaved 32-byte word covers: ``4 · (8 // bits)``."""
    return activations.word_columns(bits, COLUMNS)


def intrinsic(spec: PackedLinearSpec, target: Target) -> str:
    """The dot-product intrinsic for ``target``: VNNI when it has it, else the exact AVX2 one for the code width."""
    if has_features(target, "avx512vnni", "avx512vl") or has_features(target, "avxvnni"):
        return intrin_x86.VNNI
    return intrin_x86.AVX2_U8 if spec.bits == 8 else intrin_x86.AVX2_U7


def split_lanes(intrin: str, bits: int, group_size: int, rows: int, vectors: int) -> bool:
    """Whether each quad of a word gets accumulators of its own (masked codes, no shifts).

    Only with VNNI: ``vpdpbusd`` takes unsigned codes up to 255 without saturating
    (``vpmaddubsw`` would saturate on a masked quad's ``2^(l·bits) · q``). Only where
    ``rows × vectors`` chains leave ``vpdpbusd`` waiting on its latency (the GEMV), the
    ``rows × vectors × pb`` accumulators stay in registers, and a group's ``group_size /
    pb`` products of at most ``128 · 2^(l·bits) · q`` cannot overflow int32.
    """
    lanes = 8 // bits
    largest = 128 * (((1 << bits) - 1) << (bits * (lanes - 1)))
    return (
        intrin == intrin_x86.VNNI
        and lanes > 1
        and rows * vectors < BUSY_CHAINS
        and rows * vectors * lanes <= MAX_LANE_ACCUMULATORS
        and group_size // lanes * largest < 2**31
    )


class X86A8Linear(LinearKernel):
    """The int8-activation kernel of the module doc, for x86 LLVM targets with AVX2."""

    name = KERNEL_NAME
    knobs = KNOBS
    convolutions = True
    symbolic_rows = True
    epilogues = True

    def supports(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        return unsupported_reason(spec) or _target_reason(target) or zeros_reason(tensors.get("zeros"), "int8 kernel")

    def default_knobs(self, spec: PackedLinearSpec, target: Target) -> dict[str, int]:
        """The hand schedule: 4 accumulator chains (1 row × 4 weight tiles, or 4 rows × 2 tiles for GEMM), tasks of
        32 rows."""
        rows = max(v for v in KNOBS["row_tile"] if v <= min(spec.batch, 4))
        tile = max((v for v in KNOBS["out_tile"] if v <= 32 and spec.out_features % v == 0), default=ROWS)
        return {"row_tile": rows, "out_tile": tile, "row_vectors": 4 if rows == 1 else 2}

    def build(self, spec: PackedLinearSpec, tensors: Tensors, target: Target, knobs: dict[str, int]) -> KernelPlan:
        """The constants are, in order: interleaved codes, scales ``(N/(8·V), G, 8·V)`` (`blocked`; float16 where
        that is exact, `common.scale_storage`), [zero points, the same shape, int32], [bias], [the static step ``Δ``
        as a 1-element array]."""
        return self._build(spec, tensors, target, knobs)

    def input_norm_reason(self, spec: PackedLinearSpec, tensors: Tensors, target: Target) -> str | None:
        """A convolution's input stage gathers patches and computes no norm; the sum of squares follows torch's order
        up to `MAX_NORM_COLUMNS` columns."""
        if isinstance(spec, ConvSpec):
            return "a convolution's input is not normed"
        if spec.in_features > MAX_NORM_COLUMNS:
            return f"the input norm sums rows of at most {MAX_NORM_COLUMNS} columns in torch's order"
        return self.supports(spec, tensors, target)

    def normed_plan(
        self,
        spec: PackedLinearSpec,
        tensors: Tensors,
        target: Target,
        norm: InputNorm,
        knobs: Mapping[str, int] | None = None,
    ) -> KernelPlan:
        """The plan of a linear layer on ``norm`` of its input (`rms_normed`): the norm's weight (float32) follows the
        constants of `build`."""
        reason = self.input_norm_reason(spec, tensors, target)
        if reason is not None:
            raise BackendError(f"kernel '{self.name}' cannot take {spec}: {reason}")
        chosen = resolve_knobs(self.knobs, self.default_knobs(spec, target), knobs, self.name)
        return self._build(spec, tensors, target, chosen, norm)

    def _build(
        self,
        spec: PackedLinearSpec,
        tensors: Tensors,
        target: Target,
        knobs: dict[str, int],
        norm: InputNorm | None = None,
    ) -> KernelPlan:
        if spec.out_features % knobs["out_tile"] or knobs["out_tile"] % ROWS:
            raise BackendError(
                f"out_tile={knobs['out_tile']} does not tile out_features={spec.out_features} in rows of {ROWS}"
            )
        scale_dtype = scale_storage(tensors["scales"])
        func = a8_linear_func(
            spec,
            intrinsic(spec, target),
            knobs["row_tile"],
            knobs["out_tile"],
            knobs["row_vectors"],
            locality=stream_locality(target) or NTA,
            scale_dtype=scale_dtype,
            norm_eps=None if norm is None else norm.eps,
        )
        vectors = tile_vectors(knobs["out_tile"], knobs["row_vectors"])
        consts = layer_consts(
            interleave(tensors["qweight"], spec.bits, spec.in_features, vectors),
            tensors,
            lambda values: blocked(values, vectors),
            torch.int32,
            scale_dtype,
        )
        if not spec.act_dynamic:
            consts.append(tensors["act_scale"].to(torch.float32).reshape(1))
        if norm is not None:
            consts.append(norm.weight.to(torch.float32).reshape(spec.in_features).contiguous())
        return KernelPlan(func, consts, KERNEL_NAME, knobs)

    def gather_rows(
        self, spec: PackedLinearSpec, knobs: Mapping[str, int], count: int, scale_dtype: torch.dtype = torch.float32
    ) -> tirx.PrimFunc | None:
        """Rows of the interleaved codes and blocked scales (and zero points), decoded as
        `lowbit.ir.ops_embedding` decodes a packed table: ``(code − zero) · scale``."""
        vectors = tile_vectors(knobs["out_tile"], knobs["row_vectors"])
        return gather_rows_func(spec, vectors, count, scale_dtype)


KERNEL = X86A8Linear()


def gather_rows_func(
    spec: PackedLinearSpec, vectors: int, count: int, scale_dtype: torch.dtype = torch.float32
) -> tirx.PrimFunc:
    """`X86A8Linear.gather_rows` for tiles of `ROWS` rows, ``vectors`` tiles side by side (`interleave`,
    `blocked`), scales stored as ``scale_dtype``."""
    n_out, k_in, bits = spec.out_features, spec.in_features, spec.bits
    pb, span = 8 // bits, ROWS * vectors
    ids = te.placeholder((count,), "int64", name="ids")
    words = te.placeholder((n_out // span, k_in // (COLUMNS * pb), span * COLUMNS), "uint8", name="words")
    scales = te.placeholder((n_out // span, spec.groups, span), tvm_dtype(scale_dtype), name="scales")
    zeros = te.placeholder((n_out // span, spec.groups, span), "int32", name="zeros") if spec.asymmetric else None

    def decode(i: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
        n = ids[i]
        block, lane, group = n // span, n % span, k // spec.group_size
        byte = words[block, k // (COLUMNS * pb), lane * COLUMNS + k % COLUMNS].astype("int32")
        code = byte if bits == 8 else (byte >> ((k // COLUMNS) % pb * bits)) & ((1 << bits) - 1)
        zero = zeros[block, group, lane].astype("float32") if zeros is not None else float(packing.default_zero(bits))
        return (code.astype("float32") - zero) * scales[block, group, lane].astype("float32")

    rows = te.compute((count, k_in), decode, name="rows")
    args = [ids, words, scales] + ([zeros] if zeros is not None else [])
    return te.create_prim_func([*args, rows]).without_attr("global_symbol")


def tvm_dtype(dtype: torch.dtype) -> str:
    """TVM's name of a torch floating-point type (``torch.float16`` → ``"float16"``)."""
    return str(dtype).removeprefix("torch.")


def blocked(per_group: torch.Tensor, vectors: int, rows: int = ROWS) -> torch.Tensor:
    """Per-group values ``(N, G)`` → ``(N/(R·V), G, R·V)`` for tiles of ``R = rows`` (8): the ``V = vectors``
    tiles computed together read theirs contiguously."""
    n_out, groups = per_group.shape
    return per_group.reshape(n_out // (rows * vectors), rows * vectors, groups).transpose(1, 2).contiguous()


def tile_vectors(out_tile: int, row_vectors: int) -> int:
    """8-row tiles computed together: ``row_vectors``, reduced to divide the task's ``out_tile / 8`` tiles."""
    return divisor_at_most(out_tile // ROWS, row_vectors)


def interleave(qweight: torch.Tensor, bits: int, in_features: int, vectors: int, rows: int = ROWS) -> torch.Tensor:
    """Packed rows ``(N, row_bytes)`` → words ``(N/(R·V), K/(4·pb), V·4·R)`` of the module doc (tiles of ``R =
    rows`` output rows, 8 by default).

    The ``V = vectors`` tiles computed together have their words side by side, so a task
    reads its weights as one sequential stream.
    """
    codes = packing.unpack(qweight, bits, in_features).to(torch.int32)
    n_out, pb = codes.shape[0], 8 // bits
    # [tile group, tile, row, word, quad-in-word, column] → [tile group, word, tile, quad-in-word, row, column]
    blocks = codes.reshape(n_out // (rows * vectors), vectors, rows, in_features // (COLUMNS * pb), pb, COLUMNS)
    blocks = blocks.permute(0, 3, 1, 4, 2, 5)
    shifts = (torch.arange(pb, dtype=torch.int32) * bits).reshape(1, 1, 1, pb, 1, 1)
    words = (blocks << shifts).sum(dim=3)
    return words.reshape(n_out // (rows * vectors), -1, vectors * rows * COLUMNS).to(torch.uint8).contiguous()


def a8_linear_func(
    spec: PackedLinearSpec,
    intrin: str,
    row_tile: int,
    out_tile: int,
    row_vectors: int,
    name: str | None = None,
    locality: int = NTA,
    scale_dtype: torch.dtype = torch.float32,
    norm_eps: float | None = None,
) -> tirx.PrimFunc:
    """The scheduled PrimFunc; arguments ``x (M, K) f32``, the constants of `plan`, output ``y (M, N) f32``;
    ``locality``: the GEMV's weight prefetch hint (`common.stream_locality`); ``scale_dtype``: the scales' type;
    ``norm_eps``: the input rows are RMS-normed first (`rms_normed`; the norm's weight the last constant)."""
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(f"int8 kernel cannot compute {spec}: {reason}")
    # Tensorize needs whole tiles: the row tile divides the batch, the weight tiles divide the task.
    rows = divisor_at_most(spec.batch, row_tile)
    vectors = tile_vectors(out_tile, row_vectors)
    lanes = split_lanes(intrin, spec.bits, spec.group_size, rows, vectors)
    intrin_x86.register()
    sch = s_tir.Schedule(a8_linear_compute(spec, vectors, lanes, scale_dtype=scale_dtype, norm_eps=norm_eps))
    _schedule(sch, spec, intrin, rows, out_tile, vectors, locality, normed=norm_eps is not None)
    log.debug(
        "scheduled %s with %s, row_tile=%d, out_tile=%d, row_vectors=%d, split lanes %s, prefetch locality %d",
        spec,
        intrin,
        rows,
        out_tile,
        vectors,
        lanes,
        locality,
    )
    return finish(sch.mod["main"], name)


def a8_linear_compute(
    spec: PackedLinearSpec,
    vectors: int,
    split: bool = False,
    rows: int = ROWS,
    scale_dtype: torch.dtype = torch.float32,
    stored: int | None = None,
    norm_eps: float | None = None,
) -> tirx.PrimFunc:
    """The unscheduled computation (stages of the module doc), words laid out by `interleave` for ``vectors``.

    ``dot`` has a lane axis: with ``split`` (`split_lanes`) one accumulator per quad of a
    word, the codes masked in place; otherwise one, the codes shifted down and the quads
    summed by the reduction. ``rows``: output rows of one weight tile (one intrinsic call); ``scale_dtype``: the
    scales' type (float16 scales widen exactly to float32). A `ConvSpec` reads its input as the patches of an NHWC
    image (`conv.quantized_input`). The activation codes are rounded with ``tirx.round``, which lowers to the same
    ``llvm.nearbyint`` (ties to even) as ``tirx.nearbyint`` but which TVM vectorizes (`activation_codes`). With
    ``norm_eps`` (a linear layer) the codes are those of `rms_normed` rows, the norm's weight an argument after the
    other constants. ``stored``: the output keeps the first ``stored`` columns of ``y`` (``y_stored``; the weight
    rows past them are padding).
    """
    m_rows, k_in, n_out, bits = spec.rows, spec.in_features, spec.out_features, spec.bits
    group, groups, pb = spec.group_size, spec.groups, 8 // bits
    quads = group // COLUMNS  # column quads per group
    word_bytes = rows * COLUMNS
    words = te.placeholder(
        (n_out // (rows * vectors), k_in // (COLUMNS * pb), vectors * word_bytes), "uint8", name="words"
    )
    per_group = (n_out // (rows * vectors), groups, vectors * rows)
    scales = te.placeholder(per_group, tvm_dtype(scale_dtype), name="scales")
    zeros = te.placeholder(per_group, "int32", name="zeros") if spec.asymmetric else None
    bias = te.placeholder((n_out,), "float32", name="bias") if spec.has_bias else None
    step = None if spec.act_dynamic else te.placeholder((1,), "float32", name="act_scale")

    norm_weight = te.placeholder((k_in,), "float32", name="norm_weight") if norm_eps is not None else None
    if norm_weight is None:
        x, xq, mult = quantized_input(spec, step, tirx.round)
    else:
        x = te.placeholder((m_rows, k_in), "float32", name="x")
        code, mult = activation_codes(rms_normed(x, norm_weight, norm_eps), step, tirx.round)
        xq = te.compute((m_rows, k_in), code, name="xq")
    asum = code_sums(spec, xq)
    mask = tirx.const((1 << bits) - 1, "uint8")

    def code(t: tirx.Var, q: tirx.Var, i: tirx.Var, c: tirx.Var) -> tirx.PrimExpr:
        word = words[t // vectors, q // pb, (t % vectors) * word_bytes + i * COLUMNS + c]
        shift = ((q % pb) * bits).astype("uint8")
        if split:
            return tirx.bitwise_and(word, tirx.shift_left(mask, shift))
        return tirx.bitwise_and(tirx.shift_right(word, shift), mask)

    codes = te.compute((n_out // rows, k_in // COLUMNS, rows, COLUMNS), code, name="codes")
    lanes = pb if split else 1
    w = te.reduce_axis((0, quads // pb), name="w")
    lane = te.reduce_axis((0, pb // lanes), name="lane")
    c = te.reduce_axis((0, COLUMNS), name="c")
    dot = te.compute(
        (m_rows, groups, n_out // rows, lanes, rows),
        lambda m, g, t, l, i: te.sum(
            xq[m, g * group + (w * pb + l + lane) * COLUMNS + c].astype("int32")
            * codes[t, g * quads + w * pb + l + lane, i, c].astype("int32"),
            axis=[w, lane, c],
        ),
        name="dot",
    )
    default = int(packing.default_zero(bits))

    def centered(m: tirx.Var, g: tirx.Var, t: tirx.Var, i: tirx.Var) -> tirx.PrimExpr:
        block, row = t // vectors, (t % vectors) * rows + i
        zero = zeros[block, g, row] if zeros is not None else tirx.const(default, "int32")
        total = dot[m, g, t, 0, i]
        for l in range(1, lanes):
            total = total + tirx.shift_right(dot[m, g, t, l, i], l * bits)
        return fenced((total - zero * asum[m, g]).astype("float32") * scales[block, g, row].astype("float32"))

    g_axis = te.reduce_axis((0, groups), name="g")
    acc = te.compute(
        (m_rows, n_out // rows, rows), lambda m, t, i: te.sum(centered(m, g_axis, t, i), axis=g_axis), name="acc"
    )

    def output(m: tirx.Var, n: tirx.Var) -> tirx.PrimExpr:
        value = acc[m, n // rows, n % rows]
        value = value / mult[m] if step is None else value * step[0]
        if isinstance(spec, ConvSpec):
            return conv_epilogue(spec, value, bias[n] if bias is not None else None)
        return fenced(value) + bias[n] if bias is not None else value

    y = te.compute((m_rows, n_out), output, name="y")
    if stored is not None:
        y = te.compute((m_rows, stored), lambda m, n: y[m, n], name="y_stored")
    args = [x, words, scales] + [t for t in (zeros, bias, step, norm_weight) if t is not None]
    return te.create_prim_func(args + ([row_block_count()] if spec.row_blocks else []) + [y])


def rms_normed(x: te.Tensor, weight: te.Tensor, eps: float) -> te.Tensor:
    """``weight · (x · rsqrt(mean(x²) + eps))`` along the rows of ``x``, rounded step by step as the torch
    reference rounds it: each square (`fenced` from the sums), their sum in torch's order (`norm_sum_stages`), the
    true division by ``K``, the sum with ``eps`` (float32), ``1 / sqrt``, then the two products."""
    rows, k_in = x.shape[0], int(x.shape[1])
    total = norm_sum_stages(lambda m, k: fenced(x[m, k] * x[m, k]), rows, k_in)
    inverse = te.compute(
        (rows,),
        lambda m: (
            tirx.const(1.0, "float32") / tirx.sqrt(total[m] / tirx.const(k_in, "float32") + tirx.const(eps, "float32"))
        ),
        name="norm_inverse",
    )
    return te.compute((rows, k_in), lambda m, kk: weight[kk] * (x[m, kk] * inverse[m]), name="normed")


def norm_sum_stages(
    square: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr], rows: tirx.PrimExpr | int, k_in: int
) -> te.Tensor:
    """``Σ_k square(m, k)`` per row in the order torch's float sum over a contiguous row adds (ATen's cascade sum):
    vectors of `SUM_LANES` elements dealt to `SUM_SLOTS` accumulators in turn, each slot adding its vectors from 0
    in blocks of `SUM_BLOCK` (a block's sum joins a chain of block sums, the partial block's sum is added to that
    chain at the end), then the vectors past the last whole round, the other slots in order, and the lanes in order
    after the elements past the last vector. Stages ``norm_blocks`` and ``norm_rest`` (the slots' sums, over slots ×
    lanes), ``norm_chain``, ``norm_lanes``, ``norm_sum``; `test_x86_a8_linear` checks the order against torch."""
    width, slots = SUM_LANES, SUM_SLOTS
    vectors = k_in // width
    depth = vectors // slots  # vectors per slot
    blocks, rest = divmod(depth, SUM_BLOCK)

    def element(m: tirx.PrimExpr, i: tirx.PrimExpr, a: tirx.PrimExpr, lane: tirx.PrimExpr) -> tirx.PrimExpr:
        return square(m, (i * slots + a) * width + lane)

    partial: list[te.Tensor] = []
    if blocks:
        j = te.reduce_axis((0, SUM_BLOCK), name="j")
        per_block = te.compute(
            (rows, blocks, slots, width),
            lambda m, b, a, lane: te.sum(element(m, b * SUM_BLOCK + j, a, lane), axis=j),
            name="norm_blocks",
        )
        c = te.reduce_axis((0, blocks), name="c")
        partial.append(
            te.compute(
                (rows, slots, width), lambda m, a, lane: te.sum(per_block[m, c, a, lane], axis=c), name="norm_chain"
            )
        )
    if rest:
        r = te.reduce_axis((0, rest), name="r")
        partial.append(
            te.compute(
                (rows, slots, width),
                lambda m, a, lane: te.sum(element(m, blocks * SUM_BLOCK + r, a, lane), axis=r),
                name="norm_rest",
            )
        )

    def slot(m: tirx.PrimExpr, a: int, lane: tirx.PrimExpr) -> tirx.PrimExpr:
        values = [t[m, a, lane] for t in reversed(partial)]  # the partial block's sum first, then the chain
        return values[0] + values[1] if len(values) == 2 else values[0] if values else tirx.const(0.0, "float32")

    def lane_sum(m: tirx.PrimExpr, lane: tirx.PrimExpr) -> tirx.PrimExpr:
        value = slot(m, 0, lane)
        for v in range(depth * slots, vectors):
            value = value + square(m, v * width + lane)
        for a in range(1, slots):
            value = value + slot(m, a, lane)
        return value

    lanes = te.compute((rows, width), lane_sum, name="norm_lanes")

    def row_sum(m: tirx.PrimExpr) -> tirx.PrimExpr:
        value = tirx.const(0.0, "float32")
        for k in range(vectors * width, k_in):
            value = value + square(m, k)
        for lane in range(width):
            value = value + lanes[m, lane]
        return value

    return te.compute((rows,), row_sum, name="norm_sum")


def _schedule(
    sch: s_tir.Schedule,
    spec: PackedLinearSpec,
    intrin: str,
    row_tile: int,
    out_tile: int,
    row_vectors: int,
    locality: int,
    normed: bool = False,
) -> None:
    """Parallel output tasks, register tiles of rows × 8-row weight tiles, the dot-product intrinsic; ``normed``:
    the input stage computes `rms_normed` rows (inlined into the activation codes)."""
    loops = schedule_tiles(sch, intrin, ROWS, row_tile, out_tile, row_vectors, row_tasks(spec, row_tile, out_tile))
    gemv = row_tile == spec.batch and not spec.row_blocks
    if gemv:
        n_task, n_tile, a_g, d_w = loops.task, loops.tile, loops.group, loops.word
        _prefetch(sch, spec, (n_task, n_tile, a_g, d_w), out_tile // (ROWS * row_vectors), locality)
    finish_accumulators(sch, loops)

    if isinstance(spec, ConvSpec):
        schedule_patches(sch, spec)
        if sums_by_pixel(spec):
            schedule_code_sums(sch, spec)
    else:
        xq = sch.get_sblock("xq")
        k_inner = sch.split(sch.get_loops(xq)[-1], factors=[None, power_of_two_divisor(spec.in_features, 16)])[-1]
        sch.vectorize(k_inner)
    if normed:
        sch.compute_inline(sch.get_sblock("normed"))
        for name in ("norm_blocks", "norm_rest"):
            if _has_block(sch, name):
                _vector_slots(sch, name)
    if spec.act_dynamic:
        _vector_absmax(sch, spec.in_features)
    if gemv:
        _prefetch_start(sch, locality)


def row_tasks(spec: PackedLinearSpec, row_tile: int, out_tile: int) -> int:
    """Blocks of rows run as parallel tasks: a convolution's many rows (its output pixels) feed the threads when its
    few output channels make fewer than `MIN_TASKS` tasks; a linear layer's tasks split its outputs only."""
    if not isinstance(spec, ConvSpec):
        return 1
    wanted = -(-MIN_TASKS // (spec.out_features // out_tile))
    return divisor_at_most(spec.batch // row_tile, wanted)


@dataclass(frozen=True)
class TileLoops:
    """The loops `schedule_tiles` leaves for the caller: output tasks and tiles, the register tiles of rows, the
    group accumulator's loops, and the word loop of the dot products."""

    task: s_tir.schedule.LoopRV
    tile: s_tir.schedule.LoopRV
    rows: s_tir.schedule.LoopRV
    acc: tuple[s_tir.schedule.LoopRV, s_tir.schedule.LoopRV, s_tir.schedule.LoopRV]
    group: s_tir.schedule.LoopRV
    word: s_tir.schedule.LoopRV


def schedule_tiles(
    sch: s_tir.Schedule, intrin: str, tile_rows: int, row_tile: int, out_tile: int, vectors: int, row_tasks: int = 1
) -> TileLoops:
    """The int8 kernels' register tiling (`a8_linear_compute` blocks ``y``, ``acc``, ``dot``, ``codes``): parallel
    tasks of ``out_tile`` outputs (× ``row_tasks`` blocks of rows), tiles of ``row_tile`` input rows × ``vectors``
    weight tiles of ``tile_rows`` outputs, the dot products tensorized with ``intrin`` and fully unrolled inside a
    tile."""
    y, acc, dot, codes = (sch.get_sblock(name) for name in ("y", "acc", "dot", "codes"))
    m, n = sch.get_loops(y)
    n_task, n_tile, n_vec, n_lane = sch.split(n, factors=[None, out_tile // (tile_rows * vectors), vectors, tile_rows])
    m_outer, m_inner = sch.split(m, factors=[None, row_tile])
    sch.reorder(n_task, n_tile, m_outer, m_inner, n_vec, n_lane)
    if row_tasks > 1:
        m_task, m_outer = sch.split(m_outer, factors=[row_tasks, None])
        sch.reorder(m_task, n_task, n_tile)
        n_task = sch.fuse(m_task, n_task)
    sch.parallel(n_task)
    sch.vectorize(n_lane)
    sch.unroll(m_inner)
    sch.unroll(n_vec)

    sch.compute_at(acc, m_outer, preserve_unit_loops=True)
    a_m, a_t, a_i, a_g = loops_below(sch, acc, m_outer)
    sch.reorder(a_g, a_m, a_t, a_i)
    sch.compute_at(dot, a_g, preserve_unit_loops=True)
    d_m, _, d_t, d_l, d_i, d_w, d_r, d_c = loops_below(sch, dot, a_g)
    sch.reorder(d_w, d_r, d_l, d_m, d_t, d_i, d_c)
    sch.compute_at(codes, d_l, preserve_unit_loops=True)
    c_i, c_c = sch.get_loops(codes)[-2:]
    sch.vectorize(sch.fuse(c_i, c_c))
    sch.unroll(sch.get_loops(codes)[-3])

    init = sch.decompose_reduction(dot, d_w)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(d_i, intrin)
    sch.unroll(d_m)
    sch.unroll(d_t)
    sch.unroll(d_l)
    sch.unroll(d_r)
    return TileLoops(n_task, n_tile, m_outer, (a_m, a_t, a_i), a_g, d_w)


def finish_accumulators(sch: s_tir.Schedule, loops: TileLoops) -> None:
    """The per-group accumulators of a tile: unrolled, vectorized along the outputs, zeroed per group."""
    a_m, a_t, a_i = loops.acc
    sch.unroll(a_t)
    sch.vectorize(a_i)
    sch.unroll(a_m)
    acc_init = sch.decompose_reduction(sch.get_sblock("acc"), loops.group)
    sch.vectorize(sch.get_loops(acc_init)[-1])


def _has_block(sch: s_tir.Schedule, name: str) -> bool:
    return any(sch.get(block).name_hint == name for block in sch.get_child_blocks(sch.get_sblock("root")))


def _vector_slots(sch: s_tir.Schedule, name: str) -> None:
    """The input norm's slot sums: the reduction outside, the slots × lanes (32 independent sums, which LLVM
    vectorizes: the adds keep their order) inside."""
    block = sch.get_sblock(name)
    *_, a, lane, j = sch.get_loops(block)
    sch.reorder(j, a, lane)
    sch.fuse(a, lane)
    init = sch.decompose_reduction(block, j)
    sch.vectorize(sch.get_loops(init)[-1])


def _vector_absmax(sch: s_tir.Schedule, in_features: int) -> None:
    """``max |x|`` in vector lanes (``rfactor``), then across them: a scalar float max is one serial chain of
    ``K`` dependent ``vmaxss`` (LLVM keeps float reductions in order). Exact: a maximum does not depend on the order."""
    block = sch.get_sblock("absmax")
    width = power_of_two_divisor(in_features, 16)
    _, k_inner = sch.split(sch.get_loops(block)[-1], factors=[None, width])
    partial = sch.rfactor(k_inner, 0)
    sch.vectorize(sch.get_loops(partial)[-1])


def _prefetch_start(sch: s_tir.Schedule, locality: int) -> None:
    """Prefetch the first `PREFETCH_BYTES` of the weights before the activation prologue.

    The word-row loop prefetches `PREFETCH_BYTES` ahead, so the first rows of a call were
    never prefetched and waited for DRAM after the prologue had run with the memory idle.
    """
    words = sch.get(sch.get_sblock("codes")).reads[0].source
    body = sch.get(sch.get_sblock("root")).body
    first = body[0] if isinstance(body, tirx.SeqStmt) else body
    size = min(PREFETCH_BYTES, int(words.shape[0]) * int(words.shape[1]) * int(words.shape[2]))
    prepend_to_loop(
        sch, sch.state.get_sref(first), [prefetch(words, line, locality) for line in range(0, size, LINE_BYTES)]
    )


def _prefetch(
    sch: s_tir.Schedule,
    spec: PackedLinearSpec,
    loops: tuple[s_tir.schedule.LoopRV, ...],
    tile_groups: int,
    locality: int,
) -> None:
    """Start each iteration of the word-row loop with a prefetch (hint ``locality``) per line of the row
    `PREFETCH_BYTES` ahead.

    ``loops``: the task, tile-group, group and word-row loops; ``tile_groups`` tile
    groups (words dimension 0) per task. The address is clamped to the last byte of the
    weights.
    """
    task, tile, group, word = (sch.get(loop) for loop in loops)
    words = sch.get(sch.get_sblock("codes")).reads[0].source
    tile_rows, row_bytes = int(words.shape[1]), int(words.shape[2])
    last = int(words.shape[0]) * tile_rows * row_bytes - 1
    if last + PREFETCH_BYTES + row_bytes >= 2**31:
        log.debug("no prefetch: %d weight bytes overflow the int32 loop index", last + 1)
        return
    ahead = -(-PREFETCH_BYTES // row_bytes) * row_bytes
    row = (
        (task.loop_var * tile_groups + tile.loop_var) * tile_rows
        + group.loop_var * (spec.group_size // word_columns(spec.bits))
        + word.loop_var
    )
    prepend_to_loop(
        sch,
        sch.get_sref(loops[3]),
        [
            prefetch(words, tirx.min(row * row_bytes + ahead + line, last), locality)
            for line in range(0, row_bytes, LINE_BYTES)
        ],
    )


def _target_reason(target: Target) -> str | None:
    if target.kind.name != "llvm" or target_arch(target) != "x86_64":
        return f"the x86 int8 kernel needs an x86 LLVM target, got {target}"
    if not has_features(target, "avx2"):
        return "the x86 int8 kernel needs AVX2 (target CPU has none)"
    return None


__all__ = [
    "KERNEL",
    "KERNEL_BITS",
    "KERNEL_NAME",
    "KNOBS",
    "PREFETCH_BYTES",
    "X86A8Linear",
    "a8_linear_compute",
    "a8_linear_func",
    "blocked",
    "interleave",
    "intrinsic",
    "split_lanes",
    "tile_vectors",
    "tvm_dtype",
    "unsupported_reason",
    "word_columns",
]
