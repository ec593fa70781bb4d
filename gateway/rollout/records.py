"""The rollout record and the operator's command, as kept in the store and shown by the admin API.

Both are written and read only through this module: by the controller (the record's single writer),
by the admin routes (the command's writer, the record's reader) and, through the admin API, by the
CLI. Another process wrote what is read back, maybe another release, so every read validates and a
malformed value raises `RecordError`: the controller then treats the record as absent and the admin
API reports it unreadable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from gateway.rollout.engine import Phase, RolloutState
from gateway.rollout.sequential import Counts
from gateway.rollout.statistics import TestStats
from gateway.stats.accounting import Ledger
from gateway.store.base import Store
from gateway.typed_json import Fields, RecordError

OperatorAction = Literal["pause", "resume", "promote", "rollback"]
ACTIONS: tuple[OperatorAction, ...] = get_args(OperatorAction)
PHASES: tuple[Phase, ...] = get_args(Phase)


def record_name(model: str) -> str:
    return f"rollout:{model}"


def command_name(model: str) -> str:
    """Operators' commands go to their own record: only the lease holder writes the rollout record."""
    return f"rollout-command:{model}"


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    time: float
    action: str  # "start", an engine decision other than "continue", or an operator's action
    weight: int  # the canary's weight after it, percent
    by: str  # "controller" or the operator's token name
    evidence: Mapping[str, Any] | None = None  # the engine's decisions carry theirs

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "time": self.time,
            "action": self.action,
            "weight": self.weight,
            "by": self.by,
        }
        if self.evidence is not None:
            data["evidence"] = dict(self.evidence)
        return data

    @classmethod
    def read(cls, f: Fields) -> HistoryEvent:
        evidence = f.json_object("evidence") if f.has("evidence") else None
        return cls(f.number("time"), f.text("action"), f.integer("weight"), f.text("by"), evidence)


def _read_counts(f: Fields) -> Counts:
    requests, failures, buckets = f.integer("requests"), f.integer("failures"), f.integers("buckets")
    try:
        return Counts(requests, failures, buckets)
    except ValueError as exc:  # a bucket count of another release
        raise RecordError(f"{f.where}: {exc}") from exc


def _read_state(f: Fields) -> RolloutState:
    phase = f.text("phase")
    if phase not in PHASES:
        raise RecordError(f"{f.where}.phase: expected one of {', '.join(PHASES)}, got {phase!r}")
    tests = TestStats.read(f.child("tests"))  # RecordError for the statistics of another release
    return RolloutState(
        phase,
        f.integer("step"),
        f.integer("weight"),
        f.number("step_started"),
        _read_counts(f.child("seen_baseline")),
        _read_counts(f.child("seen_canary")),
        tests,
    )


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """One model's rollout: where it stands, why, and how it got there."""

    model: str
    spec: str  # `spec_digest` of the rollout it belongs to; another digest means another rollout
    id: str  # this record's own: an operator's command names it, so it cannot act on a later rollout
    baseline: str
    canary: str
    state: RolloutState
    ledger: Ledger  # what each process served in the current step, each request once (see accounting)
    history: tuple[HistoryEvent, ...]
    evidence: Mapping[str, Any]  # behind the latest decision
    updated: float  # on the store's clock, like every time in the record
    last_command: int | None = None  # the id of the operator command applied last

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "model": self.model,
            "spec": self.spec,
            "id": self.id,
            "baseline": self.baseline,
            "canary": self.canary,
            "state": self.state.to_json(),
            "ledger": self.ledger.to_json(),
            "history": [event.to_json() for event in self.history],
            "evidence": dict(self.evidence),
            "updated": self.updated,
        }
        if self.last_command is not None:
            data["last_command"] = self.last_command
        return data

    @classmethod
    def read(cls, f: Fields) -> RolloutRecord:
        has_command = f.has("last_command") and f.data["last_command"] is not None
        return cls(
            f.text("model"),
            f.text("spec"),
            f.text("id") if f.has("id") else "",  # written before records had ids
            f.text("baseline"),
            f.text("canary"),
            _read_state(f.child("state")),
            Ledger.read(f.child("ledger")),
            tuple(HistoryEvent.read(event) for event in f.entries("history")),
            f.json_object("evidence"),
            f.number("updated"),
            f.integer("last_command") if has_command else None,
        )

    @classmethod
    def from_json(cls, data: object) -> RolloutRecord:
        """Raises `RecordError` for anything but a well-formed record."""
        return cls.read(Fields(data, "rollout record"))


@dataclass(frozen=True, slots=True)
class OperatorCommand:
    """An operator's action for the controller to apply, at most once, to the one rollout it names.

    A new id makes it a new command. `rollout` is the id of the record the operator acted on: once that
    rollout ends or its spec changes (a new record, a new id), the command is ignored, so a `promote`
    given to one rollout can never promote the next one.
    """

    id: int
    action: OperatorAction
    who: str
    rollout: str | None = None  # RolloutRecord.id; None (a command of an older release) matches none

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "action": self.action, "who": self.who}
        if self.rollout is not None:
            data["rollout"] = self.rollout
        return data

    def applies_to(self, record: RolloutRecord) -> bool:
        return self.rollout == record.id and self.id != record.last_command

    @classmethod
    def from_json(cls, data: object) -> OperatorCommand:
        f = Fields(data, "rollout command")
        action = f.text("action")
        if action not in ACTIONS:
            raise RecordError(f"{f.where}.action: expected one of {', '.join(ACTIONS)}, got {action!r}")
        rollout = f.text("rollout") if f.has("rollout") else None
        return cls(f.integer("id"), action, f.text("who"), rollout)


async def _get(store: Store, name: str) -> object:
    try:
        return await store.get_state(name)
    except ValueError as exc:  # the store holds text that is not JSON
        raise RecordError(f"{name}: not JSON: {exc}") from exc


async def read_record(store: Store, model: str) -> RolloutRecord | None:
    """The model's stored rollout record, None if there is none; raises RecordError or StoreUnavailable."""
    data = await _get(store, record_name(model))
    return None if data is None else RolloutRecord.from_json(data)


async def write_record(store: Store, record: RolloutRecord, lease: str, token: int) -> bool:
    """Store the record if lease `lease` is still held with fencing token `token`; False if not.

    One atomic step in the store, so a controller that stalled past its lease (another one has
    taken over since) cannot overwrite the newer decisions.
    """
    return await store.put_state_fenced(record_name(record.model), record.to_json(), lease, token)


async def read_command(store: Store, model: str) -> OperatorCommand | None:
    data = await _get(store, command_name(model))
    return None if data is None else OperatorCommand.from_json(data)


async def write_command(store: Store, model: str, command: OperatorCommand) -> None:
    await store.put_state(command_name(model), command.to_json())
