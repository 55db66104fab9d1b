"""``fake_quant``: quantization-aware training with straight-through estimators.

Each target ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` weight (a convolution's as its matrix
``(C_out, C_in/groups · prod(kernel))``) gets a `WeightFakeQuant` parametrization: the forward uses
the quantized weight, the backward passes the gradient to the latent float weight. Formats,
per layer through overrides: ``int`` with the ``rtn`` grid recomputed every step (clipped STE)
or LSQ's learnable steps, BitNet b1.58 ``ternary`` and BinaryConnect ``binary`` (call
`clip_latent_weights` after each optimizer step, or `attach_latent_clip` once). The forward
value is exactly the packed format's dequantized weight, so ``convert_qat`` reproduces it bit
for bit. The formats and estimators: docs/methods.md (QAT).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from lowbit.errors import PassConfigError
from lowbit.ir import packing
from lowbit.ir.annotations import FakeQuant
from lowbit.ir.graph import layers
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.quant.binary import binary_quantize
from lowbit.passes.quant.fewlevel import checked_weight, per_column
from lowbit.passes.quant.grid import GRID_BITS, QuantizedWeight, effective_group_size, quantize_weight
from lowbit.passes.quant.rewrite import CONV_TYPES, is_conv, unsupported_reason
from lowbit.passes.quant.ternary import ternary_quantize
from lowbit.passes.registry import register
from lowbit.passes.reparam.common import annotate_calls, skip_reason
from lowbit.passes.selection import matches_any

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("int", "ternary", "binary")
SCALES: tuple[str, ...] = ("stat", "lsq", "fixed")
#: Floor of an LSQ step, so a step trained through zero cannot divide by zero.
MIN_STEP = 1e-5


class _StraightThrough(torch.autograd.Function):
    """Forward ``w_hat`` exactly; backward the gradient to ``w``, times ``mask`` if given (clipped STE)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, w_hat: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.has_mask = mask is not None
        return w_hat.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.has_mask:
            (mask,) = ctx.saved_tensors
            return grad * mask, None, None
        return grad, None, None


class _RoundSTE(torch.autograd.Function):
    """``round`` forward (half to even, as the grid), identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``g`` (LSQ's ``s·g + sg(s − s·g)``, exact forward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.g, None


def straight_through(weight: torch.Tensor, w_hat: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``w_hat`` in the forward; ``∂/∂weight = mask`` (clipped STE) or 1 everywhere (identity STE)."""
    return _StraightThrough.apply(weight, w_hat.detach(), mask)


def dequantize_codes(qw: QuantizedWeight) -> torch.Tensor:
    """``(q − zero)·scale`` per column in float32, the packed format's arithmetic without packing."""
    columns = qw.in_features
    scale = per_column(qw.scales, qw.group_size, columns)
    zero = packing.default_zero(qw.bits) if qw.zeros is None else per_column(qw.zeros, qw.group_size, columns)
    return (qw.codes.to(torch.float32) - zero) * scale


class WeightFakeQuant(nn.Module):
    """Weight parametrization: the fake-quantized weight of one layer (module doc); ``step`` is LSQ's."""

    def __init__(
        self,
        weight: torch.Tensor,
        fmt: str,
        bits: int,
        group_size: int,
        symmetric: bool,
        scale: str,
        latent_clip: float,
        name: str,
    ) -> None:
        super().__init__()
        self.format, self.scale, self.symmetric, self.latent_clip, self.layer = fmt, scale, symmetric, latent_clip, name
        self.bits = {"int": bits, "ternary": 2, "binary": 1}[fmt]
        weight = weight.flatten(1)
        columns = weight.shape[1]
        self.group_size = effective_group_size(group_size, columns) if fmt == "int" else columns
        self.step: nn.Parameter | None = None
        if scale == "lsq":
            w = checked_weight(weight, name)
            qp = 2 ** (self.bits - 1) - 1
            groups = nn.functional.pad(w.abs(), (0, -columns % self.group_size))
            counts = torch.full((w.shape[0], math.ceil(columns / self.group_size)), float(self.group_size))
            counts[:, -1] = columns - (counts.shape[1] - 1) * self.group_size
            mean = groups.reshape(w.shape[0], -1, self.group_size).sum(-1) / counts
            self.step = nn.Parameter((2 * mean / math.sqrt(qp)).clamp_min(MIN_STEP).to(weight.device))
            self.grad_scale = 1.0 / math.sqrt(w.numel() / self.step.numel() * qp)

    def quantized(self, weight: torch.Tensor) -> QuantizedWeight:
        """The codes, scales and zeros of ``weight`` (detached; a convolution's as its matrix) that the forward
        computes with."""
        w = weight.detach().flatten(1)
        if self.scale == "lsq":
            step = self.step.detach().clamp_min(MIN_STEP)
            k = self._lsq_levels(w.float(), per_column(step, self.group_size, w.shape[1]))
            codes = (k + 2 ** (self.bits - 1)).to(torch.uint8)
            return QuantizedWeight(codes, step.float().clone(), None, None, self.bits, self.group_size)
        if self.format == "int":
            return quantize_weight(w, self.bits, self.group_size, self.symmetric, name=self.layer)
        if self.format == "ternary":
            return ternary_quantize(w, "absmean", "per_tensor", name=self.layer)
        if self.scale == "fixed":
            checked = checked_weight(w, self.layer)
            scales = torch.full((w.shape[0], 1), 2.0 * self.latent_clip, device=w.device)
            return QuantizedWeight((checked >= 0).to(torch.uint8), scales, None, None, 1, w.shape[1])
        return binary_quantize(w, "per_channel", name=self.layer)

    def _lsq_levels(self, w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        qn, qp = 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        return _RoundSTE.apply(torch.clamp(w / step, -qn, qp))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = weight.flatten(1)
        if self.scale == "lsq":
            step = _GradScale.apply(self.step, self.grad_scale).clamp_min(MIN_STEP)
            step = per_column(step, self.group_size, matrix.shape[1])
            return (self._lsq_levels(matrix.float(), step) * step).to(weight.dtype).view_as(weight)
        qw = self.quantized(weight)
        mask = self._inside_grid(matrix, qw).view_as(weight) if self.format == "int" else None
        return straight_through(weight, dequantize_codes(qw).to(weight.dtype).view_as(weight), mask)

    def _inside_grid(self, weight: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        """Clipped STE mask: ``round(w/s) + z`` inside ``[0, 2^b − 1]``."""
        columns = weight.shape[1]
        scale = per_column(qw.scales, qw.group_size, columns)
        zero = packing.default_zero(qw.bits) if qw.zeros is None else per_column(qw.zeros, qw.group_size, columns)
        raw = torch.round(weight.detach().float() / scale) + zero
        return ((raw >= 0) & (raw <= (1 << qw.bits) - 1)).to(weight.dtype)

    def method(self) -> str:
        if self.scale == "lsq":
            return "lsq"
        return {"int": "ste", "ternary": "absmean", "binary": "binaryconnect"}[self.format]

    def extra_repr(self) -> str:
        return f"format={self.format}, bits={self.bits}, group_size={self.group_size}, scale={self.scale}"


def fake_quantizer_of(module: nn.Module) -> WeightFakeQuant | None:
    """The `WeightFakeQuant` on a layer's weight, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, WeightFakeQuant)), None)


def clip_latent_weights(model: nn.Module) -> int:
    """BinaryConnect's clip: clamp every binary layer's latent weight to ``[−H, H]`` in place; returns the count.

    Call it after each ``optimizer.step()`` (or use `attach_latent_clip`).
    """
    count = 0
    with torch.no_grad():
        for module in model.modules():
            quantizer = fake_quantizer_of(module)
            if quantizer is not None and quantizer.format == "binary":
                latent = module.parametrizations.weight.original
                latent.clamp_(-quantizer.latent_clip, quantizer.latent_clip)
                count += 1
    return count


def attach_latent_clip(optimizer: torch.optim.Optimizer, model: nn.Module) -> Callable[[], None]:
    """Run `clip_latent_weights` on ``model`` after every ``optimizer.step()``; returns a function that detaches it."""
    handle = optimizer.register_step_post_hook(lambda *_: clip_latent_weights(model))
    return handle.remove


@dataclass(frozen=True)
class FakeQuantConfig(PassConfig):
    """Options of the ``fake_quant`` pass."""

    format: str = option("int", choices=FORMATS, help="integer grid, BitNet ternary or BinaryConnect binary weights")
    bits: int = option(4, choices=GRID_BITS, help="code width of the int format")
    group_size: int = option(128, help="int format: input columns per scale; -1 = per-channel")
    symmetric: bool = option(True, help="int format: symmetric grid (no zero points)")
    scale: str = option(
        "stat",
        choices=SCALES,
        help="stat: the format's statistic; lsq: learnable step (int, symmetric); fixed: ±H (binary)",
    )
    latent_clip: float = option(
        1.0,
        min=0.0,
        min_exclusive=True,
        help="binary: BinaryConnect's H, the latent weight bound (and ±H with scale: fixed)",
    )
    ignore: tuple[str, ...] = option((), help="layers left in floating point: module paths or glob/re: patterns")

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if self.group_size != -1 and self.group_size < 1:
            raise PassConfigError(f"{pass_name}: group_size={self.group_size!r} is out of range; use -1 or >= 1")
        if self.scale == "lsq" and (self.format != "int" or not self.symmetric):
            raise PassConfigError(f"{pass_name}: scale='lsq' needs format='int' and symmetric=True (signed LSQ)")
        if self.scale == "fixed" and self.format != "binary":
            raise PassConfigError(f"{pass_name}: scale='fixed' only applies to format='binary', not {self.format!r}")


@register
class FakeQuantize(Pass):
    """Fake-quantize linear and convolution weights with a straight-through estimator for QAT (``convert_qat``
    packs them)."""

    name = "fake_quant"
    Config = FakeQuantConfig
    stage = "prepare"
    produces = frozenset({"fake_quant"})
    # Masked layers are no longer nn.Linear calls: bake masks in first (apply_masks).
    forbids = frozenset({"quant", "fake_quant", "sparsity"})
    pattern = "nn.Linear, nn.Conv1d, nn.Conv2d"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records: list[LayerRecord] = []
        found = list(layers(gm, (nn.Linear, nn.modules.conv._ConvNd)))
        self.bind_layers(gm, [path for path, _, _ in found])
        for path, module, nodes in found:
            if is_conv(module) and not isinstance(module, CONV_TYPES):
                records.append(LayerRecord(path, "skipped", unsupported_reason(gm, path) or ""))
                log.info("fake_quant: skipping %s: %s", path, records[-1].reason)
                continue
            reason = "ignored" if matches_any(path, self.config.ignore) else None
            reason = reason or skip_reason(gm, path, module) or unsupported_reason(gm, path)
            config = None if reason else self.config_for(path)
            if config is None:
                records.append(LayerRecord(path, "skipped", reason or "skipped by a per-layer override"))
                log.info("fake_quant: skipping %s: %s", path, records[-1].reason)
                continue
            quantizer = WeightFakeQuant(
                module.weight,
                config.format,
                config.bits,
                config.group_size,
                config.symmetric,
                config.scale,
                config.latent_clip,
                path,
            )
            if config.format == "binary":
                with torch.no_grad():
                    module.weight.clamp_(-config.latent_clip, config.latent_clip)
            parametrize.register_parametrization(module, "weight", quantizer)
            annotate_calls(nodes, path, fake_quant=FakeQuant(quantizer.bits, quantizer.group_size, quantizer.method()))
            records.append(
                LayerRecord(
                    path,
                    "fake_quantized",
                    stats={
                        "format": config.format,
                        "bits": quantizer.bits,
                        "group_size": quantizer.group_size,
                        "scale": config.scale,
                    },
                )
            )
        count = sum(r.action == "fake_quantized" for r in records)
        log.info("fake_quant: %d layer(s) fake-quantized, %d skipped", count, len(records) - count)
        return PassResult(
            changed=count > 0, layers=records, stats={"fake_quantized": count, "skipped": len(records) - count}
        )


__all__ = [
    "FakeQuantConfig",
    "FakeQuantize",
    "WeightFakeQuant",
    "attach_latent_clip",
    "clip_latent_weights",
    "dequantize_codes",
    "fake_quantizer_of",
    "straight_through",
]
