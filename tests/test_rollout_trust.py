"""The rollout controller in process, on the memory store with a clock the test turns: operator commands
belong to one rollout and apply once, a controller that lost its lease cannot write, the record is
stored before the audit log is written, and an unwritable audit log loses no decision."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import app as admin
from gateway.admin.control_plane import ControlPlane
from gateway.rollout.controller import LEASE, LEASE_TTL, RolloutController, spec_digest
from gateway.rollout.records import OperatorCommand, RolloutRecord, command_name, read_record
from gateway.routing.config import parse_table
from gateway.routing.table import RouteTable
from gateway.stats.counters import Choice, Outcome, Stats
from gateway.store.memory import MemoryStore

FD = "fraud-detector"
TOKEN = "trust-token"


def routes(baseline: str = "2.1.3", canary: str = "2.2.0", steps: str = "[10, 50, 100]") -> str:
    return f"""
backends:
  a: {{url: "http://127.0.0.1:9", timeout: 1s}}
models:
  {FD}:
    versions:
      2.1.3: {{backend: a, target: fraud_detector/3}}
      2.2.0: {{backend: a, target: fraud_detector/4}}
      2.3.0: {{backend: a, target: fraud_detector/5}}
    split: {{2.1.3: 100, 2.2.0: 0, 2.3.0: 0}}
    rollout: {{baseline: {baseline}, canary: {canary}, steps: {steps}, min_step_duration: 1s,
              max_error_rate_increase: 0.0,
              min_step_requests: 10}}
keys: {{required: false}}
store: {{url: "memory://"}}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def controller(store: MemoryStore, name: str, stats: Stats | None = None, **kwargs: Any) -> RolloutController:
    return RolloutController(store, name, stats or Stats(), lambda m, v: True, lambda weights: None, **kwargs)


async def record_of(store: MemoryStore) -> RolloutRecord:
    record = await read_record(store, FD)
    assert record is not None
    return record


@pytest.mark.parametrize(
    ("action", "phase"), [("promote", "promoted"), ("rollback", "rolled_back"), ("pause", "paused")]
)
async def test_a_command_of_one_rollout_never_acts_on_the_next(action: str, phase: str) -> None:
    store = MemoryStore()
    leader = controller(store, "one")
    first = parse_table(routes("2.1.3", "2.2.0"))
    await leader.tick(first)
    record = await record_of(store)
    await store.put_state(command_name(FD), OperatorCommand(7, action, "alice", record.id).to_json())  # type: ignore[arg-type]
    await leader.tick(first)
    applied = await record_of(store)
    assert applied.state.phase == phase and applied.last_command == 7
    for _ in range(3):  # read again every second: applied once
        await leader.tick(first)
    assert [e.action for e in (await record_of(store)).history].count(action) == 1

    second = parse_table(routes("2.2.0", "2.3.0"))  # the file changes the rollout: B -> C
    for _ in range(3):
        await leader.tick(second)
    fresh = await record_of(store)
    assert fresh.spec == spec_digest(second.models[FD]) and fresh.id != record.id
    assert (fresh.state.phase, fresh.state.weight, fresh.last_command) == ("progressing", 10, None)
    assert [e.action for e in fresh.history] == ["start"]


async def test_a_command_without_a_rollout_id_is_ignored() -> None:
    store = MemoryStore()
    leader = controller(store, "one")
    table = parse_table(routes())
    await leader.tick(table)
    await store.put_state(command_name(FD), {"id": 9, "action": "promote", "who": "old-cli"})
    await leader.tick(table)
    assert (await record_of(store)).state.phase == "progressing"


async def test_a_controller_that_lost_its_lease_cannot_write() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    table = parse_table(routes())
    stale, fresh = controller(store, "stale"), controller(store, "fresh")
    await stale.tick(table)
    assert stale.leader and not (await _tick(fresh, table)).leader
    token = await store.lease(LEASE, stale.process_id, LEASE_TTL)
    clock.now += LEASE_TTL + 1  # the leader stalls past its lease; the other takes over
    await fresh.tick(table)
    assert fresh.leader
    taken_over = await record_of(store)
    model = table.models[FD]
    # The stalled one wakes up mid-decision with its old token: nothing is written.
    assert not await stale._decide(model, [], clock.now, token)
    assert await record_of(store) == taken_over
    await stale.tick(table)
    assert not stale.leader


async def _tick(c: RolloutController, table: RouteTable) -> RolloutController:
    await c.tick(table)
    return c


async def test_the_record_is_stored_before_the_audit_and_a_failing_audit_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="gateway.rollout")
    clock = Clock()
    store = MemoryStore(clock=clock)
    table = parse_table(routes(steps="[50, 100]"))
    stats = Stats()
    seen_at_audit: list[str] = []

    def audit(model: str, event: dict[str, Any]) -> None:
        record = store._states.get(f"rollout:{model}")  # what the store holds when the audit is written
        seen_at_audit.append(f"{event['action']}:{'rolled_back' in (record or '')}")
        raise OSError(28, "No space left on device")

    leader = controller(store, "one", stats, on_event=audit)
    for _ in range(60):
        for i in range(100):  # a canary failing a third of its requests, a baseline failing none
            stats.counters(FD, "2.1.3").record(200, Outcome.OK, 0.002, Choice.SPLIT)
            if i % 3:
                stats.counters(FD, "2.2.0").record(200, Outcome.OK, 0.002, Choice.SPLIT)
            else:
                stats.counters(FD, "2.2.0").record(500, Outcome.SERVER_ERROR, 0.002, Choice.SPLIT)
        await leader.tick(table)
        clock.now += 1.0
        if (await record_of(store)).state.phase == "rolled_back":
            break
    record = await record_of(store)
    assert record.state.phase == "rolled_back" and record.state.weight == 0
    assert seen_at_audit == ["start:False", "rollback:True"]  # stored first, audited after
    assert sum("auditing it failed" in r.getMessage() for r in caplog.records) == 2
    await leader.tick(table)
    assert (await record_of(store)).state.phase == "rolled_back"  # and it stays so


async def test_admin_binds_a_command_to_the_running_rollout(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(routes())
    table = parse_table(routes())

    async def no_reload() -> None:
        raise AssertionError("no reload expected")

    plane = ControlPlane(str(path), tmp_path / "state", no_reload)
    store = MemoryStore()
    app = admin.build_admin_app(plane, {TOKEN: "tester"}, store)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with TestClient(TestServer(app)) as client:

        async def act(action: str) -> tuple[int, dict[str, Any]]:
            async with client.post(f"/api/rollouts/{FD}/{action}", headers=headers) as response:
                return response.status, await response.json()

        status, body = await act("pause")
        assert status == 409 and "not started" in body["error"]  # nothing left waiting for a later rollout
        leader = controller(store, "one")
        await leader.tick(table)
        record = await record_of(store)
        status, body = await act("rollback")
        assert (status, body["rollout"]) == (202, record.id)
        await leader.tick(table)
        assert (await record_of(store)).state.phase == "rolled_back"
        status, body = await act("resume")
        assert status == 409 and "already rolled back" in body["error"]
