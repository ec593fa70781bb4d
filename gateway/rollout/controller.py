"""The rollout controller: applies the engine's decisions. One process decides, every process follows.

Every second each gateway process publishes its cumulative per-version statistics to the store and
tries to take (or renew) the controller lease. The holder feeds what each process served since its
last reading into the rollout's ledger (`gateway.stats.accounting`: a process that leaves, restarts or
stalls is never counted twice), feeds the engine, and writes each rollout's record (state, weights,
ledger, evidence) to the store, each write conditional on still holding the lease with the fencing
token it was granted: a holder that stalled past its lease cannot overwrite its successor. Every
process, holder or not, reads the records and routes by their weights. Killing the holder stops its
renewals; another process takes the lease when it expires (LEASE_TTL) and carries on from the stored
record, ledger included, so no step is taken twice and no request counted twice.

Times in the record (step starts, history, ledger) are the store's clock, so a new holder on another
machine measures from the same origin. The audit log is written after the record, and best-effort: a
failed audit write (counted by the worker's `AuditLog`) never holds up or undoes the decision.

A record is keyed by the model and carries a digest of the rollout's spec (its settings and the two
versions' definitions): a rolled-back canary stays rolled back across restarts and reloads of the same
file, and a changed spec starts a new rollout, with a new record id that no earlier operator command
names (`OperatorCommand.applies_to`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.rollout.engine import Decision, Observation, decide, initial_state
from gateway.rollout.records import (
    HistoryEvent,
    OperatorCommand,
    RolloutRecord,
    command_name,
    read_command,
    read_record,
    record_name,
    write_record,
)
from gateway.rollout.sequential import Counts
from gateway.routing.table import Model, RouteTable
from gateway.stats.accounting import Ledger, Reading
from gateway.stats.counters import Stats
from gateway.stats.kinds import CHOICES, EVIDENCE, Choice
from gateway.stats.records import ProcessStats, Tally
from gateway.store.base import Store
from gateway.typed_json import RecordError, WarnOnce

log = logging.getLogger("gateway.rollout")

LEASE = "rollout-controller"
LEASE_TTL = 3.0  # seconds; a dead holder is replaced within this plus one tick
STATS_TTL = 5.0
HISTORY = 50
FINISHED = ("promoted", "rolled_back")
Weights = dict[str, tuple[tuple[str, int], ...]]
Audit = Callable[[str, dict[str, Any]], None]
Hold = Callable[[Model], Awaitable[str | None]]


def spec_digest(model: Model) -> str:
    rollout = model.rollout
    assert rollout is not None
    spec = (rollout, model.versions[rollout.baseline], model.versions[rollout.canary])
    return hashlib.sha256(repr(spec).encode()).hexdigest()[:16]


def weights_of(model: Model, canary_weight: int) -> tuple[tuple[str, int], ...]:
    """The split a rollout imposes: baseline and canary share it, other versions get nothing."""
    rollout = model.rollout
    assert rollout is not None
    return tuple(
        (v, canary_weight if v == rollout.canary else 100 - canary_weight if v == rollout.baseline else 0)
        for v in model.versions
    )


def readings_of(model: Model, processes: Sequence[ProcessStats]) -> list[Reading]:
    """Each process's tallies of the rollout's two versions, keyed "<version>/<choice>"."""
    rollout = model.rollout
    assert rollout is not None
    readings = []
    for process in processes:
        tallies: dict[str, Tally] = {}
        for version in (rollout.baseline, rollout.canary):
            stats = process.versions.get(f"{model.name}/{version}")
            if stats is not None and stats.choices is not None:
                tallies |= {f"{version}/{choice}": stats.tally(choice) for choice in CHOICES}
        readings.append(Reading(process.process, process.started, tallies))
    return readings


def evidence_of(ledger: Ledger, version: str) -> Counts:
    """The engine's counts: the split's requests (EVIDENCE), never a caller's fault."""
    tally = Tally.total(ledger.total(f"{version}/{CHOICES[choice]}") for choice in EVIDENCE)
    return Counts(tally.requests, tally.failures, tally.buckets)


def traffic_of(model: Model, ledger: Ledger) -> dict[str, Any]:
    """This step's traffic per version and choice, for the evidence: what counted and what did not."""
    rollout = model.rollout
    assert rollout is not None
    view: dict[str, Any] = {}
    for version in (rollout.baseline, rollout.canary):
        rows = {}
        for choice in Choice:
            tally = ledger.total(f"{version}/{CHOICES[choice]}")
            rows[CHOICES[choice]] = {
                "requests": tally.requests,
                "failures": tally.failures,
                "caller_faults": tally.caller_faults,
                "evidence": choice in EVIDENCE,
            }
        view[version] = rows
    return view


def new_record(model: Model, record_id: str, now: float, readings: Sequence[Reading]) -> RolloutRecord:
    """A rollout's first record: its first step, and a ledger whose marks are what processes served so far."""
    rollout = model.rollout
    assert rollout is not None
    state = initial_state(rollout, now)
    return RolloutRecord(
        model=model.name,
        spec=spec_digest(model),
        id=record_id,
        baseline=rollout.baseline,
        canary=rollout.canary,
        state=state,
        ledger=Ledger.begin(now).take(now, readings),
        history=(HistoryEvent(now, "start", state.weight, "controller"),),
        evidence={},
        updated=now,
    )


def operator_action(record: RolloutRecord, action: str, who: str, now: float) -> RolloutRecord:
    """An operator's pause, resume, promote or rollback, applied to a stored record."""
    state = record.state
    if state.phase in FINISHED:
        raise ValueError(f"the rollout is already {state.phase.replace('_', ' ')}")
    changes: dict[str, dict[str, Any]] = {
        "pause": {"phase": "paused"},
        # A held step (past max_step_duration) gets a fresh max_step_duration when resumed.
        "resume": {"phase": "progressing", "step_started": now},
        "promote": {"phase": "promoted", "weight": 100},
        "rollback": {"phase": "rolled_back", "weight": 0},
    }
    state = dataclasses.replace(state, **changes[action])
    history = (*record.history, HistoryEvent(now, action, state.weight, who))[-HISTORY:]
    return dataclasses.replace(record, state=state, history=history, updated=now)


def advance(
    model: Model,
    record: RolloutRecord,
    now: float,
    readings: Sequence[Reading],
    canary_ready: bool,
    consecutive_failures: int,
) -> tuple[RolloutRecord, Decision]:
    """One round of a running rollout: take in the readings, decide, and the record that results."""
    rollout = model.rollout
    assert rollout is not None
    ledger = record.ledger.take(now, readings)
    observation = Observation(
        evidence_of(ledger, rollout.baseline),
        evidence_of(ledger, rollout.canary),
        canary_ready,
        consecutive_failures,
        now,
    )
    state, decision = decide(rollout, record.state, observation)
    evidence = {**decision.evidence, "traffic": traffic_of(model, ledger)}
    history = record.history
    if decision.action != "continue":
        event = HistoryEvent(now, decision.action, decision.weight, "controller", evidence)
        history = (*history, event)[-HISTORY:]
    if decision.action == "step_up":
        ledger = ledger.restart()  # the engine counts the new step from zero too
    record = dataclasses.replace(
        record, state=state, ledger=ledger, history=history, evidence=evidence, updated=now
    )
    return record, decision


class RolloutController:
    def __init__(
        self,
        store: Store,
        process_id: str,
        stats: Stats,
        ready: Callable[[str, str], bool],
        on_weights: Callable[[Weights], None],
        on_event: Audit = lambda model, event: None,
        hold: Hold | None = None,
    ) -> None:
        self.store = store
        self.hold = hold  # why a rollout may not start yet (the schema gate), None when it may
        # This run's own id: a restart with the same pid is another run, whose counters began at zero.
        self.process_id = f"{process_id}:{secrets.token_hex(4)}"
        self.stats = stats
        self.ready = ready  # (model, version) -> does this process see it ready
        self.on_weights = on_weights
        self.on_event = on_event  # every start and decision (as JSON), for the audit log
        self.leader = False
        self.records: dict[str, RolloutRecord] = {}
        self._started: float | None = None  # when self.stats began, on the store's clock
        self._warned = WarnOnce()  # every process reads every record every second

    async def tick(self, table: RouteTable) -> None:
        """One round: publish, decide if leader, follow. Raises StoreUnavailable when the store is down."""
        models = [m for m in table.models.values() if m.rollout is not None]
        if not models:
            if self.records:
                self.records = {}
                self.on_weights({})
            return
        if self._started is None:
            # Read after the answer, so the estimate is never later than the truth: a run taken to have
            # started earlier only ever loses a second of counts (see accounting), never doubles them.
            store_now = await self.store.time()
            self._started = store_now - (time.monotonic() - self.stats.created)
        published = ProcessStats(self.process_id, self._started, self.stats.snapshot().versions)
        await self.store.put_stats(self.process_id, published.to_json(), STATS_TTL)
        token = await self.store.lease(LEASE, self.process_id, LEASE_TTL)
        self.leader = token > 0
        if self.leader:
            view = await self.store.get_stats()
            processes = self._processes(view.stats)
            for model in models:
                if not await self._decide(model, processes, view.now, token):
                    log.warning("rollout control: the lease was lost while deciding; not writing")
                    self.leader = False
                    break
        weights: Weights = {}
        records = {}
        for model in models:
            record = await self._record(model.name)
            if record is not None and record.spec == spec_digest(model):
                records[model.name] = record
                weights[model.name] = weights_of(model, record.state.weight)
        self.records = records
        self.on_weights(weights)

    def _processes(self, published: list[dict[str, Any]]) -> list[ProcessStats]:
        processes = []
        for data in published:
            try:
                processes.append(ProcessStats.from_json(data))
            except RecordError as exc:
                if self._warned.first("stats", str(exc)):
                    log.warning("rollout control: ignoring a process's malformed statistics: %s", exc)
        return processes

    async def _record(self, model: str) -> RolloutRecord | None:
        """The stored record; a malformed one counts as absent, so the leader starts afresh."""
        try:
            record = await read_record(self.store, model)
        except RecordError as exc:
            if self._warned.first(record_name(model), str(exc)):
                log.warning(
                    "rollout of %s: the stored record is unreadable, treated as absent: %s", model, exc
                )
            return None
        self._warned.forget(record_name(model))
        return record

    async def _command(self, model: str) -> OperatorCommand | None:
        try:
            command = await read_command(self.store, model)
        except RecordError as exc:
            if self._warned.first(command_name(model), str(exc)):
                log.warning("rollout of %s: ignoring an unreadable operator command: %s", model, exc)
            return None
        self._warned.forget(command_name(model))
        return command

    async def _decide(self, model: Model, processes: list[ProcessStats], now: float, token: int) -> bool:
        """Decide one model's rollout and store the record; False if the lease was lost meanwhile."""
        rollout = model.rollout
        assert rollout is not None
        record = await self._record(model.name)
        readings = readings_of(model, processes)
        if record is None or record.spec != spec_digest(model):
            if self.hold is not None and await self.hold(model) is not None:
                return True  # held, and the hold says why; without a record the canary gets no traffic
            record = new_record(model, secrets.token_hex(8), now, readings)
            if not await write_record(self.store, record, LEASE, token):
                return False
            log.info(
                "rollout of %s %s -> %s started at %d%%",
                model.name,
                rollout.baseline,
                rollout.canary,
                record.state.weight,
            )
            self._audit(model.name, record.history[-1].to_json())
            return True
        command = await self._command(model.name)
        if command is not None and command.applies_to(record):
            try:
                record = operator_action(record, command.action, command.who, now)
                log.warning("rollout of %s: %s by %s", model.name, command.action, command.who)
                applied = True
            except ValueError as exc:
                log.warning(
                    "rollout of %s: %s by %s ignored: %s", model.name, command.action, command.who, exc
                )
                applied = False
            written = await write_record(
                self.store, dataclasses.replace(record, last_command=command.id), LEASE, token
            )
            if written and applied:
                self._audit(model.name, record.history[-1].to_json())  # "by" names the operator
            return written
        if record.state.phase in FINISHED:
            return True
        canary_key = f"{model.name}/{rollout.canary}"
        consecutive = max(
            (p.versions[canary_key].consecutive_failures for p in processes if canary_key in p.versions),
            default=0,
        )
        ready = self.ready(model.name, rollout.canary)
        record, decision = advance(model, record, now, readings, ready, consecutive)
        if not await write_record(self.store, record, LEASE, token):
            return False
        if decision.action != "continue":
            log.warning(
                "rollout of %s: %s to %d%%: %s",
                model.name,
                decision.action,
                decision.weight,
                decision.evidence.get("reason", ""),
            )
            self._audit(model.name, record.history[-1].to_json())
        return True

    def _audit(self, model: str, event: dict[str, Any]) -> None:
        """After the record is stored, and best-effort: an unwritable audit log never undoes a decision."""
        try:
            self.on_event(model, event)
        except Exception:
            log.exception("rollout of %s: %s stands, but auditing it failed", model, event.get("action"))
