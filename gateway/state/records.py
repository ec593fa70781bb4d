"""The worker snapshot as a typed record: what each worker publishes about once a second.

A worker (`gateway.app.worker`) builds a `WorkerSnapshot` and `gateway.state.files` writes it to
`workers/<pid>.json`; the control plane, `/metrics` and the admin API read it back through
`WorkerSnapshot.from_json`, which checks every field. A file that does not fit (cut short, edited by
hand, written by another release) is skipped as a whole instead of failing the views that read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.artifacts.gate import GateView
from gateway.rollout.records import RolloutRecord
from gateway.shadow.compare import PairStats
from gateway.stats.records import StatsRecord
from gateway.typed_json import Fields, RecordError

__all__ = [
    "AdmissionOutcome",
    "AdmissionView",
    "HealthEntry",
    "HealthView",
    "Mirrors",
    "RecordError",
    "ReloadCounts",
    "ReloadEvent",
    "RolloutsView",
    "WorkerSnapshot",
]


@dataclass(frozen=True, slots=True)
class ReloadEvent:
    """One attempt to load the routes file."""

    time: float
    ok: bool
    revision: str | None  # of the table loaded; None when the file was refused
    trigger: str  # start, file, signal, admin
    errors: tuple[str, ...]  # why it was refused
    duration_ms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "ok": self.ok,
            "revision": self.revision,
            "trigger": self.trigger,
            "errors": list(self.errors),
            "duration_ms": self.duration_ms,
        }

    @classmethod
    def read(cls, f: Fields) -> ReloadEvent:
        return cls(
            f.number("time"),
            f.flag("ok"),
            f.optional_text("revision"),
            f.text("trigger"),
            f.texts("errors"),
            f.number("duration_ms"),
        )


@dataclass(frozen=True, slots=True)
class ReloadCounts:
    ok: int
    failed: int

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": self.failed}

    @classmethod
    def read(cls, f: Fields) -> ReloadCounts:
        return cls(f.integer("ok"), f.integer("failed"))


@dataclass(frozen=True, slots=True)
class HealthEntry:
    """The latest health check of one backend or version, as this worker saw it."""

    ready: bool
    detail: str  # why not, in words; "" when ready
    checked_at: float

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "detail": self.detail, "checked_at": self.checked_at}

    @classmethod
    def read(cls, f: Fields) -> HealthEntry:
        return cls(f.flag("ready"), f.text("detail"), f.number("checked_at"))


@dataclass(frozen=True, slots=True)
class HealthView:
    backends: Mapping[str, HealthEntry]  # by backend name
    versions: Mapping[str, HealthEntry]  # by "model/version"

    def to_json(self) -> dict[str, Any]:
        return {
            "backends": {name: h.to_json() for name, h in self.backends.items()},
            "versions": {key: h.to_json() for key, h in self.versions.items()},
        }

    @classmethod
    def read(cls, f: Fields) -> HealthView:
        return cls(f.mapping("backends", HealthEntry.read), f.mapping("versions", HealthEntry.read))


@dataclass(frozen=True, slots=True)
class AdmissionOutcome:
    """How many requests one key got one outcome for on one model; JSON `[key, model, outcome, count]`."""

    key: str  # the key's name; "" for anonymous
    model: str
    outcome: str
    count: int

    def to_json(self) -> list[Any]:
        return [self.key, self.model, self.outcome, self.count]

    @classmethod
    def read(cls, f: Fields, index: int) -> AdmissionOutcome:
        item = f.items("outcomes")[index]
        if (
            isinstance(item, list)
            and len(item) == 4
            and all(isinstance(part, str) for part in item[:3])
            and isinstance(item[3], int)
            and not isinstance(item[3], bool)
        ):
            return cls(item[0], item[1], item[2], item[3])
        raise RecordError(f"{f.where}.outcomes[{index}]: expected [key, model, outcome, count]")


@dataclass(frozen=True, slots=True)
class AdmissionView:
    """The worker's view of keys, limits and the store."""

    store_url: str  # without credentials
    store_up: bool
    on_error: str
    live_processes: int
    store_errors: int
    fail_open: int
    fail_closed: int
    outcomes: tuple[AdmissionOutcome, ...]

    def summary_json(self) -> dict[str, Any]:
        """Everything but the per-key outcomes, as `/api/store` shows it."""
        return {
            "store_url": self.store_url,
            "store_up": self.store_up,
            "on_error": self.on_error,
            "live_processes": self.live_processes,
            "store_errors": self.store_errors,
            "fail_open": self.fail_open,
            "fail_closed": self.fail_closed,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.summary_json(), "outcomes": [o.to_json() for o in self.outcomes]}

    @classmethod
    def read(cls, f: Fields) -> AdmissionView:
        return cls(
            f.text("store_url"),
            f.flag("store_up"),
            f.text("on_error"),
            f.integer("live_processes"),
            f.integer("store_errors"),
            f.integer("fail_open"),
            f.integer("fail_closed"),
            tuple(AdmissionOutcome.read(f, i) for i in range(len(f.items("outcomes")))),
        )


@dataclass(frozen=True, slots=True)
class Mirrors:
    in_flight: int
    skipped: int  # shadow copies not sent: too many in flight
    # Shadow comparisons since the worker started, by "model/primary version/shadow version".
    comparisons: Mapping[str, PairStats] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        compared = {key: stats.to_json() for key, stats in self.comparisons.items()}
        return {"in_flight": self.in_flight, "skipped": self.skipped, "comparisons": compared}

    @classmethod
    def read(cls, f: Fields) -> Mirrors:
        # Snapshots of an older release have no comparisons.
        comparisons = f.mapping("comparisons", PairStats.read) if f.has("comparisons") else {}
        return cls(f.integer("in_flight"), f.integer("skipped"), comparisons)


@dataclass(frozen=True, slots=True)
class RolloutsView:
    leader: bool  # whether this worker holds the controller lease
    records: Mapping[str, RolloutRecord]  # the records it follows, by model

    def to_json(self) -> dict[str, Any]:
        return {"leader": self.leader, "records": {m: r.to_json() for m, r in self.records.items()}}

    @classmethod
    def read(cls, f: Fields) -> RolloutsView:
        return cls(f.flag("leader"), f.mapping("records", RolloutRecord.read))


def _split(f: Fields) -> dict[str, int]:
    return {version: f.integer(version) for version in f.data}


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    pid: int
    worker: int  # the worker's index under the supervisor
    started: float
    time: float  # when it was written; a snapshot older than STALE_AFTER is a gone worker's
    revision: str  # of the table it serves
    source: str  # the routes file
    reloads: tuple[ReloadEvent, ...]  # the latest ones, oldest first
    reload_counts: ReloadCounts  # all of them
    health: HealthView
    splits: Mapping[str, Mapping[str, int]]  # the weights it routes by now, per model
    stats: StatsRecord
    mirrors: Mirrors
    connections: int
    admission: AdmissionView
    rollouts: RolloutsView
    internal_errors: int  # bugs the exception boundary caught (answered 500 or aborted)
    audit_failures: int  # audit log lines this worker could not write
    # The reader's judgment from `time` (`read_snapshots` sets it), never written: a worker that stops
    # cannot say so.
    alive: bool = True
    schema_gate: GateView = field(default_factory=GateView)  # rollouts it holds back, refusals

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "worker": self.worker,
            "started": self.started,
            "time": self.time,
            "revision": self.revision,
            "source": self.source,
            "reloads": [event.to_json() for event in self.reloads],
            "reload_counts": self.reload_counts.to_json(),
            "health": self.health.to_json(),
            "splits": {model: dict(split) for model, split in self.splits.items()},
            "stats": self.stats.to_json(),
            "mirrors": self.mirrors.to_json(),
            "connections": self.connections,
            "admission": self.admission.to_json(),
            "rollouts": self.rollouts.to_json(),
            "internal_errors": self.internal_errors,
            "audit_failures": self.audit_failures,
            "schema_gate": self.schema_gate.to_json(),
        }

    @classmethod
    def from_json(cls, data: object) -> WorkerSnapshot:
        """Raises `RecordError` naming the first field that is missing or of the wrong type."""
        f = Fields(data, "snapshot")
        return cls(
            pid=f.integer("pid"),
            worker=f.integer("worker"),
            started=f.number("started"),
            time=f.number("time"),
            revision=f.text("revision"),
            source=f.text("source"),
            reloads=tuple(ReloadEvent.read(event) for event in f.entries("reloads")),
            reload_counts=ReloadCounts.read(f.child("reload_counts")),
            health=HealthView.read(f.child("health")),
            splits=f.mapping("splits", _split),
            stats=StatsRecord.read(f.child("stats")),
            mirrors=Mirrors.read(f.child("mirrors")),
            connections=f.integer("connections"),
            admission=AdmissionView.read(f.child("admission")),
            rollouts=RolloutsView.read(f.child("rollouts")),
            internal_errors=f.integer("internal_errors"),
            audit_failures=f.integer("audit_failures"),
            schema_gate=GateView.read(f.child("schema_gate")) if f.has("schema_gate") else GateView(),
        )
