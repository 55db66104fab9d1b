"""Run passes in order: check their ordering first, verify and optionally dump after each."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.fx as fx

from lowbit import progress
from lowbit.calibration import CalibrationSet, calibration_set
from lowbit.errors import CalibrationError, PassOrderError
from lowbit.ir.annotations import graph_kinds
from lowbit.ir.printer import format_graph
from lowbit.ir.variants import check_batches
from lowbit.ir.verify import verify as verify_graph
from lowbit.passes.base import Pass, PassContext, PassResult
from lowbit.passes.registry import parse_spec

log = logging.getLogger("lowbit.pipeline")

# How to get rid of each annotation kind before a pass that forbids it.
_REMEDY = {
    "adapter": ("unmerged adapters", "merge_adapters"),
    "reparam": ("unfolded reparameterizations", "fold_reparam"),
    "fake_quant": ("fake-quantized (QAT) weights", "convert_qat"),
    "sparsity": ("pruning masks", "apply_masks"),
    "quant": ("packed weights", "a pipeline that does not pack them first"),
}


@dataclass
class PipelineReport:
    """Per-pass results in run order, with timing."""

    passes: list[PassResult] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(r.time_s for r in self.passes)

    def table(self) -> str:
        rows = [("pass", "time", "changed", "layers", "skipped", "stats")]
        for r in self.passes:
            done = sum(1 for rec in r.layers if rec.action != "skipped")
            stats = ", ".join(f"{k}={_short(v)}" for k, v in r.stats.items())
            rows.append(
                (r.name, f"{r.time_s:.2f}s", "yes" if r.changed else "no", str(done), str(len(r.skipped)), stats)
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [asdict(r) for r in self.passes], "total_s": self.total_s}


def check_order(passes: Sequence[Pass], state: Mapping[str, list[str]] | None = None) -> None:
    """Raise `PassOrderError` if running ``passes`` on a graph in ``state`` would break a rule.

    ``state`` maps active annotation kinds to the layers carrying them (see `graph_kinds`).
    The check simulates each pass's declared effect, so it runs before any work is done.
    """
    origin = {kind: f"the input graph ({_layers(layers)})" for kind, layers in (state or {}).items()}
    seen: list[str] = []
    for p in passes:
        for required in p.requires:
            if required not in seen:
                raise PassOrderError(f"pass '{p.name}' requires '{required}' to run earlier in the pipeline")
        if "quant" in origin and not p.after_pack:
            raise PassOrderError(
                f"pass '{p.name}' cannot run after weights are packed (by {origin['quant']}); "
                "only lowering and other packing passes may follow packing: move it earlier"
            )
        for kind in sorted(p.forbids & origin.keys()):
            what, remedy = _REMEDY.get(kind, (kind, "a pass that removes it"))
            raise PassOrderError(
                f"pass '{p.name}' cannot run while the graph carries {what} (from {origin[kind]}); "
                f"add '{remedy}' before '{p.name}'"
            )
        for kind in p.consumes:
            origin.pop(kind, None)
        for kind in p.produces:
            origin.setdefault(kind, f"'{p.name}'")
        seen.append(p.name)


class Pipeline:
    """An ordered list of passes run on a GraphModule.

    ``Pipeline([...])(gm)`` returns a transformed copy; the input graph is left as it was.
    ``verify`` runs the IR verifier after every pass; ``dump_dir`` receives the IR
    listing before the first pass and after each one. Results land in ``report``.
    """

    def __init__(
        self,
        passes: Sequence[Pass | str],
        verify: bool = True,
        dump_dir: str | Path | None = None,
        progress_every: float = 10.0,
    ) -> None:
        self.passes = [parse_spec(p) if isinstance(p, str) else p for p in passes]
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(
                    f"a pipeline takes Pass instances or pass specs (name:key=value,...), not {type(p).__name__}"
                )
        check_order(self.passes)
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.progress_every = progress_every
        self.report = PipelineReport()

    @property
    def requires_calibration(self) -> list[str]:
        return [p.name for p in self.passes if p.requires_calibration]

    def calibration_set(
        self, calibration: Any, example_inputs: tuple = (), example_kwargs: Mapping[str, Any] | None = None
    ) -> CalibrationSet | None:
        """``calibration`` (raw batches or a `CalibrationSet`) validated once against the example inputs.

        None when none is given and no pass needs it; `CalibrationError` when a pass needs it and
        none is given, or when raw batches do not match the example inputs (or come without them).
        """
        needing = self.requires_calibration
        if calibration is None:
            if needing:
                raise CalibrationError(
                    f"pass{'es' if len(needing) > 1 else ''} {', '.join(needing)} "
                    "need calibration data: pass calibration="
                )
            return None
        return calibration_set(calibration, example_inputs, example_kwargs)

    def __call__(
        self,
        gm: fx.GraphModule,
        *,
        calibration: Any = None,
        example_inputs: tuple = (),
        example_kwargs: Mapping[str, Any] | None = None,
    ) -> fx.GraphModule:
        """Run the passes on a copy of ``gm``; ``calibration`` is raw batches or a `CalibrationSet`, each batch of a
        shape ``gm`` runs (`lowbit.ir.variants.check_batches`: checked before any pass)."""
        check_order(self.passes, graph_kinds(gm.graph))
        ctx = PassContext(
            example_inputs=example_inputs,
            example_kwargs=example_kwargs or {},
            calibration=self.calibration_set(calibration, example_inputs, example_kwargs),
            progress_every=self.progress_every,
        )
        if ctx.calibration is not None and self.requires_calibration:
            check_batches(gm, ctx.calibration)
        gm = copy.deepcopy(gm)
        self.report = PipelineReport()
        self._dump(gm, 0, "input")
        with progress.bar(len(self.passes), "passes") as shown:
            for index, p in enumerate(self.passes, 1):
                log.info("pass %d/%d: %s", index, len(self.passes), p.name)
                shown.set_postfix_str(p.name)
                self._run(p, index, gm, ctx)
                shown.update()
        return gm

    def _run(self, p: Pass, index: int, gm: fx.GraphModule, ctx: PassContext) -> None:
        start = time.perf_counter()
        result = p.run(gm, ctx)
        gm.recompile()
        result.name, result.time_s = p.name, time.perf_counter() - start
        for record in result.skipped:
            log.info("%s skipped %s: %s", p.name, record.layer, record.reason)
        if not result.layers and not result.changed and p.pattern:
            log.warning("%s matched no layers (it applies to %s)", p.name, p.pattern)
        if self.verify:
            verify_graph(gm, after=p.name)
        self.report.passes.append(result)
        self._dump(gm, index, p.name)

    def _dump(self, gm: fx.GraphModule, index: int, name: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        stem = self.dump_dir / f"{index:02d}-{name}"
        stem.with_suffix(".txt").write_text(format_graph(gm) + "\n\n" + gm.code)
        if index:
            stem.with_suffix(".json").write_text(json.dumps(asdict(self.report.passes[-1]), indent=2, default=str))


def _layers(layers: list[str]) -> str:
    more = f" and {len(layers) - 2} more" if len(layers) > 2 else ""
    return ", ".join(layers[:2]) + more


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
