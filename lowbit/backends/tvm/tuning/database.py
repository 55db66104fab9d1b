"""The persistent tuning database: best knobs and measured trials per (target, kernel signature).

One JSON file per canonical target (kind, mtriple, mcpu, mattr, ..., and the size of
TVM's thread pool the measurements ran with) under
``<cache dir>/tuning/``. A file holds a schema version, the target, the records and a
SHA-256 checksum of the rest. Records are keyed by the kernel signature: kernel name,
the version of its knob space (a hash of the kernel's ``knobs``) and the layer spec.

Writes are atomic (temporary file, fsync, rename) and serialized with a lock file;
each write re-reads the file and merges, so concurrent tunings of one target keep each
other's trials. A file that does not parse, fails its checksum, has another schema
version or names another target is moved aside (``*.corrupt-<time>``) with a warning
and never used. Shipped read-only databases (`SHIPPED_DIR`) sit under the user's file:
a record in the user's file wins.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm
from tvm.target import Target, codegen

from lowbit.backends.tvm.target import runs_on_host

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: The pre-tuned databases shipped with lowbit (read-only fallback layer).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "tuned"
#: Subdirectory of the cache dir that holds the tuning databases.
SUBDIR = "tuning"
#: Target attributes that identify the machine code and its measured speed.
#: ``num-cores`` is left out: the x86 host target reads it from the process's CPU affinity, which
#: changes within a process once TVM's thread pool pins threads; ``threads`` (below) replaces it.
TARGET_KEYS: tuple[str, ...] = ("mtriple", "mcpu", "mattr", "arch", "max_num_threads")
#: Operating-system parts of target triples (the vendor and ABI parts do not change the code's speed).
OS_NAMES: tuple[str, ...] = ("linux", "darwin", "macos", "ios", "windows", "android", "freebsd", "none")

#: Trial outcomes: ``measured`` and ``failed`` used a build (they count against the trial budget);
#: ``invalid`` (the kernel refused the knobs) and ``duplicate`` (same PrimFunc as an earlier trial) did not.
OUTCOMES: tuple[str, ...] = ("measured", "failed", "invalid", "duplicate")


class CorruptDatabase(ValueError):
    """A database file that must not be used (bad JSON, checksum, schema version or target)."""


@dataclass(frozen=True)
class Trial:
    """One candidate: its knobs, the outcome, the median seconds (measured/duplicate) or the error.

    ``confirmed``: a finalist whose time comes from timing the finalists side by side.
    """

    knobs: dict[str, int]
    outcome: str
    seconds: float | None = None
    error: str | None = None
    func_hash: str | None = None
    confirmed: bool = False

    @property
    def counted(self) -> bool:
        """Whether this trial used a build and a measurement (counts against the trial budget)."""
        return self.outcome in ("measured", "failed")


@dataclass
class TuningRecord:
    """Everything tried for one kernel signature; ``exhausted`` once the whole knob space was tried."""

    kernel: str
    space: str
    spec: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    exhausted: bool = False

    @property
    def key(self) -> str:
        return signature_key(self.kernel, self.space, self.spec)

    @property
    def confirmed(self) -> bool:
        """Whether the finalists were timed side by side after the last trial."""
        return any(t.confirmed for t in self.trials)

    @property
    def best(self) -> Trial | None:
        """The fastest trial with a time (among the confirmed finalists once there are some), or None."""
        timed = [t for t in self.trials if t.seconds is not None and t.outcome in ("measured", "duplicate")]
        finalists = [t for t in timed if t.confirmed]
        return min(finalists or timed, key=lambda t: t.seconds) if timed else None

    @property
    def counted(self) -> int:
        """Trials that used a build (the ones a trial budget counts)."""
        return sum(t.counted for t in self.trials)

    def tried(self, knobs: Mapping[str, int]) -> bool:
        return any(t.knobs == dict(knobs) for t in self.trials)

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "space": self.space,
            "spec": self.spec,
            "exhausted": self.exhausted,
            "trials": [
                {k: v for k, v in dataclasses.asdict(t).items() if v is not None and v is not False}
                for t in self.trials
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TuningRecord:
        trials = []
        for item in data["trials"]:
            if item["outcome"] not in OUTCOMES:
                raise CorruptDatabase(f"unknown trial outcome {item['outcome']!r}")
            trials.append(
                Trial(
                    {str(k): int(v) for k, v in item["knobs"].items()},
                    item["outcome"],
                    item.get("seconds"),
                    item.get("error"),
                    item.get("func_hash"),
                    bool(item.get("confirmed", False)),
                )
            )
        return cls(str(data["kernel"]), str(data["space"]), dict(data["spec"]), trials, bool(data["exhausted"]))


def signature_key(kernel: str, space: str, spec: Mapping[str, Any]) -> str:
    """The record key of a kernel signature: ``kernel/space/{spec as sorted JSON}``."""
    return f"{kernel}/{space}/{json.dumps(dict(spec), sort_keys=True, separators=(',', ':'))}"


def canonical_target(target: Target) -> dict[str, Any]:
    """The attributes of ``target`` that identify it, in a fixed form (sorted ``mattr``, ``arch-os`` triple).

    For a target of this machine the size of TVM's thread pool (``TVM_NUM_THREADS``) is
    part of it too: the best parallel tiling depends on it.
    """
    attrs = target.attrs
    canon: dict[str, Any] = {"kind": target.kind.name}
    for key in TARGET_KEYS:
        value = attrs.get(key)
        if value is None or value == "" or (key == "mattr" and len(value) == 0):
            continue
        canon[key] = (
            sorted(str(v) for v in value) if key == "mattr" else value if isinstance(value, int) else str(value)
        )
    if canon["kind"] == "llvm":
        canon["mtriple"] = _arch_and_os(str(canon.get("mtriple") or codegen.llvm_get_system_triple()))
    if runs_on_host(target):
        canon["threads"] = int(tvm.runtime.num_threads())  # measured at this thread-pool size
    return canon


def _arch_and_os(triple: str) -> str:
    """``arch-os`` of an LLVM triple: ``x86_64-conda-linux-gnu`` and ``x86_64-linux-gnu`` are one machine."""
    parts = triple.lower().split("-")
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(parts[0], parts[0])
    system = next((p for p in parts[1:] if p.startswith(OS_NAMES)), "unknown")
    return f"{arch}-{''.join(c for c in system if c.isalpha())}"


def database_file_name(target: Mapping[str, Any]) -> str:
    """``<kind>-<cpu or arch>-<hash of the canonical target>.json``."""
    digest = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:12]
    cpu = str(target.get("mcpu") or target.get("arch") or "generic").replace("/", "_")
    return f"{target['kind']}-{cpu}-{digest}.json"


class TuningDatabase:
    """The records of one target: the user's writable file over read-only shipped files.

    ``directory`` is the cache dir (the file lives in ``directory/tuning/``); None keeps
    records in memory only. ``shipped`` lists directories of read-only databases.
    """

    def __init__(
        self, target: Target, directory: str | Path | None, shipped: Sequence[str | Path] = (SHIPPED_DIR,)
    ) -> None:
        self.target = canonical_target(target)
        name = database_file_name(self.target)
        self.path = Path(directory) / SUBDIR / name if directory is not None else None
        self._records: dict[str, TuningRecord] = self._read(self.path, writable=True) if self.path else {}
        self._shipped: dict[str, TuningRecord] = {}
        for folder in shipped:
            self._shipped.update(self._read(Path(folder) / name, writable=False))

    def get(self, key: str) -> TuningRecord | None:
        """The record of a signature key: the user's, else the shipped one, else None."""
        return self._records.get(key) or self._shipped.get(key)

    def records(self) -> list[TuningRecord]:
        """All records, the user's over the shipped ones."""
        return list({**self._shipped, **self._records}.values())

    def commit(self, record: TuningRecord) -> None:
        """Store ``record`` and write the file atomically, merged with what other processes wrote meanwhile."""
        self._records[record.key] = record
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            on_disk = self._read(self.path, writable=True)
            merged = {**on_disk, **self._records}
            for key, mine in self._records.items():
                if key in on_disk:
                    merged[key] = _merge(on_disk[key], mine)
            self._records = merged
            write_database(self.path, self.target, merged.values())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        assert self.path is not None
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self, path: Path, writable: bool) -> dict[str, TuningRecord]:
        """The records of ``path`` ({} if missing); a corrupt file is moved aside (or, read-only, ignored)."""
        if not path.is_file():
            return {}
        try:
            return read_database(path, self.target)
        except CorruptDatabase as error:
            if not writable:
                log.warning("ignoring the shipped tuning database %s: %s", path, error)
                return {}
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
            os.replace(path, aside)
            log.warning(
                "tuning database %s is unusable (%s): moved it to %s and starting a new one", path, error, aside.name
            )
            return {}


def read_database(path: Path, target: Mapping[str, Any]) -> dict[str, TuningRecord]:
    """Parse and validate a database file for ``target``; raises `CorruptDatabase` when it must not be used."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptDatabase(f"not valid JSON (truncated?): {error}") from error
    if not isinstance(data, dict):
        raise CorruptDatabase("not a database object")
    if data.get("schema") != SCHEMA_VERSION:
        raise CorruptDatabase(f"schema version {data.get('schema')!r}, this lowbit reads {SCHEMA_VERSION}")
    if data.get("checksum") != _checksum(data):
        raise CorruptDatabase("checksum mismatch (edited or partly written)")
    if data.get("target") != dict(target):
        raise CorruptDatabase(f"written for target {data.get('target')}, not {dict(target)}")
    try:
        records = [TuningRecord.from_json(item) for item in data["records"]]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CorruptDatabase(f"malformed record: {error!r}") from error
    return {record.key: record for record in records}


def write_database(path: Path, target: Mapping[str, Any], records: Any) -> None:
    """Write a database file atomically: a temporary file in the same folder, fsync, rename."""
    data: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "target": dict(target),
        "records": [r.to_json() for r in sorted(records, key=lambda r: r.key)],
    }
    data["checksum"] = _checksum(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _checksum(data: Mapping[str, Any]) -> str:
    payload = {key: value for key, value in data.items() if key != "checksum"}
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _merge(theirs: TuningRecord, mine: TuningRecord) -> TuningRecord:
    """Both processes' trials (mine first, theirs for knobs I did not try)."""
    trials = list(mine.trials) + [t for t in theirs.trials if not mine.tried(t.knobs)]
    return dataclasses.replace(mine, trials=trials, exhausted=mine.exhausted or theirs.exhausted)


__all__ = [
    "CorruptDatabase",
    "OUTCOMES",
    "SCHEMA_VERSION",
    "SHIPPED_DIR",
    "Trial",
    "TuningDatabase",
    "TuningRecord",
    "canonical_target",
    "database_file_name",
    "read_database",
    "signature_key",
    "write_database",
]
