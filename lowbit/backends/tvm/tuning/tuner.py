"""The tuner: picks each low-bit kernel's knobs from the database, searching (and recording) missing ones.

A kernel (`lowbit.backends.tvm.kernels.spec.LinearKernel`) offers ``name``, ``knobs``,
``default_knobs(spec, target)`` and ``plan(spec, tensors, target, knobs)``. For a layer the
tuner looks up the record of (target, kernel, knob-space version, spec). Without
`TuningOptions` it only reads; with them it tunes a signature whose record has fewer
than ``trials`` measured candidates (and whose space is not exhausted): candidates from
`search.propose`, each planned, built and timed by a runner, its output checked against
the hand schedule's, and the record committed after every candidate, so an interrupted
tuning resumes where it stopped. Knob sets that give a structurally identical PrimFunc
reuse the earlier measurement.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm_ffi
from tvm import s_tir
from tvm.target import Target

from lowbit import progress
from lowbit.backends.tvm.kernels.spec import LinearKernel
from lowbit.backends.tvm.tuning.database import (
    SHIPPED_DIR,
    Trial,
    TuningDatabase,
    TuningRecord,
    signature_key,
)
from lowbit.backends.tvm.tuning.measure import (
    LocalRunner,
    MeasureOptions,
    RPCDevice,
    RPCRunner,
)
from lowbit.backends.tvm.tuning.search import grid, propose, space_version
from lowbit.errors import BackendError

log = logging.getLogger(__name__)

#: A candidate whose output differs from the hand schedule's by more than this (relative to its max) is wrong.
OUTPUT_TOLERANCE = 1e-3
#: When a search ends, the fastest ``FINALISTS`` candidates and the hand schedule are timed again in turn,
#: ``CONFIRM_ROUNDS`` rounds: one-off times taken minutes apart on a shared machine do not compare fairly.
FINALISTS = 3
CONFIRM_ROUNDS = 3


@dataclass(frozen=True)
class TuningOptions:
    """How to tune: ``trials`` measured candidates per kernel signature, at most ``max_seconds`` per compile.

    ``database`` is a cache directory overriding the compile's; ``rpc`` measures on a
    remote device instead of this machine; ``measure`` sets the timing repeats.
    """

    trials: int = 64
    max_seconds: float | None = None
    database: str | Path | None = None
    rpc: RPCDevice | None = None
    measure: MeasureOptions = MeasureOptions()

    @classmethod
    def of(cls, tune: Any) -> TuningOptions | None:
        """Options from a compile's ``tune=``: falsy → None (no tuning), True → defaults, a mapping or an
        object with ``trials``/``max_seconds``/``database`` (a recipe's ``tune`` block) → those values."""
        if not tune:
            return None
        if tune is True:
            return cls()
        if isinstance(tune, cls):
            return tune
        if isinstance(tune, Mapping):
            values = dict(tune)
        elif dataclasses.is_dataclass(tune) and hasattr(tune, "trials"):
            values = {f.name: getattr(tune, f.name) for f in dataclasses.fields(cls) if hasattr(tune, f.name)}
        else:
            raise BackendError(
                f"tune= takes None, a bool, a mapping of tuning options or TuningOptions, "
                f"not {type(tune).__name__} {tune!r}"
            )
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BackendError(
                f"unknown tuning option(s) {unknown}; the options are {[f.name for f in dataclasses.fields(cls)]}"
            )
        options = cls(**values)
        if isinstance(options.trials, bool) or not isinstance(options.trials, int) or options.trials < 0:
            raise BackendError(f"tuning option trials must be an integer >= 0, got {options.trials!r}")
        if options.max_seconds is not None and not options.max_seconds > 0:
            raise BackendError(f"tuning option max_seconds must be > 0 or None, got {options.max_seconds!r}")
        return options


@dataclass(frozen=True)
class TuningResult:
    """What the tuner chose for one signature: knobs, their time, the hand schedule's, trials run now."""

    kernel: str
    spec: dict[str, Any]
    knobs: dict[str, int]
    seconds: float | None
    hand_seconds: float | None
    measured_now: int


@dataclass
class Tuner:
    """Knob choice for the kernels of one compile (one target); ``options`` None means read-only."""

    target: Target
    cache_dir: str | Path | None = None
    options: TuningOptions | None = None
    runner: Any = None
    shipped: tuple[str | Path, ...] = (SHIPPED_DIR,)
    results: list[TuningResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        directory = self.options.database if self.options and self.options.database else self.cache_dir
        self.database = TuningDatabase(self.target, directory, self.shipped)
        budget = self.options.max_seconds if self.options else None
        self._deadline = time.monotonic() + budget if budget else None
        self._chosen: dict[str, dict[str, int] | None] = {}
        self.measured = 0

    def knobs(
        self, kernel: LinearKernel, spec: Any, tensors: Mapping[str, torch.Tensor | None]
    ) -> dict[str, int] | None:
        """The best recorded knobs for a layer (tuning first when enabled and unfinished); None: hand schedule.

        Layers of one signature share the answer: it is looked up (or tuned) once per tuner.
        """
        key = self._key(kernel, spec)
        if key not in self._chosen:
            record = self.database.get(key)
            before = self.measured
            if self.options is not None and self._unfinished(record):
                record = self.tune(kernel, spec, tensors)
            best = record.best if record else None
            if record is not None:
                self._report(kernel, record, best, spec, self.measured - before)
            self._chosen[key] = dict(best.knobs) if best else None
        chosen = self._chosen[key]
        return dict(chosen) if chosen is not None else None

    def tune(self, kernel: LinearKernel, spec: Any, tensors: Mapping[str, torch.Tensor | None]) -> TuningRecord:
        """Search ``kernel``'s knobs for ``spec`` until the trial budget, the time budget or the space runs out."""
        trials = self.options.trials if self.options else 0
        key = self._key(kernel, spec)
        found = self.database.get(key)
        record = (
            dataclasses.replace(found, trials=list(found.trials))
            if found
            else TuningRecord(kernel.name, space_version(kernel.knobs), record_spec(spec))
        )
        default = kernel.default_knobs(spec, self.target)
        size = len(grid(kernel.knobs))
        reference: list[np.ndarray] = []
        log.info(
            "tuning %s for %s: %d of %d trials recorded, space of %d",
            record.kernel,
            record.spec,
            record.counted,
            trials,
            size,
        )
        with progress.bar(trials, f"tuning {record.kernel}", initial=min(record.counted, trials)) as shown:
            while record.counted < trials and not record.exhausted:
                if self._deadline is not None and time.monotonic() > self._deadline:
                    log.warning(
                        "tuning time budget (max_seconds=%s) spent: %s keeps its best of %d trials",
                        self.options.max_seconds if self.options else None,
                        record.kernel,
                        record.counted,
                    )
                    break
                knobs = propose(kernel.knobs, default, record.trials, key)
                if knobs is None:
                    record.exhausted = True
                else:
                    with self._stopping(record, trials):
                        new = self._trial(kernel, spec, tensors, knobs, default, record, reference)
                    # a new candidate may be a finalist: the finalists are chosen and timed again at the end
                    record.trials = [dataclasses.replace(t, confirmed=False) for t in record.trials] + [new]
                    shown.update(int(new.counted))
                self.database.commit(record)
                if knobs is not None:
                    self._log_trial(record, trials)
        if (record.exhausted or record.counted >= trials) and not record.confirmed:
            with self._stopping(record, trials):
                self._confirm(kernel, spec, tensors, record, default)
        return record

    @contextmanager
    def _stopping(self, record: TuningRecord, trials: int) -> Iterator[None]:
        """A runner failure (device lost, unreachable or not answering) stops tuning with a `BackendError`
        that says what is kept: the trials committed so far, which the next tuning resumes from."""
        try:
            yield
        except BackendError as error:
            where = self.database.path or "memory (no cache directory)"
            raise BackendError(
                f"tuning {record.kernel} {record.spec} stopped after {record.counted} of {trials} "
                f"trial(s), which are kept in {where}; tuning again resumes from them. "
                f"{error}"
            ) from error

    def close(self) -> None:
        """Release the runner (an RPC session)."""
        if self.runner is not None:
            self.runner.close()

    def _trial(
        self,
        kernel: LinearKernel,
        spec: Any,
        tensors: Mapping[str, torch.Tensor | None],
        knobs: dict[str, int],
        default: Mapping[str, int],
        record: TuningRecord,
        reference: list[np.ndarray],
    ) -> Trial:
        """Plan, build, time and check one candidate."""
        try:
            planned = kernel.plan(spec, tensors, self.target, knobs=knobs)
        except (BackendError, ValueError, s_tir.ScheduleError) as error:
            return Trial(knobs, "invalid", error=_first_line(error))
        func_hash = str(tvm_ffi.structural_hash(planned.func))
        same = next((t for t in record.trials if t.func_hash == func_hash and t.counted), None)
        if same is not None:
            return Trial(knobs, "duplicate", same.seconds, same.error, func_hash)
        try:
            measured = self._runner().measure(planned.func, planned.consts)
        except (RuntimeError, ValueError, TypeError, s_tir.ScheduleError) as error:  # how TVM reports build errors
            log.warning("%s %s failed to build or run: %s", record.kernel, knobs, _first_line(error))
            return Trial(knobs, "failed", error=_first_line(error), func_hash=func_hash)
        finally:
            self.measured += 1
        wrong = self._check(kernel, spec, tensors, knobs, default, measured.output, reference)
        if wrong:
            log.warning("%s %s: %s", record.kernel, knobs, wrong)
            return Trial(knobs, "failed", error=wrong, func_hash=func_hash)
        return Trial(knobs, "measured", measured.seconds, func_hash=func_hash)

    def _confirm(
        self,
        kernel: LinearKernel,
        spec: Any,
        tensors: Mapping[str, torch.Tensor | None],
        record: TuningRecord,
        default: Mapping[str, int],
    ) -> None:
        """Time the finalists (fastest candidates and the hand schedule) side by side and mark them confirmed:
        the best is chosen among them, never by a one-off time from another moment."""
        timed = sorted((t for t in record.trials if t.outcome == "measured"), key=lambda t: t.seconds)
        finalists = timed[:FINALISTS] + [t for t in timed[FINALISTS:] if t.knobs == dict(default)]
        if len(finalists) > 1:
            plans = [kernel.plan(spec, tensors, self.target, knobs=t.knobs) for t in finalists]
            seconds = self._runner().compare([(p.func, p.consts) for p in plans], CONFIRM_ROUNDS)
            log.info(
                "tuning %s: finalists timed again in turn: %s",
                record.kernel,
                ", ".join(f"{t.knobs} {s * 1e3:.3f} ms" for t, s in zip(finalists, seconds)),
            )
        else:
            seconds = [t.seconds for t in finalists]
        by_hash = {t.func_hash: s for t, s in zip(finalists, seconds)}
        record.trials = [
            dataclasses.replace(t, seconds=by_hash[t.func_hash], confirmed=True)
            if t.func_hash in by_hash and t.seconds is not None
            else t
            for t in record.trials
        ]
        self.database.commit(record)

    def _check(
        self,
        kernel: LinearKernel,
        spec: Any,
        tensors: Mapping[str, torch.Tensor | None],
        knobs: dict[str, int],
        default: Mapping[str, int],
        output: np.ndarray,
        reference: list[np.ndarray],
    ) -> str | None:
        """Why ``output`` is wrong compared with the hand schedule's output (computed once), or None."""
        if knobs == dict(default):
            reference[:] = [output]
            return None
        if not reference:
            try:
                planned = kernel.plan(spec, tensors, self.target, knobs=dict(default))
            except BackendError:
                return None  # the hand schedule itself is refused: nothing to compare with
            reference.append(self._runner().output(planned.func, planned.consts))
        expected = reference[0]
        error = float(np.max(np.abs(output.astype(np.float64) - expected))) if output.size else 0.0
        scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
        return (
            None
            if error <= OUTPUT_TOLERANCE * scale
            else (f"output differs from the hand schedule's by {error:.3g} (max |y| {scale:.3g}): rejected")
        )

    def _runner(self) -> Any:
        if self.runner is None:
            measure = self.options.measure if self.options else MeasureOptions()
            rpc = self.options.rpc if self.options else None
            self.runner = RPCRunner(self.target, rpc, measure) if rpc else LocalRunner(self.target, measure)
        return self.runner

    def _unfinished(self, record: TuningRecord | None) -> bool:
        trials = self.options.trials if self.options else 0
        return trials > 0 and (
            record is None or not record.confirmed or (not record.exhausted and record.counted < trials)
        )

    def _key(self, kernel: LinearKernel, spec: Any) -> str:
        return signature_key(kernel.name, space_version(kernel.knobs), record_spec(spec))

    def _log_trial(self, record: TuningRecord, trials: int) -> None:
        last, best = record.trials[-1], record.best
        if not last.counted:  # refused knobs or a duplicate PrimFunc: nothing built, no trial used
            log.debug("tuning %s: %s %s: %s", record.kernel, last.outcome, last.knobs, last.error or "same PrimFunc")
            return
        outcome = f"{last.seconds * 1e3:.3f} ms" if last.seconds is not None else f"{last.outcome}: {last.error}"
        log.info(
            "tuning %s: trial %d/%d %s -> %s (best %s)",
            record.kernel,
            record.counted,
            trials,
            last.knobs,
            outcome,
            f"{best.seconds * 1e3:.3f} ms {best.knobs}" if best else "none yet",
        )

    def _report(
        self, kernel: LinearKernel, record: TuningRecord, best: Trial | None, spec: Any, measured_now: int
    ) -> None:
        default = kernel.default_knobs(spec, self.target)
        hand = next((t.seconds for t in record.trials if t.knobs == default), None)
        self.results.append(
            TuningResult(
                record.kernel,
                record.spec,
                dict(best.knobs) if best else dict(default),
                best.seconds if best else hand,
                hand,
                measured_now,
            )
        )


#: Spec fields added after records were shipped, left out of a record's spec while unset (False or empty), so those
#: records keep their keys (a `PackedLinearSpec.row_blocks` kernel is never tuned, nor a convolution's epilogue).
UNSET_SPEC_FIELDS = ("row_blocks", "epilogue")


def record_spec(spec: Any) -> dict[str, Any]:
    """``spec`` as tuning records store and key it."""
    data = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec)
    return {k: v for k, v in data.items() if not (k in UNSET_SPEC_FIELDS and v in (False, ()))}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["OUTPUT_TOLERANCE", "UNSET_SPEC_FIELDS", "Tuner", "TuningOptions", "TuningResult", "record_spec"]
