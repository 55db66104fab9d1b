"""The pass API: a pass is a small class with a frozen config and declared requirements.

A pass declares, as class attributes, what the pipeline needs to order it safely:

- ``stage``: ``"prepare"`` (training-time), ``"convert"`` (deploy-time) or ``"any"``.
- ``requires_calibration``: it reads calibration batches from the context.
- ``requires``: names of passes that must have run earlier in the same pipeline.
- ``produces`` / ``consumes``: annotation kinds (fields of `LowbitMeta`) it adds / folds away.
- ``forbids``: annotation kinds that must not be active on the graph when it runs.
- ``after_pack``: it may run once weights are packed (lowering, packing other layers).
- ``pattern``: what the pass matches in a graph (e.g. ``nn.Linear``); a run that matches
  nothing is reported, not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch.fx as fx
import torch.nn as nn

from lowbit import progress
from lowbit.calibration import CalibrationSet
from lowbit.errors import CalibrationError, PassConfigError
from lowbit.passes.config import PassConfig
from lowbit.passes.selection import SKIP, LayerOverrides

log = logging.getLogger("lowbit.passes")

T = TypeVar("T")


@dataclass
class LayerRecord:
    """What a pass did to one layer: ``action`` is e.g. "quantized" or "skipped"."""

    layer: str
    action: str
    reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    """The record a pass returns; the pipeline fills in ``name`` and ``time_s``."""

    changed: bool
    layers: list[LayerRecord] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    time_s: float = 0.0

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.action == "skipped"]


@dataclass
class PassContext:
    """What a pass may read besides the graph: example inputs, calibration, progress.

    ``calibration`` is the validated `CalibrationSet` the pipeline built once from the data it
    was given, or None; passes read it through `require_calibration`.
    """

    example_inputs: tuple = ()
    example_kwargs: Mapping[str, Any] = field(default_factory=dict)
    calibration: CalibrationSet | None = None
    progress_every: float = 10.0

    def require_calibration(self, pass_name: str, message: str = "") -> CalibrationSet:
        """The calibration set; without one a `CalibrationError` with ``message``, or one naming ``pass_name``."""
        if self.calibration is None:
            raise CalibrationError(
                message
                or f"{pass_name} needs calibration data: pass calibration= batches shaped like the example inputs"
            )
        return self.calibration

    def progress(self, items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """Yield ``items``, logging progress through `logging` about every ``progress_every`` seconds (and
        drawing a bar where `lowbit.progress` draws one)."""
        import time

        items = list(items) if total is None and not hasattr(items, "__len__") else items
        total = total if total is not None else len(items)  # type: ignore[arg-type]
        start = last = time.perf_counter()
        with progress.bar(total, desc) as shown:
            for index, item in enumerate(items, 1):
                yield item
                shown.update()
                now = time.perf_counter()
                if now - last >= self.progress_every or index == total:
                    if now - start >= self.progress_every:
                        log.info("%s: %d/%d (%.0f s)", desc, index, total, now - start)
                    last = now


class Pass:
    """Base class of every pass. Subclasses set ``name``, ``Config`` and implement `run`."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    stage: ClassVar[str] = "convert"
    requires_calibration: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[frozenset[str]] = frozenset()
    consumes: ClassVar[frozenset[str]] = frozenset()
    forbids: ClassVar[frozenset[str]] = frozenset()
    after_pack: ClassVar[bool] = False
    pattern: ClassVar[str] = ""

    def __init__(self, overrides: Mapping[str, Any] | None = None, **options: Any) -> None:
        self.config = self.Config.from_options(self.name, options)
        self.overrides = LayerOverrides.from_mapping(overrides)
        #: ``self.overrides`` and their positional keys bound to the layers of the graph being run (`bind_layers`).
        self._bound: tuple[LayerOverrides, LayerOverrides] | None = None
        for key, value in self.overrides.rules:
            if value != SKIP:
                if not isinstance(value, Mapping):
                    raise PassConfigError(f"{self.name}: override for '{key}' must be a mapping of options or 'skip'")
                self.config.replace(self.name, value)

    def config_for(self, layer: str) -> PassConfig | None:
        """The config for ``layer`` after per-layer overrides, or None if it is skipped."""
        bound = self._bound[1] if self._bound is not None and self._bound[0] is self.overrides else self.overrides
        override = bound.lookup(layer)
        if override == SKIP:
            return None
        if override is None:
            return self.config
        return self.config.replace(self.name, override)

    def warn_unused_overrides(self, layers: Iterable[str], what: str = "") -> None:
        """Log override keys that select none of ``layers``, so a typo does not go unnoticed."""
        unused = self.overrides.unused(list(layers))
        if unused:
            log.warning(
                "%s: per-layer overrides select no %s: %s",
                self.name,
                what or self.pattern or "layer",
                ", ".join(unused),
            )

    def bind_layers(self, gm: fx.GraphModule, layers: Iterable[str], what: str = "") -> None:
        """Point the positional override keys (``@first:conv``, ``@last``) at ``layers``, the module paths the pass
        matches in ``gm`` in graph order, and log override keys that select none of them (`warn_unused_overrides`)."""
        layers = list(layers)
        kinds = [(path, _kind(gm.get_submodule(path))) for path in layers]
        self._bound = (self.overrides, self.overrides.bind(kinds))
        self.warn_unused_overrides(layers, what)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.as_dict().items())
        return f"{type(self).__name__}({options})"


def _kind(module: object) -> str:
    """A layer's kind for positional override keys: ``"conv"``, ``"linear"`` (a packed layer's ``layer_kind``) or its
    class name."""
    packed = getattr(module, "layer_kind", None)
    if isinstance(packed, str):
        return packed
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return "linear" if isinstance(module, nn.Linear) else type(module).__name__


__all__ = ["LayerRecord", "Pass", "PassContext", "PassResult"]
