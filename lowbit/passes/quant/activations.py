"""``quantize_activations``: int8 inputs for every packed linear (W8A8, W4A8, W2A8, W1.58A8).

It runs after any weight quantizer and rewrites each ``lowbit.linear_packed`` call into
``lowbit.linear_packed_a8`` on the same packed weight, whose reference (`lowbit.ir.ops_a8`)
fixes the arithmetic; this pass only chooses the activation scale: dynamic per token (the
default, BitNet b1.58, no calibration) or one static step per layer from the calibration
batches (``absmax``, or a per-batch ``percentile`` averaged over batches); docs/methods.md
(BitNet b1.58) has the formulas. A packed convolution (``lowbit.conv_packed``) becomes
``lowbit.conv_packed_a8``, whose int8 input has one static per-tensor step (as ONNX Runtime's and
TFLite's int8 convolutions): it is calibrated whatever ``dynamic`` says, so with ``dynamic=true``
and no calibration data convolutions keep float activations, reported as skipped. Layers that are
not packed keep float activations and are reported as skipped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from lowbit.errors import CalibrationError, PassConfigError
from lowbit.ir import ops, ops_a8, ops_conv
from lowbit.ir.annotations import annotate, get_meta
from lowbit.ir.packing import PackedFormatError
from lowbit.ir.variants import fit_batches, run_batch
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.quant.rewrite import PackedConv, PackedLinear, layer_nodes
from lowbit.passes.registry import register
from lowbit.passes.selection import matches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationConfig(PassConfig):
    """Options of ``quantize_activations``."""

    bits: int = option(8, choices=(8,), help="activation code width (int8)")
    dynamic: bool = option(True, help="per-token scales at run time (true) or one calibrated scale per layer (false)")
    granularity: str | None = option(
        None,
        choices=(None, "per_token", "per_tensor"),
        help="per_token (dynamic) or per_tensor (static); default follows dynamic",
    )
    symmetric: bool = option(True, choices=(True,), help="symmetric int8 (the only form the op computes)")
    observer: str = option("absmax", choices=("absmax", "percentile"), help="static range: absmax or a percentile")
    percentile: float = option(99.99, min=0.0, max=100.0, min_exclusive=True, help="percentile of |x| (static only)")
    ignore: tuple[str, ...] = option((), help="layers whose activations stay float: module paths or patterns")

    @classmethod
    def from_options(cls, pass_name: str, options: Mapping[str, Any]) -> ActivationConfig:
        if "ignore" in options:
            entries = options["ignore"] if isinstance(options["ignore"], (list, tuple)) else (options["ignore"],)
            if all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in entries):
                options = {**options, "ignore": tuple(str(e) for e in entries)}
        return super().from_options(pass_name, options)

    def check(self, pass_name: str) -> None:
        super().check(pass_name)
        expected = "per_token" if self.dynamic else "per_tensor"
        if self.granularity not in (None, expected):
            raise PassConfigError(
                f"{pass_name}: granularity={self.granularity!r} needs dynamic={not self.dynamic}; "
                "supported: per_token with dynamic=true, per_tensor with dynamic=false"
            )
        if self.dynamic and self.observer != "absmax":
            raise PassConfigError(f"{pass_name}: observer={self.observer!r} applies to static scales (dynamic=false)")


class PackedLinearA8(PackedLinear):
    """A `PackedLinear` with int8 inputs; ``act_scale`` is the static step or None (dynamic)."""

    def __init__(self, packed: PackedLinear, act_scale: torch.Tensor | None) -> None:
        super().__init__(*packed.packed_args())
        ops_a8.check_act_scale(act_scale, "PackedLinearA8")
        self.register_buffer("act_scale", act_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops_a8.linear_packed_a8(x, *self.packed_args(), self.act_scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={'dynamic' if self.act_scale is None else 'static'}"


class PackedConvA8(PackedConv):
    """A `PackedConv` with int8 inputs of one static per-tensor step ``act_scale``."""

    def __init__(self, packed: PackedConv, act_scale: torch.Tensor) -> None:
        super().__init__(packed, packed.geometry)
        if act_scale is None:
            raise PackedFormatError("PackedConvA8: int8 convolution inputs take a static act_scale, got None")
        ops_a8.check_act_scale(act_scale, "PackedConvA8")
        self.register_buffer("act_scale", act_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops_conv.conv_packed_a8(x, *self.packed_args(), self.act_scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", act=static"


#: The packed ops this pass rewrites, with their int8-activation form and how many arguments precede ``act_scale``.
_A8_FORMS = {ops.linear_packed: (ops_a8.linear_packed_a8, 9), ops_conv.conv_packed: (ops_conv.conv_packed_a8, 14)}


@register
class QuantizeActivations(Pass):
    """int8 activations for every packed linear (dynamic per token, or static per tensor) and packed convolution
    (static per tensor)."""

    name = "quantize_activations"
    Config = ActivationConfig
    stage = "convert"
    forbids = frozenset({"adapter", "reparam", "fake_quant"})
    after_pack = True
    pattern = "lowbit.linear_packed, lowbit.conv_packed"

    def __init__(self, overrides: Mapping[str, Any] | None = None, **options: Any) -> None:
        super().__init__(overrides, **options)
        static_overrides = any(isinstance(v, Mapping) and v.get("dynamic") is False for _, v in self.overrides.rules)
        # An instance attribute: only static scales need calibration data.
        self.requires_calibration = not self.config.dynamic or static_overrides

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records = [
            LayerRecord(path, "skipped", "weight is not packed; run a weight quantizer before this pass")
            for _, path, _ in layer_nodes(gm)
        ]
        layers: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _A8_FORMS:
                layers.setdefault(get_meta(node).layer, []).append(node)
        self.bind_layers(gm, layers, "packed layer")
        configs: dict[str, ActivationConfig] = {}
        for path in layers:
            config = self.config_for(path)
            reason = next((f"ignored (matches '{p}')" for p in self.config.ignore if matches(path, p)), None)
            if not isinstance(gm.get_submodule(path), PackedLinear):
                reason = f"its packed weight is held by a {type(gm.get_submodule(path)).__name__}, not a PackedLinear"
            elif isinstance(gm.get_submodule(path), PackedConv) and ctx.calibration is None:
                reason = "int8 convolution inputs take a static per-tensor scale: pass calibration data to calibrate it"
            if config is None or reason:
                records.append(LayerRecord(path, "skipped", reason or "skipped by a per-layer override"))
            else:
                configs[path] = config
        static = {
            path: layers[path]
            for path, config in configs.items()
            if not config.dynamic or isinstance(gm.get_submodule(path), PackedConv)
        }
        ranges = self._calibrate(gm, static, configs, ctx) if static else {}
        for path in ctx.progress(list(configs), desc=self.name):
            records.append(self._rewrite(gm, path, layers[path], ranges.get(path)))
        gm.graph.lint()
        gm.recompile()
        for record in records:
            if record.action == "skipped":
                log.info("%s: skipping %s: %s", self.name, record.layer, record.reason)
        done = sum(r.action == "quantized" for r in records)
        return PassResult(
            changed=done > 0,
            layers=records,
            stats={"quantized": done, "static": len(static), "skipped": len(records) - done},
        )

    def _calibrate(
        self,
        gm: fx.GraphModule,
        static: dict[str, list[fx.Node]],
        configs: dict[str, ActivationConfig],
        ctx: PassContext,
    ) -> dict[str, float]:
        """The calibrated input range ``A`` of each static layer (module doc)."""
        batches = ctx.require_calibration(
            self.name,
            f"{self.name}: static activation scales (dynamic=false) need calibration data; layers: {', '.join(static)}",
        )
        observers = {path: _RangeObserver(path, configs[path]) for path in static}
        with _observing(gm, {node: observers[path] for path, nodes in static.items() for node in nodes}):
            for args, kwargs in ctx.progress(fit_batches(gm, batches), desc=f"{self.name} calibration"):
                for observer in observers.values():
                    observer.start_batch()
                run_batch(gm, args, kwargs)
                for observer in observers.values():
                    observer.end_batch()
        return {path: observer.value() for path, observer in observers.items()}

    def _rewrite(self, gm: fx.GraphModule, path: str, nodes: list[fx.Node], value: float | None) -> LayerRecord:
        """Swap the layer's module for a `PackedLinearA8` (`PackedConvA8`) and its op calls for their int8 form."""
        packed = gm.get_submodule(path)
        act_scale = (
            None if value is None else torch.tensor(max(value, ops_a8.ACT_ABSMAX_FLOOR) / 127.0, dtype=torch.float32)
        )
        a8 = PackedConvA8 if isinstance(packed, PackedConv) else PackedLinearA8
        module = a8(packed, act_scale).to(packed.qweight.device)
        gm.set_submodule(path, module)
        for node in nodes:
            target, count = _A8_FORMS[node.target]
            with gm.graph.inserting_before(node):
                scale_node = None if act_scale is None else gm.graph.get_attr(f"{path}.act_scale")
                new = gm.graph.create_node(
                    "call_function", target, (*node.args[:count], scale_node), name=f"{node.name}_a8"
                )
            new.meta = copy.copy(node.meta)
            meta = get_meta(node)
            annotate(new, layer=path, quant=dataclasses.replace(meta.quant, act_bits=8))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        stats: dict[str, Any] = {"act_bits": 8, "dynamic": act_scale is None}
        if act_scale is not None:
            stats.update(act_range=value, act_scale=float(act_scale))
        log.debug("%s: %s -> int8 %s activations", self.name, path, "dynamic" if act_scale is None else "static")
        return LayerRecord(path, "quantized", stats=stats)


class _RangeObserver:
    """Accumulates one layer's calibrated input range ``A`` (absmax or mean batch percentile)."""

    def __init__(self, layer: str, config: ActivationConfig) -> None:
        self.layer = layer
        self.config = config
        self.absmax = 0.0
        self.calls = 0
        self.percentiles: list[float] = []
        self._batch: list[torch.Tensor] = []

    def start_batch(self) -> None:
        self._batch = []

    def observe(self, x: torch.Tensor) -> None:
        magnitude = x.detach().to(torch.float32).abs().flatten()
        if not torch.isfinite(magnitude).all():
            raise CalibrationError(
                f"layer '{self.layer}': its calibration inputs contain NaN or Inf, so no activation scale exists; "
                "check the calibration data and the layers before it"
            )
        self.calls += 1
        if self.config.observer == "absmax":
            self.absmax = max(self.absmax, float(magnitude.max()) if magnitude.numel() else 0.0)
        else:
            self._batch.append(magnitude)

    def end_batch(self) -> None:
        if self._batch:
            values = torch.cat(self._batch)
            rank = max(1, math.ceil(self.config.percentile / 100.0 * values.numel()))
            self.percentiles.append(float(values.kthvalue(rank).values))
        self._batch = []

    def value(self) -> float:
        if not self.calls:
            raise CalibrationError(f"layer '{self.layer}': no calibration batch reached this layer")
        if self.config.observer == "absmax":
            return self.absmax
        return sum(self.percentiles) / len(self.percentiles)


@contextlib.contextmanager
def _observing(gm: fx.GraphModule, observers: dict[fx.Node, _RangeObserver]) -> Iterator[None]:
    """Run ``gm`` with each observed packed node reporting its input first (eval, no grad)."""
    originals = {node: node.target for node in observers}
    for node, observer in observers.items():
        node.target = _observed_op(observer, node.target)
    training = gm.training
    gm.recompile()
    gm.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for node, target in originals.items():
            node.target = target
        gm.recompile()
        gm.train(training)


def _observed_op(observer: _RangeObserver, target: Any) -> Any:
    def packed_observed(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        observer.observe(x)
        return target(x, *rest)

    return packed_observed


__all__ = ["ActivationConfig", "PackedConvA8", "PackedLinearA8", "QuantizeActivations"]
