"""Tuning database and search: records, resume after interruption, corruption handling, shipped layer, budgets.

Most tests time candidates with a fake runner (a deterministic time per PrimFunc, no
build) so they check the bookkeeping exactly and fast; the last ones compile a small
model through `lowbit.compile` with real measurements.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm.target import Target

import lowbit
from lowbit.backends.tvm.kernels.generic import packed_linear
from lowbit.backends.tvm.kernels.spec import PackedLinearSpec
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.tuning import (
    CACHE_ENV,
    SHIPPED_DIR,
    Tuner,
    TuningDatabase,
    TuningOptions,
    default_cache_dir,
    measure,
)
from lowbit.backends.tvm.tuning.database import canonical_target, database_file_name, read_database
from lowbit.backends.tvm.tuning.measure import Measurement
from lowbit.backends.tvm.tuning.search import grid, propose
from lowbit.errors import BackendError
from lowbit.passes.quant.rtn import RTN

from helpers import TwoLayerMLP

SPEC = PackedLinearSpec(
    batch=2, in_features=128, out_features=32, bits=4, group_size=64, asymmetric=False, has_bias=True
)
TENSORS = {
    "qweight": torch.randint(0, 256, (32, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
    "scales": torch.full((32, 2), 0.5),
    "zeros": None,
    "g_idx": None,
    "bias": torch.zeros(32),
}


class FakeRunner:
    """Times a candidate by its PrimFunc's structural hash (deterministic); can stop after ``stop_after`` calls."""

    def __init__(self, stop_after: int | None = None, wrong: bool = False) -> None:
        self.calls: list[int] = []
        self.outputs = 0
        self.compared: list[int] = []
        self.stop_after = stop_after
        self.wrong = wrong

    def measure(self, func, consts) -> Measurement:
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        digest = tvm_ffi.structural_hash(func)
        self.calls.append(digest)
        output = np.zeros((SPEC.batch, SPEC.out_features), np.float32)
        if self.wrong and len(self.calls) > 1:
            output += 1.0
        return Measurement(1e-3 + (digest % 997) * 1e-6, output)

    def compare(self, kernels, rounds: int) -> list[float]:
        self.compared.append(len(kernels))
        return [1e-3 + (tvm_ffi.structural_hash(func) % 997) * 1e-6 for func, _ in kernels]

    def output(self, func, consts) -> np.ndarray:
        self.outputs += 1
        return np.zeros((SPEC.batch, SPEC.out_features), np.float32)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def target() -> Target:
    return resolve_target("x86")


def tuner(target: Target, cache: Path, trials: int | None = 4, runner=None, **options) -> Tuner:
    opts = TuningOptions(trials=trials, **options) if trials is not None else None
    return Tuner(target, cache, opts, runner=runner, shipped=())


def record_of(target: Target, cache: Path):
    (record,) = TuningDatabase(target, cache, shipped=()).records()
    return record


def test_tuning_records_best_knobs_and_a_second_tuner_measures_nothing(target, tmp_path):
    runner = FakeRunner()
    knobs = tuner(target, tmp_path, 4, runner).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    record = record_of(target, tmp_path)
    assert record.counted == len(runner.calls) == 4
    assert record.trials[0].knobs == packed_linear.KERNEL.default_knobs(SPEC, target)  # the hand schedule comes first
    assert knobs == record.best.knobs
    assert min(t.seconds for t in record.trials if t.seconds is not None) == record.best.seconds
    assert record.confirmed and runner.compared in ([3], [4])  # the three fastest and the hand schedule, again
    assert record.best.confirmed and sum(t.confirmed for t in record.trials if t.outcome == "measured") in (3, 4)

    again = FakeRunner()
    second = tuner(target, tmp_path, 4, again)
    assert second.knobs(packed_linear.KERNEL, SPEC, TENSORS) == knobs
    assert again.calls == [] and second.results[0].measured_now == 0
    assert tuner(target, tmp_path, None).knobs(packed_linear.KERNEL, SPEC, TENSORS) == knobs  # read-only lookup


def test_structurally_identical_candidates_are_not_measured_twice(target, tmp_path):
    runner = FakeRunner()
    tuner(target, tmp_path, 100, runner).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    record = record_of(target, tmp_path)
    assert record.exhausted and len(record.trials) == len(grid(packed_linear.KERNEL.knobs))
    assert len(set(runner.calls)) == len(runner.calls) == record.counted
    duplicates = [t for t in record.trials if t.outcome == "duplicate"]
    assert duplicates and all(t.seconds is not None for t in duplicates)  # batch 2: row tiles 2, 4, 8 are one kernel


def test_interrupted_tuning_resumes_where_it_stopped(target, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        tuner(target, tmp_path / "a", 6, FakeRunner(stop_after=3)).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    first = record_of(target, tmp_path / "a")
    assert first.counted == 3

    resumed = FakeRunner()
    tuner(target, tmp_path / "a", 6, resumed).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    assert len(resumed.calls) == 3 and resumed.outputs == 1  # the missing trials; the hand output to check them
    assert not {t.func_hash for t in first.trials} & {str(h) for h in resumed.calls}
    straight = FakeRunner()
    tuner(target, tmp_path / "b", 6, straight).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    done = record_of(target, tmp_path / "a")
    assert [t.knobs for t in done.trials] == [t.knobs for t in record_of(target, tmp_path / "b").trials]
    kept = [(t.knobs, t.outcome, t.seconds, t.func_hash) for t in done.trials[: len(first.trials)]]
    assert kept == [(t.knobs, t.outcome, t.seconds, t.func_hash) for t in first.trials]  # nothing measured again


def test_more_trials_later_continue_the_record(target, tmp_path):
    tuner(target, tmp_path, 2, FakeRunner()).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    more = FakeRunner()
    tuner(target, tmp_path, 5, more).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    assert len(more.calls) == 3 and record_of(target, tmp_path).counted == 5


def _database_file(tmp_path: Path) -> Path:
    (path,) = (tmp_path / "tuning").glob("*.json")
    return path


def _truncate(path: Path) -> None:
    path.write_text(path.read_text()[: len(path.read_text()) // 2])


def _edit_time(path: Path) -> None:
    data = json.loads(path.read_text())
    data["records"][0]["trials"][0]["seconds"] = 1e-12
    path.write_text(json.dumps(data))


def _other_schema(path: Path) -> None:
    data = json.loads(path.read_text())
    data["schema"] = 99
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "corrupt, message",
    [(_truncate, "not valid JSON"), (_edit_time, "checksum mismatch"), (_other_schema, "schema version 99")],
)
def test_corrupt_database_is_moved_aside_with_a_warning_and_rebuilt(target, tmp_path, caplog, corrupt, message):
    tuner(target, tmp_path, 2, FakeRunner()).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    path = _database_file(tmp_path)
    corrupt(path)
    runner = FakeRunner()
    with caplog.at_level(logging.WARNING, logger="lowbit.backends.tvm.tuning"):
        tuner(target, tmp_path, 2, runner).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    assert any(message in r.getMessage() and "moved it to" in r.getMessage() for r in caplog.records)
    assert len(runner.calls) == 2  # nothing of the bad file was used
    assert len(list((tmp_path / "tuning").glob("*.corrupt-*"))) == 1
    assert read_database(path, canonical_target(target))  # the rebuilt file is valid


def test_shipped_database_is_a_read_only_layer(target, tmp_path, caplog):
    shipped = tmp_path / "shipped"
    tuner(target, shipped.parent / "build", 3, FakeRunner()).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    shipped.mkdir()
    source = _database_file(shipped.parent / "build")
    (shipped / source.name).write_text(source.read_text())

    runner = FakeRunner()
    user = tmp_path / "user"
    knobs = Tuner(target, user, TuningOptions(trials=3), runner=runner, shipped=(shipped,)).knobs(
        packed_linear.KERNEL, SPEC, TENSORS
    )
    assert runner.calls == [] and knobs == record_of(target, shipped.parent / "build").best.knobs
    assert not (user / "tuning").exists()

    Tuner(target, user, TuningOptions(trials=5), runner=runner, shipped=(shipped,)).knobs(
        packed_linear.KERNEL, SPEC, TENSORS
    )
    assert len(runner.calls) == 2  # continues from the shipped trials, into the user's file
    assert (shipped / source.name).read_text() == source.read_text()
    assert record_of(target, user).counted == 5

    _truncate(shipped / source.name)
    with caplog.at_level(logging.WARNING, logger="lowbit.backends.tvm.tuning"):
        Tuner(target, tmp_path / "other", None, shipped=(shipped,)).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    assert any("ignoring the shipped tuning database" in r.getMessage() for r in caplog.records)
    assert (shipped / source.name).exists()


def test_wrong_outputs_and_refused_knobs_are_recorded_never_chosen(target, tmp_path):
    class Refusing(packed_linear.PackedLinear):
        name = "refusing"

        def build(self, spec, tensors, target, knobs):
            if knobs["out_tile"] == 64:
                raise BackendError("out_tile 64 refused")
            return super().build(spec, tensors, target, knobs)

    kernel = Refusing()
    knobs = tuner(target, tmp_path, 100, FakeRunner(wrong=True)).knobs(kernel, SPEC, TENSORS)
    record = record_of(target, tmp_path)
    assert knobs == packed_linear.KERNEL.default_knobs(SPEC, target)
    outcomes = {t.outcome for t in record.trials}
    assert outcomes == {"measured", "failed", "invalid", "duplicate"}
    assert all("differs from the hand schedule" in t.error for t in record.trials if t.outcome == "failed")
    assert sum(t.outcome == "invalid" for t in record.trials) == len(packed_linear.KERNEL.knobs["row_tile"])


def test_time_budget_stops_tuning_with_a_warning(target, tmp_path, caplog):
    runner = FakeRunner()
    with caplog.at_level(logging.WARNING, logger="lowbit.backends.tvm.tuning"):
        knobs = tuner(target, tmp_path, 10, runner, max_seconds=1e-9).knobs(packed_linear.KERNEL, SPEC, TENSORS)
    assert knobs is None and runner.calls == []
    assert any("time budget" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "tune, key",
    [
        ({"trails": 3}, "trails"),
        ({"trials": -1}, "trials"),
        ({"trials": True}, "trials"),
        ({"max_seconds": 0}, "max_seconds"),
        ("meta_schedule", "tune= takes"),
    ],
)
def test_bad_tuning_options_name_the_key(tune, key):
    with pytest.raises(BackendError, match=key):
        TuningOptions.of(tune)


def test_tuning_options_from_a_recipe_block():
    recipe = lowbit.recipes.load("w4a16-x86")
    options = TuningOptions.of(recipe.tune)
    assert (options.trials, options.max_seconds) == (recipe.tune.trials, recipe.tune.max_seconds)
    assert TuningOptions.of(None) is None and TuningOptions.of(False) is None and TuningOptions.of(True).trials == 64


def test_database_key_is_the_canonical_target():
    same = [
        Target(
            {
                "kind": "llvm",
                "mcpu": "znver3",
                "mattr": ["+avx2", "+fma"],
                "num-cores": 2,
                "mtriple": "x86_64-linux-gnu",
            }
        ),
        Target(
            {
                "kind": "llvm",
                "mcpu": "znver3",
                "mattr": ["+fma", "+avx2"],
                "num-cores": 1,
                "mtriple": "x86_64-unknown-linux-gnu",
            }
        ),
    ]
    other = Target({"kind": "llvm", "mcpu": "znver3", "mattr": ["+avx2"], "mtriple": "x86_64-linux-gnu"})
    names = {database_file_name(canonical_target(t)) for t in same}
    assert len(names) == 1 and database_file_name(canonical_target(other)) not in names
    assert canonical_target(same[0])["threads"] == tvm.runtime.num_threads()  # measured with this thread pool


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "lowbit" / "tvm"


def test_search_is_deterministic_and_starts_with_the_hand_schedule():
    space = {"a": (1, 2, 3), "b": (4, 8)}
    assert propose(space, {"a": 2, "b": 8}, [], "seed") == {"a": 2, "b": 8}
    from lowbit.backends.tvm.tuning.database import Trial

    trials = [Trial({"a": 2, "b": 8}, "measured", 1.0)]
    assert propose(space, {"a": 2, "b": 8}, trials, "seed") == {"a": 1, "b": 8}  # a neighbour of the best
    tried = [Trial(k, "measured", 1.0) for k in grid(space)]
    assert propose(space, {"a": 2, "b": 8}, tried, "seed") is None


def test_second_compile_of_a_model_does_no_tuning(tmp_path, monkeypatch):
    builds = []
    real_build = measure.build
    monkeypatch.setattr(measure, "build", lambda func, target: builds.append(1) or real_build(func, target))
    torch.manual_seed(0)
    model, x = TwoLayerMLP(128, 64, 32).eval(), torch.randn(4, 128)
    tune = {"trials": 2, "measure": measure.MeasureOptions(repeat=2, min_repeat_ms=1)}
    first = lowbit.compile(model, x, passes=[RTN(bits=4, group_size=64)], target="x86", tune=tune, cache_dir=tmp_path)
    assert len(builds) >= 4 and len(first.report.tuning) == 2
    assert {r.measured_now for r in first.report.tuning} == {2}
    builds.clear()
    second = lowbit.compile(model, x, passes=[RTN(bits=4, group_size=64)], target="x86", tune=tune, cache_dir=tmp_path)
    assert builds == [] and {r.measured_now for r in second.report.tuning} == {0}
    assert "0 candidate(s) measured" in str(second.report)
    assert [r.knobs for r in second.report.tuning] == [r.knobs for r in first.report.tuning]
    hand = lowbit.compile(model, x, passes=[RTN(bits=4, group_size=64)], target="x86", tune=False, cache_dir=tmp_path)
    assert hand.report.tuning == []
    torch.testing.assert_close(second(x), hand(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(second(x), second.graph(x), rtol=1e-4, atol=1e-5)  # the torch reference ops


def test_shipped_databases_are_valid_and_named_by_their_target():
    files = sorted(SHIPPED_DIR.glob("*.json"))
    assert files, "the package ships a pre-tuned database"
    for path in files:
        stored = json.loads(path.read_text())["target"]
        assert path.name == database_file_name(stored)
        records = read_database(path, stored)
        assert records and all(record.best is not None for record in records.values())


def test_best_is_chosen_among_the_confirmed_finalists():
    from lowbit.backends.tvm.tuning.database import Trial, TuningRecord

    record = TuningRecord(
        "k",
        "v",
        {},
        [
            Trial({"a": 1}, "measured", 2e-3, func_hash="1", confirmed=True),
            Trial({"a": 2}, "measured", 1e-3, func_hash="2"),
        ],
    )
    assert record.best.knobs == {"a": 1}  # a one-off time from a quieter moment does not win
    assert TuningRecord.from_json(record.to_json()) == record
