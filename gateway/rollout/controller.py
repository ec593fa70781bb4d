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
from collections.abc import Callable
from typing import Any

from gateway.rollout.engine import Observation, RolloutState, counts_of, decide, initial_state
from gateway.stats import Stats, Totals
from gateway.store.base import Store
from gateway.table import Model, RouteTable

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


def record_name(model: str) -> str:
    return f"rollout:{model}"


def command_name(model: str) -> str:
    """Operators' commands go to their own record: only the lease holder writes the rollout record."""
    return f"rollout-command:{model}"


def totals_json(totals: Totals) -> dict[str, Any]:
    return {
        "statuses": list(totals.statuses),
        "outcomes": list(totals.outcomes),
        "buckets": list(totals.buckets),
        "latency_sum": totals.latency_sum,
        "in_flight": 0,
    }


def merged(processes: list[dict[str, Any]], key: str) -> Totals:
    return Totals.merge([p["versions"][key] for p in processes if key in p.get("versions", {})])


def weights_of(model: Model, canary_weight: int) -> tuple[tuple[str, int], ...]:
    """The split a rollout imposes: baseline and canary share it, other versions get nothing."""
    rollout = model.rollout
    assert rollout is not None
    return tuple(
        (v, canary_weight if v == rollout.canary else 100 - canary_weight if v == rollout.baseline else 0)
        for v in model.versions
    )


def new_record(model: Model, now: float, processes: list[dict[str, Any]]) -> dict[str, Any]:
    rollout = model.rollout
    assert rollout is not None
    state = initial_state(rollout, now)
    return {
        "model": model.name,
        "spec": spec_digest(model),
        "baseline": rollout.baseline,
        "canary": rollout.canary,
        "state": state.to_json(),
        "offset": {
            "baseline": totals_json(merged(processes, f"{model.name}/{rollout.baseline}")),
            "canary": totals_json(merged(processes, f"{model.name}/{rollout.canary}")),
        },
        "history": [{"time": now, "action": "start", "weight": state.weight, "by": "controller"}],
        "evidence": {},
        "updated": now,
    }


def operator_action(record: dict[str, Any], action: str, who: str, now: float) -> dict[str, Any]:
    """An operator's pause, resume, promote or rollback, applied to a stored record."""
    state = RolloutState.from_json(record["state"])
    if state.phase in FINISHED:
        raise ValueError(f"the rollout is already {state.phase.replace('_', ' ')}")
    changes: dict[str, dict[str, Any]] = {
        "pause": {"phase": "paused"},
        "resume": {"phase": "progressing"},
        "promote": {"phase": "promoted", "weight": 100},
        "rollback": {"phase": "rolled_back", "weight": 0},
    }
    state = dataclasses.replace(state, **changes[action])
    history = [*record["history"], {"time": now, "action": action, "weight": state.weight, "by": who}]
    return {**record, "state": state.to_json(), "history": history[-HISTORY:], "updated": now}


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
        self.on_event = on_event  # every start and decision, for the audit log
        self.leader = False
        self.records: dict[str, dict[str, Any]] = {}

    async def tick(self, table: RouteTable) -> None:
        """One round: publish, decide if leader, follow. Raises StoreUnavailable when the store is down."""
        models = [m for m in table.models.values() if m.rollout is not None]
        if not models:
            if self.records:
                self.records = {}
                self.on_weights({})
            return
        published = self.stats.to_json()
        await self.store.put_stats(self.process_id, {"versions": published["versions"]}, STATS_TTL)
        self.leader = await self.store.lease(LEASE, self.process_id, LEASE_TTL)
        if self.leader:
            processes = await self.store.get_stats()
            for model in models:
                await self._decide(model, processes)
        weights: Weights = {}
        records = {}
        for model in models:
            record = await self.store.get_state(record_name(model.name))
            if record is not None and record.get("spec") == spec_digest(model):
                records[model.name] = record
                weights[model.name] = weights_of(model, int(record["state"]["weight"]))
        self.records = records
        self.on_weights(weights)

    async def _decide(self, model: Model, processes: list[dict[str, Any]]) -> None:
        rollout = model.rollout
        assert rollout is not None
        now = time.time()
        record = await self.store.get_state(record_name(model.name))
        if record is None or record.get("spec") != spec_digest(model):
            record = new_record(model, now, processes)
            log.info(
                "rollout of %s %s -> %s started at %d%%",
                model.name,
                rollout.baseline,
                rollout.canary,
                record["state"]["weight"],
            )
            await self.store.put_state(record_name(model.name), record)
            self.on_event(model.name, record["history"][-1])
            return
        command = await self.store.get_state(command_name(model.name))
        if command is not None and command.get("id") != record.get("last_command"):
            try:
                record = operator_action(record, command["action"], command["who"], now)
                log.warning("rollout of %s: %s by %s", model.name, command["action"], command["who"])
            except ValueError as exc:
                log.warning(
                    "rollout of %s: %s by %s ignored: %s", model.name, command["action"], command["who"], exc
                )
            record["last_command"] = command.get("id")
            await self.store.put_state(record_name(model.name), record)
            return
        state = RolloutState.from_json(record["state"])
        if state.phase in FINISHED:
            return
        base_key, canary_key = f"{model.name}/{rollout.baseline}", f"{model.name}/{rollout.canary}"
        baseline, canary = merged(processes, base_key), merged(processes, canary_key)
        offset = record["offset"]
        consecutive = max(
            (
                p["versions"][canary_key].get("consecutive_failures", 0)
                for p in processes
                if canary_key in p["versions"]
            ),
            default=0,
        )
        observation = Observation(
            counts_of(baseline.minus(Totals.merge([offset["baseline"]]))),
            counts_of(canary.minus(Totals.merge([offset["canary"]]))),
            self.ready(model.name, rollout.canary),
            consecutive,
            now,
        )
        state, decision = decide(rollout, state, observation)
        record = {**record, "state": state.to_json(), "evidence": decision.evidence, "updated": now}
        if decision.action == "step_up":
            record["offset"] = {"baseline": totals_json(baseline), "canary": totals_json(canary)}
        if decision.action != "continue":
            event = {
                "time": now,
                "action": decision.action,
                "weight": decision.weight,
                "by": "controller",
                "evidence": decision.evidence,
            }
            record["history"] = [*record["history"], event][-HISTORY:]
            self.on_event(model.name, event)
            log.warning(
                "rollout of %s: %s to %d%%: %s",
                model.name,
                decision.action,
                decision.weight,
                decision.evidence.get("reason", ""),
            )
        await self.store.put_state(record_name(model.name), record)
