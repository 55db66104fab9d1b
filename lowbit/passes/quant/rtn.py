"""``rtn``: round-to-nearest weight-only quantization of every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

Each weight (a convolution's as its matrix ``(C_out, C_in/groups · prod(kernel))``) is rounded to its
per-group GPTQ grid (`lowbit.passes.quant.grid`) without calibration data, packed, and the layer is
replaced by a ``lowbit.linear_packed`` (``conv_packed``) call (`lowbit.passes.quant.rewrite`). It is
the baseline the calibrated quantizers (GPTQ, AWQ) are measured against, and a good default for
8-bit weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from lowbit.errors import PassConfigError
from lowbit.ir.annotations import QuantScheme
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.quant.grid import quantize_weight, relative_error
from lowbit.passes.quant.rewrite import layer_nodes, replace_layer, skip_reason, weight_matrix
from lowbit.passes.registry import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RTNConfig(PassConfig):
    """Options of the ``rtn`` pass."""

    bits: int = option(4, choices=(2, 3, 4, 8), help="weight code width")
    group_size: int = option(128, help="input columns per scale; -1 = per-channel (one scale per output row)")
    symmetric: bool = option(True, help="symmetric grid (no stored zero points) instead of asymmetric")
    ignore: tuple[str, ...] = option((), help="layers left in floating point: module paths or glob/re: patterns")

    @classmethod
    def from_options(cls, pass_name: str, options: Mapping[str, Any]) -> RTNConfig:
        if "ignore" in options:
            options = {**options, "ignore": _layer_names(options["ignore"])}
        return super().from_options(pass_name, options)

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        if self.group_size != -1 and self.group_size < 1:
            raise PassConfigError(
                f"{pass_name}: group_size={self.group_size!r} is out of range; use -1 (per-channel) or a width >= 1"
            )


@register
class RTN(Pass):
    """Round-to-nearest weight quantization of every linear and convolution not ignored or skipped."""

    name = "rtn"
    Config = RTNConfig
    stage = "convert"
    produces = frozenset({"quant"})
    forbids = frozenset({"adapter", "reparam", "fake_quant", "sparsity"})
    after_pack = True
    pattern = "nn.Linear, nn.Conv1d, nn.Conv2d"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = unique_layers(gm)
        self.bind_layers(gm, [path for _, path in layers])
        records = [self._quantize_layer(gm, node, path) for node, path in ctx.progress(layers, desc="rtn")]
        gm.graph.lint()
        gm.recompile()
        quantized = sum(r.action == "quantized" for r in records)
        return PassResult(
            changed=quantized > 0,
            layers=records,
            stats={"quantized": quantized, "skipped": len(records) - quantized},
        )

    def _quantize_layer(self, gm: fx.GraphModule, node: fx.Node, path: str) -> LayerRecord:
        """Quantize and replace one layer, or return a "skipped" record saying why not."""
        reason = skip_reason(gm, path, self.config.ignore)
        config = None if reason else self.config_for(path)
        if config is None:
            reason = reason or "skipped by a per-layer override"
            log.info("rtn: skipping %s: %s", path, reason)
            return LayerRecord(path, "skipped", reason)
        weight = weight_matrix(gm.get_submodule(path))
        qw = quantize_weight(weight, config.bits, config.group_size, config.symmetric, name=path)
        error = relative_error(weight, qw.dequantize())
        scheme = QuantScheme(bits=qw.bits, group_size=qw.group_size, symmetric=config.symmetric, method=self.name)
        replace_layer(gm, node, qw, scheme, recompile=False)
        log.debug("rtn: %s -> %s, relative error %.3g", path, scheme.describe(), error)
        return LayerRecord(path, "quantized", stats={"bits": qw.bits, "group_size": qw.group_size, "rel_error": error})


def _layer_names(value: Any) -> Any:
    """Module paths as strings: YAML reads an ``nn.Sequential`` child's name (``[2]``) as an int."""
    entries = value if isinstance(value, (list, tuple)) else (value,)
    if all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in entries):
        return tuple(str(e) for e in entries)
    return value


def unique_layers(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """One (first call) node per linear or convolution module path; `replace_layer` rewrites every call."""
    seen: dict[str, fx.Node] = {}
    for node, path, _ in layer_nodes(gm):
        seen.setdefault(path, node)
    return [(node, path) for path, node in seen.items()]


__all__ = ["RTN", "RTNConfig", "unique_layers"]
