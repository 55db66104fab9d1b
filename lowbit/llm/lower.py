"""The decoder as one Relax module: prefill and decode steps over an in-place static KV cache, sharing weights.

For each step size ``C`` (1 = decode, and the prefill chunk sizes) the module has ``step_C`` (the logits of one
column) and ``all_C`` (the logits of every column), each taking ``ids, positions (B, C)`` int64, ``mask (B, n)``
int32 with a symbolic ``n`` (the length after the step), ``last (1,)`` int64 (``step_C`` only) and the caches,
two ``(B, kv_heads, T, head_dim)`` tensors per block that `attention.cache_attention` updates in place. Every
low-bit linear runs on one kernel in one weight layout for all step sizes: the kernel (and its knobs, from the
tuner) is chosen for a decode step, the other sizes reuse its knobs, and each constant is one Relax constant
shared by every function (`ConstantPool`), so the library holds each weight once. Projections that read the same
input (q, k, v; gate, up) run as one linear where their formats agree (`weights.fuse`, stacked at lowering time),
and their outputs are sliced apart, but for q, k and v: the attention kernel reads their heads from one tensor (the
fused output as it is) and applies the rotary embedding itself. The RMSNorm before a block's projections runs in
their kernels' input stage where the kernel offers it (`LinearKernel.normed_plan`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
import tvm
from tvm import relax

from lowbit.backends.tvm.convert import (
    FALLBACK,
    LoweredLinear,
    announce_fallbacks,
    contiguous_groups,
    dequantized_weight,
    grouped_columns,
    layer_spec,
    tuned_plan,
)
from lowbit.backends.tvm.kernels.generic.activations import fake_quant_cpu_func
from lowbit.backends.tvm.kernels.generic.dense import dense_plan
from lowbit.backends.tvm.kernels.generic.embedding import embedding_func
from lowbit.backends.tvm.kernels.spec import InputNorm, LinearKernel, PackedLinearSpec
from lowbit.backends.tvm.target import float32_lanes
from lowbit.errors import BackendError
from lowbit.ir import ops_a8
from lowbit.llm.attention import AttentionSpec, cache_attention
from lowbit.llm.family import ATTENTION_INPUT, MLP_INPUT, DecoderSpec
from lowbit.llm.weights import DecoderWeights, Embedding, Linear, fuse

log = logging.getLogger(__name__)


class ConstantPool:
    """One Relax constant per distinct array, so functions that use the same weight share it in the library."""

    def __init__(self) -> None:
        self._constants: dict[tuple[Any, ...], relax.Constant] = {}

    def __call__(self, tensor: torch.Tensor) -> relax.Constant:
        array = tensor.detach().cpu().contiguous().numpy()
        key = (array.shape, str(array.dtype), hashlib.blake2b(array.tobytes(), digest_size=16).digest())
        if key not in self._constants:
            self._constants[key] = relax.const(array)
        return self._constants[key]


@dataclass(frozen=True)
class LayerKernel:
    """How one packed linear runs: its kernel and knobs (None: the dense fallback), the spec and constants after
    `contiguous_groups`, and the input column order."""

    kernel: LinearKernel | None
    knobs: dict[str, int] | None
    spec: PackedLinearSpec
    tensors: dict[str, torch.Tensor | None]
    order: torch.Tensor | None


class DecoderBuilder:
    """Builds the step functions of one decoder for a toolchain (CPU) and a batch capacity."""

    def __init__(
        self,
        spec: DecoderSpec,
        weights: DecoderWeights,
        rotary: tuple[torch.Tensor, torch.Tensor],
        toolchain: Any,
        max_batch: int,
        tuner: Any = None,
    ) -> None:
        self.spec = spec
        self.weights = weights
        self.toolchain = toolchain
        self.target = toolchain.target
        self.max_batch = max_batch
        self.max_context = int(rotary[0].shape[0])
        self.tuner = tuner
        self.bb = relax.BlockBuilder()
        self.pool = ConstantPool()
        self.rotary_dim = int(rotary[0].shape[1])
        self.cos, self.sin = (self.pool(t) for t in rotary) if self.rotary_dim else (None, None)
        #: Per block and input, the linears that run on it and the roles their output rows hold.
        self.groups = {
            (i, roles): self._group(i, roles)
            for i in range(spec.layers)
            for roles in (ATTENTION_INPUT, ("o",), MLP_INPUT, ("down",))
        }
        self.head = weights.linears[spec.lm_head]
        self.kernels: dict[str, LayerKernel] = {}
        self._knobs: dict[tuple[Any, ...], dict[str, int]] = {}
        self.linears: list[LoweredLinear] = []
        for linear in [*(linear for group in self.groups.values() for linear, _ in group), self.head]:
            if linear.packed:
                self.kernels[linear.path] = self._choose(linear)

    def _group(self, index: int, roles: tuple[str, ...]) -> list[tuple[Linear, tuple[str, ...]]]:
        """The projections of block ``index`` holding ``roles``: one fused linear where `fuse` allows, else each."""
        projections = [(self.weights.linears[path], held) for path, held in self.spec.projections(index, roles)]
        fused = fuse([linear for linear, _ in projections]) if len(projections) > 1 else None
        if fused is None:
            return projections
        return [(fused, tuple(role for _, held in projections for role in held))]

    # -- functions ------------------------------------------------------------------------------------------------

    def build(self, chunks: tuple[int, ...], strict: bool = False) -> tvm.IRModule:
        """The module with ``step_C`` and ``all_C`` for ``C`` in 1 and ``chunks``."""
        announce_fallbacks([linear for linear in self.linears if linear.kernel == FALLBACK], "the CPU", strict)
        for chunk in sorted({1, *chunks}):
            self._function(chunk, all_columns=False)
            self._function(chunk, all_columns=True)
        return self.bb.get()

    def _function(self, chunk: int, all_columns: bool) -> None:
        spec, batch = self.spec, self.max_batch
        n = tvm.tirx.Var("n", "int64")
        ids = relax.Var("ids", relax.TensorType((batch, chunk), "int64"))
        positions = relax.Var("positions", relax.TensorType((batch, chunk), "int64"))
        mask = relax.Var("mask", relax.TensorType((batch, n), "int32"))
        last = relax.Var("last", relax.TensorType((1,), "int64"))
        cache_type = relax.TensorType((batch, spec.kv_heads, self.max_context, spec.head_dim), "float32")
        caches = [relax.Var(f"{kind}{i}", cache_type) for i in range(spec.layers) for kind in ("k", "v")]
        params = [ids, positions, mask, *([] if all_columns else [last]), *caches]
        bb = self.bb
        with bb.function(f"{'all' if all_columns else 'step'}_{chunk}", params):
            with bb.dataflow():
                hidden = self._decoder(ids, positions, mask, caches, chunk)
                if all_columns:
                    logits = self._linear(self.head, hidden, chunk)
                else:  # the head's (batch, vocab) output is returned as it is (a reshape of it would be a copy)
                    logits = self._rows(self.head, bb.emit(relax.op.take(hidden, last, axis=1)), batch)
                output = bb.emit_output(logits)
            bb.emit_func_output(output)

    def _decoder(
        self, ids: relax.Expr, positions: relax.Expr, mask: relax.Expr, caches: list[relax.Var], chunk: int
    ) -> relax.Expr:
        """The final-normed hidden states ``(B, C, hidden)``."""
        bb, spec = self.bb, self.spec
        family = spec.description
        batch = self.max_batch
        x = self._embedding(self.weights.embedding, ids, chunk)
        if self.weights.positions is not None:
            x = bb.emit(relax.op.add(x, self._embedding(self.weights.positions, positions, chunk)))
        attention = bb.add_func(
            cache_attention(
                AttentionSpec(
                    batch,
                    chunk,
                    spec.q_heads,
                    spec.kv_heads,
                    spec.head_dim,
                    self.max_context,
                    spec.head_dim**-0.5,
                    self.rotary_dim,
                ),
                self.target,
            ),
            "lowbit_cache_attention",
        )
        # the kernel rotates q as it loads it and k as it appends it, from the rotary tables and the positions
        rotary = [positions, self.cos, self.sin] if self.rotary_dim else []
        for i in range(spec.layers):
            qkv = self._qkv(i, x, chunk, spec.norm(i, "attn"))
            q_type = relax.TensorType((batch, chunk, spec.q_heads, spec.head_dim), "float32")
            cache_types = [caches[2 * i].ty, caches[2 * i + 1].ty]
            result = bb.emit(
                relax.call_tir_inplace(
                    attention,
                    [qkv, *rotary, mask, caches[2 * i], caches[2 * i + 1]],
                    inplace_indices=[-1, 2 + len(rotary), 3 + len(rotary)],
                    out_ty=[q_type, *cache_types],
                )
            )
            attended = bb.emit(relax.TupleGetItem(result, 0))
            attended = bb.emit(relax.op.reshape(attended, (batch, chunk, spec.q_heads * spec.head_dim)))
            x = bb.emit(relax.op.add(x, self._project(i, ("o",), attended, chunk)["o"]))
            out = self._project(i, MLP_INPUT, x, chunk, spec.norm(i, "mlp"))
            if family.mlp == "gated_silu":
                mixed = bb.emit(relax.op.multiply(relax.op.nn.silu(out["gate"]), out["up"]))
            else:
                mixed = bb.emit(relax.op.nn.gelu_tanh(out["up"]))
            x = bb.emit(relax.op.add(x, self._project(i, ("down",), mixed, chunk)["down"]))
        return self._norm(x, spec.final_norm)

    def _embedding(self, embedding: Embedding, ids: relax.Expr, chunk: int) -> relax.Expr:
        """The rows of ``ids`` ``(B, C)``: a take from the fp32 table, or the packed gather-dequantize kernel."""
        bb = self.bb
        if not embedding.packed:
            return bb.emit(relax.op.take(self.pool(embedding.table), ids, axis=0))
        qweight, scales, zeros = embedding.tensors()
        count, dim = self.max_batch * chunk, self.spec.hidden
        flat = bb.emit(relax.op.reshape(ids, (count,)))
        tied = self._tied_rows(embedding, count)
        if tied is not None:
            func, consts = tied
        else:
            arguments = embedding.arguments
            func = embedding_func(
                count, qweight.shape[0], dim, arguments["bits"], arguments["group_size"], zeros is not None, "int64"
            )
            consts = [self.pool(t) for t in (qweight, scales, zeros) if t is not None]
        rows = bb.emit(
            relax.call_tir(
                bb.add_func(func, "lowbit_embedding"), [flat, *consts], out_ty=relax.TensorType((count, dim), "float32")
            )
        )
        return bb.emit(relax.op.reshape(rows, (self.max_batch, chunk, dim)))

    def _tied_rows(self, embedding: Embedding, count: int) -> tuple[Any, list[relax.Constant]] | None:
        """The output projection's kernel decoding table rows from its own constants, where the table is tied to
        that projection and the kernel can (`LinearKernel.gather_rows`); None otherwise."""
        chosen = self.kernels.get(self.head.path)
        tied = self.head.packed and self.head.arguments.get("qweight") is embedding.arguments.get("qweight")
        if not tied or chosen is None or chosen.kernel is None or chosen.order is not None:
            return None
        if chosen.spec.in_features != self.spec.hidden:
            return None
        plan = chosen.kernel.plan(chosen.spec, chosen.tensors, self.target, knobs=chosen.knobs)
        func = chosen.kernel.gather_rows(chosen.spec, chosen.knobs, count, scale_dtype=plan.consts[1].dtype)
        if func is None:
            return None
        weights = 3 if chosen.spec.asymmetric else 2
        return func, [self.pool(t) for t in plan.consts[:weights]]

    def _norm(self, x: relax.Expr, path: str) -> relax.Expr:
        weight = self.pool(self.weights.norms[path])
        bias = self.weights.norm_biases.get(path)
        eps = self.spec.norm_eps
        if bias is None:
            return self.bb.emit(relax.op.nn.rms_norm(x, weight, axes=[-1], epsilon=eps))
        return self.bb.emit(relax.op.nn.layer_norm(x, weight, self.pool(bias), axes=[-1], epsilon=eps))

    def _qkv(self, index: int, x: relax.Expr, chunk: int, norm: str) -> relax.Expr:
        """Block ``index``'s query, key and value heads ``(B, C, Hq + 2 Hkv, head_dim)`` on the norm ``norm`` of
        ``x``, in that order: a fused projection's output as it is (a reshape), else the projections' outputs
        concatenated."""
        spec = self.spec
        heads = (self.max_batch, chunk, spec.q_heads + 2 * spec.kv_heads, spec.head_dim)
        group = self.groups[(index, ATTENTION_INPUT)]
        if len(group) == 1 and group[0][1] == ATTENTION_INPUT:
            return self.bb.emit(relax.op.reshape(self._outputs(group, x, chunk, norm)[0], heads))
        out = self._project(index, ATTENTION_INPUT, x, chunk, norm)
        return self.bb.emit(relax.op.reshape(relax.op.concat([out[role] for role in ATTENTION_INPUT], axis=2), heads))

    def _project(
        self, index: int, roles: tuple[str, ...], x: relax.Expr, chunk: int, norm: str | None = None
    ) -> dict[str, relax.Expr]:
        """The outputs of block ``index``'s projections holding ``roles`` on ``x`` ``(B, C, K)`` (on its norm
        ``norm``, `_outputs`), by role."""
        group = self.groups[(index, roles)]
        outputs = {}
        for (linear, held), y in zip(group, self._outputs(group, x, chunk, norm)):
            if len(held) == 1:
                outputs[held[0]] = y
                continue
            start = 0
            for role, width in zip(held, self.spec.widths(held, linear.out_features)):
                outputs[role] = self.bb.emit(relax.op.strided_slice(y, axes=[2], begin=[start], end=[start + width]))
                start += width
        return outputs

    def _outputs(
        self, group: list[tuple[Linear, tuple[str, ...]]], x: relax.Expr, chunk: int, norm: str | None
    ) -> list[relax.Expr]:
        """Each linear of ``group`` on ``x``; with ``norm``, on the norm of that path of ``x``: computed in the
        kernel's input stage where it can (`_norm_in_kernel`), else once by the norm operator."""
        outputs = []
        normed = x if norm is None else None
        for linear, _ in group:
            if norm is not None and self._norm_in_kernel(linear, norm):
                outputs.append(self._linear(linear, x, chunk, InputNorm(self.weights.norms[norm], self.spec.norm_eps)))
            else:
                normed = normed if normed is not None else self._norm(x, norm)
                outputs.append(self._linear(linear, normed, chunk))
        return outputs

    # -- linears --------------------------------------------------------------------------------------------------

    def _linear(self, linear: Linear, x: relax.Expr, chunk: int, norm: InputNorm | None = None) -> relax.Expr:
        """``linear`` on ``x`` ``(B, chunk, K)`` (on ``norm`` of it, computed by its kernel): ``(B, chunk, N)``."""
        y = self._rows(linear, x, self.max_batch * chunk, norm)
        return self.bb.emit(relax.op.reshape(y, (self.max_batch, chunk, linear.out_features)))

    def _rows(self, linear: Linear, x: relax.Expr, rows: int, norm: InputNorm | None = None) -> relax.Expr:
        """``linear`` on the ``rows`` rows of ``x`` ``(B, chunk, K)`` (on ``norm`` of them): ``(rows, N)``."""
        x2d = self.bb.emit(relax.op.reshape(x, (rows, int(x.ty.shape[-1]))))
        if linear.packed:
            return self._packed(linear.path, x2d, rows, norm)
        return self._dense(linear.weight, linear.bias, x2d, rows)

    def _norm_in_kernel(self, linear: Linear, path: str) -> bool:
        """Whether ``linear``'s kernel computes the RMSNorm ``path`` of its input (`LinearKernel.normed_plan`): a
        packed layer whose kernel can (`LinearKernel.input_norm_reason`), its input columns in their order, after a norm
        without bias."""
        chosen = self.kernels.get(linear.path) if linear.packed else None
        return (
            chosen is not None
            and chosen.kernel is not None
            and chosen.kernel.input_norm_reason(chosen.spec, chosen.tensors, self.target) is None
            and chosen.order is None
            and path not in self.weights.norm_biases
        )

    def _choose(self, linear: Linear) -> LayerKernel:
        """The kernel of a packed linear for a decode step (``max_batch`` rows), or the fallback, recorded."""
        a8 = linear.op is ops_a8.linear_packed_a8
        tensors = linear.tensors()
        spec, tensors, order = contiguous_groups(
            layer_spec(linear.arguments, self.max_batch, tensors, a8), tensors, linear.path
        )
        reason = f"{self.toolchain.name} has no kernel for this layer"
        for kernel in self.toolchain.kernels(spec):
            reason = kernel.supports(spec, tensors, self.target)
            if reason is None:
                knobs = tuned_plan(kernel, spec, tensors, self.target, self.tuner).knobs
                self.linears.append(LoweredLinear(linear.path, spec, kernel.name, layer=linear.path))
                return LayerKernel(kernel, knobs, spec, tensors, order)
        self.linears.append(LoweredLinear(linear.path, spec, FALLBACK, reason, layer=linear.path))
        return LayerKernel(None, None, spec, tensors, order)

    def _packed(self, path: str, x: relax.Expr, rows: int, norm: InputNorm | None = None) -> relax.Expr:
        chosen = self.kernels[path]
        spec = replace(chosen.spec, batch=rows)
        x = grouped_columns(self.bb, x, chosen.order, spec.in_features)
        if chosen.kernel is None:
            return self._fallback(x, spec, chosen.tensors)
        reason = chosen.kernel.supports(spec, chosen.tensors, self.target)
        if reason is not None:
            raise BackendError(
                f"{path}: kernel '{chosen.kernel.name}' serves a decode step but not {rows} rows: {reason}"
            )
        knobs = self._step_knobs(chosen, spec)
        if norm is None:
            plan = chosen.kernel.plan(spec, chosen.tensors, self.target, knobs=knobs)
        else:
            plan = chosen.kernel.normed_plan(spec, chosen.tensors, self.target, norm, knobs=knobs)
        return self._call(plan.func, f"lowbit_{plan.name}", x, plan.consts, spec.out_features)

    def _step_knobs(self, chosen: LayerKernel, spec: PackedLinearSpec) -> dict[str, int]:
        """The decode step's knobs for ``spec.batch`` rows, except where the kernel's hand schedule for that many
        rows sets a knob differently and taking it keeps the weight layout (the same constants): a register tile
        over rows is capped at one row in a decode step but not in a prefill step."""
        assert chosen.kernel is not None and chosen.knobs is not None
        key = (chosen.kernel.name, spec, tuple(sorted(chosen.knobs.items())))
        if key not in self._knobs:
            knobs = dict(chosen.knobs)
            reference = chosen.kernel.plan(spec, chosen.tensors, self.target, knobs=knobs).consts
            for name, value in chosen.kernel.default_knobs(spec, self.target).items():
                if knobs.get(name) == value:
                    continue
                candidate = {**knobs, name: value}
                try:
                    consts = chosen.kernel.plan(spec, chosen.tensors, self.target, knobs=candidate).consts
                except BackendError:
                    continue
                if len(consts) == len(reference) and all(
                    a.shape == b.shape and torch.equal(a, b) for a, b in zip(consts, reference)
                ):
                    knobs = candidate
            self._knobs[key] = knobs
        return self._knobs[key]

    def _fallback(self, x: relax.Expr, spec: PackedLinearSpec, tensors: dict[str, Any]) -> relax.Expr:
        """The dense kernel on the dequantized weight (int8-activation layers fake-quantize their input first)."""
        if spec.act_bits is not None:
            step = None if spec.act_dynamic else float(tensors["act_scale"])
            quantize = self.bb.add_func(fake_quant_cpu_func(spec.batch, spec.in_features, step), "lowbit_fake_quantize")
            x = self.bb.emit(
                relax.call_tir(quantize, [x], out_ty=relax.TensorType((spec.batch, spec.in_features), "float32"))
            )
        return self._dense(dequantized_weight(spec, tensors), tensors["bias"], x, spec.batch)

    def _dense(self, weight: torch.Tensor, bias: torch.Tensor | None, x: relax.Expr, rows: int) -> relax.Expr:
        func, consts = dense_plan(weight, bias, rows, float32_lanes(self.target))
        return self._call(func, "lowbit_fp32_linear", x, consts, int(weight.shape[0]))

    def _call(self, func: Any, name: str, x: relax.Expr, consts: list[torch.Tensor], n_out: int) -> relax.Expr:
        gvar = self.bb.add_func(func, name)
        rows = int(x.ty.shape[0])
        args = [x, *(self.pool(t) for t in consts)]
        return self.bb.emit(relax.call_tir(gvar, args, out_ty=relax.TensorType((rows, n_out), "float32")))


__all__ = ["ConstantPool", "DecoderBuilder", "LayerKernel"]
