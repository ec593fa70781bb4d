"""The rollout controller: applies the engine's decisions. One process decides, every process follows.

Every second each gateway process publishes its cumulative per-version statistics to the store and
tries to take (or renew) the controller lease. The holder merges every process's statistics, feeds
the engine, and writes each rollout's record (state, weights, evidence) to the store. Every process,
holder or not, reads the records and routes by their weights. Killing the holder stops its renewals;
another process takes the lease when it expires (LEASE_TTL) and carries on from the stored state, so
no step is taken twice.

A record is keyed by the model and carries a digest of the rollout's spec (its settings and the two
versions' definitions): a rolled-back canary stays rolled back across restarts and reloads of the same
file, and a changed spec starts a new rollout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.rollout.engine import Observation, counts_of, decide, initial_state
from gateway.rollout.records import (
    HistoryEvent,
    Offset,
    OperatorCommand,
    RolloutRecord,
    command_name,
    read_command,
    read_record,
    record_name,
    write_record,
)
from gateway.routing.table import Model, RouteTable
from gateway.stats.counters import Stats, Totals
from gateway.stats.records import ProcessStats
from gateway.store.base import Store
from gateway.typed_json import RecordError, WarnOnce

log = logging.getLogger("gateway.rollout")

LEASE = "rollout-controller"
LEASE_TTL = 3.0  # seconds; a dead holder is replaced within this plus one tick
STATS_TTL = 5.0
HISTORY = 50
FINISHED = ("promoted", "rolled_back")
Weights = dict[str, tuple[tuple[str, int], ...]]


def spec_digest(model: Model) -> str:
    rollout = model.rollout
    assert rollout is not None
    spec = (rollout, model.versions[rollout.baseline], model.versions[rollout.canary])
    return hashlib.sha256(repr(spec).encode()).hexdigest()[:16]


def merged(processes: Sequence[ProcessStats], key: str) -> Totals:
    return Totals.merge([p.versions[key] for p in processes if key in p.versions])


def weights_of(model: Model, canary_weight: int) -> tuple[tuple[str, int], ...]:
    """The split a rollout imposes: baseline and canary share it, other versions get nothing."""
    rollout = model.rollout
    assert rollout is not None
    return tuple(
        (v, canary_weight if v == rollout.canary else 100 - canary_weight if v == rollout.baseline else 0)
        for v in model.versions
    )


def new_record(model: Model, now: float, processes: Sequence[ProcessStats]) -> RolloutRecord:
    rollout = model.rollout
    assert rollout is not None
    state = initial_state(rollout, now)
    return RolloutRecord(
        model=model.name,
        spec=spec_digest(model),
        baseline=rollout.baseline,
        canary=rollout.canary,
        state=state,
        offset=Offset.of(
            merged(processes, f"{model.name}/{rollout.baseline}"),
            merged(processes, f"{model.name}/{rollout.canary}"),
        ),
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
        "resume": {"phase": "progressing"},
        "promote": {"phase": "promoted", "weight": 100},
        "rollback": {"phase": "rolled_back", "weight": 0},
    }
    state = dataclasses.replace(state, **changes[action])
    history = (*record.history, HistoryEvent(now, action, state.weight, who))[-HISTORY:]
    return dataclasses.replace(record, state=state, history=history, updated=now)


class RolloutController:
    def __init__(
        self,
        store: Store,
        process_id: str,
        stats: Stats,
        ready: Callable[[str, str], bool],
        on_weights: Callable[[Weights], None],
        on_event: Callable[[str, dict[str, Any]], None] = lambda model, event: None,
    ) -> None:
        self.store = store
        self.process_id = process_id
        self.stats = stats
        self.ready = ready  # (model, version) -> does this process see it ready
        self.on_weights = on_weights
        self.on_event = on_event  # every start and decision (as JSON), for the audit log
        self.leader = False
        self.records: dict[str, RolloutRecord] = {}
        self._warned = WarnOnce()  # every process reads every record every second

    async def tick(self, table: RouteTable) -> None:
        """One round: publish, decide if leader, follow. Raises StoreUnavailable when the store is down."""
        models = [m for m in table.models.values() if m.rollout is not None]
        if not models:
            if self.records:
                self.records = {}
                self.on_weights({})
            return
        published = ProcessStats(self.stats.snapshot().versions)
        await self.store.put_stats(self.process_id, published.to_json(), STATS_TTL)
        self.leader = await self.store.lease(LEASE, self.process_id, LEASE_TTL)
        if self.leader:
            processes = self._processes(await self.store.get_stats())
            for model in models:
                await self._decide(model, processes)
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

    async def _decide(self, model: Model, processes: list[ProcessStats]) -> None:
        rollout = model.rollout
        assert rollout is not None
        now = time.time()
        record = await self._record(model.name)
        if record is None or record.spec != spec_digest(model):
            record = new_record(model, now, processes)
            log.info(
                "rollout of %s %s -> %s started at %d%%",
                model.name,
                rollout.baseline,
                rollout.canary,
                record.state.weight,
            )
            await write_record(self.store, record)
            self.on_event(model.name, record.history[-1].to_json())
            return
        command = await self._command(model.name)
        if command is not None and command.id != record.last_command:
            try:
                record = operator_action(record, command.action, command.who, now)
                log.warning("rollout of %s: %s by %s", model.name, command.action, command.who)
            except ValueError as exc:
                log.warning(
                    "rollout of %s: %s by %s ignored: %s", model.name, command.action, command.who, exc
                )
            await write_record(self.store, dataclasses.replace(record, last_command=command.id))
            return
        state = record.state
        if state.phase in FINISHED:
            return
        base_key, canary_key = f"{model.name}/{rollout.baseline}", f"{model.name}/{rollout.canary}"
        baseline, canary = merged(processes, base_key), merged(processes, canary_key)
        consecutive = max(
            (p.versions[canary_key].consecutive_failures for p in processes if canary_key in p.versions),
            default=0,
        )
        observation = Observation(
            counts_of(baseline.minus(record.offset.baseline)),
            counts_of(canary.minus(record.offset.canary)),
            self.ready(model.name, rollout.canary),
            consecutive,
            now,
        )
        state, decision = decide(rollout, state, observation)
        history = record.history
        if decision.action != "continue":
            event = HistoryEvent(now, decision.action, decision.weight, "controller", decision.evidence)
            history = (*history, event)[-HISTORY:]
            self.on_event(model.name, event.to_json())
            log.warning(
                "rollout of %s: %s to %d%%: %s",
                model.name,
                decision.action,
                decision.weight,
                decision.evidence.get("reason", ""),
            )
        record = dataclasses.replace(
            record,
            state=state,
            offset=Offset.of(baseline, canary) if decision.action == "step_up" else record.offset,
            history=history,
            evidence=decision.evidence,
            updated=now,
        )
        await write_record(self.store, record)
