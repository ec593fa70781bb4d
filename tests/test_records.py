"""Typed records between processes: round trips, rejection of malformed input, and readers that skip it.

The worker snapshot (`gateway.state.records`), the statistics payload (`gateway.stats.records`) and the
rollout record and command (`gateway.rollout.records`) are read back by other processes; a malformed
one must be skipped with a warning, never turn an admin view or `/metrics` into a 500.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.admin import app as admin
from gateway.admin import metrics
from gateway.admin.control_plane import ControlPlane
from gateway.rollout.controller import RolloutController, operator_action, spec_digest
from gateway.rollout.engine import RolloutState
from gateway.rollout.records import (
    HistoryEvent,
    OperatorCommand,
    RolloutRecord,
    command_name,
    read_record,
    record_name,
)
from gateway.rollout.sequential import ODDS_GRID, SHARE_FACTORS, Counts, Restarting
from gateway.rollout.statistics import TestStats as SequentialTests  # not a pytest class
from gateway.routing import config
from gateway.shadow.compare import Comparison, PairStats
from gateway.state import files as snapshots
from gateway.state.records import ReloadEvent, WorkerSnapshot
from gateway.stats.accounting import Ledger, Reading
from gateway.stats.counters import LATENCY_BUCKETS, Choice, Outcome, Stats, Totals
from gateway.stats.records import ProcessStats, Tally, VersionStats
from gateway.store.memory import MemoryStore
from gateway.typed_json import Fields, RecordError, parse_json

FD = "fraud-detector"
TOKEN = "s3cret-records-token"
BUCKETS = len(LATENCY_BUCKETS) + 1
ROUTES = """
backends:
  triton-a: {url: http://127.0.0.1:8010, timeout: 10s}
  triton-b: {url: http://127.0.0.1:8020, timeout: 10s}
models:
  fraud-detector:
    versions:
      2.1.3: {backend: triton-a, target: fraud_detector/3}
      2.2.0: {backend: triton-b, target: fraud_detector/4}
    split: {2.1.3: 100, 2.2.0: 0}
    rollout: {baseline: 2.1.3, canary: 2.2.0, steps: [10, 50, 100]}
keys: {required: false}
store: {url: "memory://"}
"""


def rollout_record() -> RolloutRecord:
    seen = Counts(40, 2, (1, 3) + (0,) * (BUCKETS - 2))
    state = RolloutState(
        "paused",
        1,
        50,
        100.5,
        seen,
        Counts(),
        SequentialTests(
            Restarting().restart(len(ODDS_GRID)),
            Restarting().restart(len(SHARE_FACTORS)),
            upper_bound=7,
            last_start=90.0,
            looks=3,
        ),
    )
    tally = Tally((5, 0, 1, 0, 0, 2), (2, 4) + (0,) * (BUCKETS - 2), 0.25)
    ledger = Ledger.begin(90.0).take(91.0, [Reading("host:7:ab", 80.0, {"2.1.3/split": tally})])
    return RolloutRecord(
        model=FD,
        spec="0123456789abcdef",
        id="5eed5eed5eed5eed",
        baseline="2.1.3",
        canary="2.2.0",
        state=state,
        ledger=ledger.take(92.0, [Reading("host:8:cd", 91.5, {"2.2.0/pinned": tally})]),
        history=(
            HistoryEvent(90.0, "start", 10, "controller"),
            HistoryEvent(100.5, "step_up", 50, "controller", {"reason": "no worse", "n": [1, 2]}),
            HistoryEvent(101.0, "pause", 50, "alice"),
        ),
        evidence={"reason": "no worse", "error_rate": 0.01},
        updated=101.0,
        last_command=1234567890123,
    )


def snapshot_json(pid: int, *, at: float | None = None) -> dict[str, Any]:
    """A worker snapshot as a worker writes it: 10 requests to fraud-detector 2.1.3, 8 of them 2xx."""
    now = time.time() if at is None else at
    counters = VersionStats((0, 8, 0, 1, 1), (8, 1, 1, 0, 0), (0, 4, 6) + (0,) * 46, 0.02, 1, 0)
    return {
        "pid": pid,
        "worker": 0,
        "started": now - 60,
        "time": now,
        "revision": "rev-a",
        "source": "routes.yaml",
        "reloads": [
            ReloadEvent(now - 60, True, "rev-a", "start", (), 2.5).to_json(),
            ReloadEvent(now - 30, False, None, "file", ("bad",), 1.0).to_json(),
        ],
        "reload_counts": {"ok": 1, "failed": 1},
        "health": {
            "backends": {"triton-a": {"ready": True, "detail": "", "checked_at": now}},
            "versions": {KEY: {"ready": False, "detail": "model not loaded", "checked_at": now}},
        },
        "splits": {FD: {"2.1.3": 100, "2.2.0": 0}},
        "stats": {"versions": {KEY: counters.to_json()}, "unrouted": [0, 0, 0, 3, 0]},
        "mirrors": {"in_flight": 0, "skipped": 4, "comparisons": {f"{FD}/2.1.3/2.2.0": comparison_json()}},
        "connections": 2,
        "admission": {
            "store_url": "memory://",
            "store_up": True,
            "on_error": "fail_closed",
            "live_processes": 1,
            "store_errors": 7,
            "fail_open": 0,
            "fail_closed": 3,
            "outcomes": [["team-a", FD, "admitted", 9], ["", FD, "no_key", 1]],
        },
        "rollouts": {"leader": True, "records": {FD: rollout_record().to_json()}},
        "internal_errors": 0,
        "audit_failures": 0,
        "schema_gate": {
            "held": {FD: "schema gate: fraud-detector 2.9.0 cannot take the traffic of 2.1.3 ..."},
            "recent": [{"time": now, "model": FD, "version": "2.9.0", "where": "rollout", "message": "..."}],
            "refused": {f"{FD}/2.9.0/rollout": 1},
            "allowed": {},
        },
    }


def comparison_json() -> dict[str, Any]:
    stats = PairStats()
    stats.add(Comparison(False, None, 1.5), 2.0)
    stats.add(Comparison(True, True, 0.0), -0.5)
    stats.not_compared["busy"] = 3
    return stats.to_json()


def through_json(data: Any) -> Any:
    return json.loads(json.dumps(data))


# -- round trips ---------------------------------------------------------------------------------


def test_worker_snapshot_round_trip() -> None:
    data = snapshot_json(101)
    snapshot = WorkerSnapshot.from_json(through_json(data))
    assert snapshot.to_json() == data
    assert WorkerSnapshot.from_json(through_json(snapshot.to_json())) == snapshot
    assert snapshot.reloads[1].revision is None and snapshot.reloads[1].errors == ("bad",)
    assert snapshot.health.versions[f"{FD}/2.1.3"].detail == "model not loaded"
    assert snapshot.admission.outcomes[0].key == "team-a" and snapshot.admission.outcomes[0].count == 9
    assert snapshot.rollouts.records[FD] == rollout_record()
    assert snapshot.alive  # the reader judges liveness; nothing written says so


def test_stats_round_trip_from_live_counters() -> None:
    stats = Stats()
    stats.counters(FD, "2.1.3").record(200, Outcome.OK, 0.004)
    stats.counters(FD, "2.1.3").record(503, Outcome.SERVER_ERROR, 0.2)
    stats.counters(FD, "2.1.3").record(400, Outcome.CLIENT_ERROR, 0.001, Choice.PINNED)
    stats.counters(FD, "2.1.3").record(200, Outcome.OK, 0.003, Choice.SHADOW)
    stats.unrouted[3] += 2
    published = stats.snapshot()
    assert stats.to_json() == published.to_json()
    store_payload = ProcessStats("host:1:ab", 12.5, published.versions)
    assert ProcessStats.from_json(through_json(store_payload.to_json())) == store_payload
    counters = ProcessStats.from_json(through_json(store_payload.to_json())).versions[f"{FD}/2.1.3"]
    assert counters.consecutive_failures == 1 and counters.statuses == (0, 1, 0, 1, 1)  # not the shadow
    assert Totals.merge([counters, counters]).requests == 6
    split, pinned, shadow = counters.tally("split"), counters.tally("pinned"), counters.tally("shadow")
    assert (split.requests, split.failures, split.caller_faults) == (2, 1, 0)
    assert (pinned.requests, pinned.caller_faults, sum(pinned.buckets)) == (0, 1, 0)  # no latency either
    assert (shadow.requests, sum(shadow.buckets)) == (1, 1)
    merged = Totals.merge([counters, counters])
    assert merged.choices[Choice.SPLIT].requests == 4 and merged.choices[Choice.PINNED].caller_faults == 2
    older = {k: v for k, v in counters.to_json().items() if k != "choices"}  # an older release's record
    assert VersionStats.read(Fields(older, "stats")).tally("split") == Tally()  # no evidence from it


def test_totals_merge_pads_and_cuts_lists_of_another_release() -> None:
    short = VersionStats((1,), (2, 1), (3,), 1.5, 2, 0)
    long = VersionStats((1,) * 9, (1,) * 9, (1,) * (BUCKETS + 3), 0.5, 1, 0)
    totals = Totals.merge([short, long])
    assert totals.statuses == (2, 1, 1, 1, 1) and totals.outcomes == (3, 2, 1, 1, 1, 1)
    assert len(totals.buckets) == BUCKETS and totals.buckets[0] == 4
    assert (totals.latency_sum, totals.in_flight) == (2.0, 3)


def test_rollout_record_and_command_round_trip() -> None:
    record = rollout_record()
    assert RolloutRecord.from_json(through_json(record.to_json())) == record
    fresh = RolloutRecord.from_json(
        through_json({k: v for k, v in record.to_json().items() if k != "last_command"})
    )
    assert fresh.last_command is None and "last_command" not in fresh.to_json()
    assert "evidence" not in record.history[0].to_json()  # only the engine's decisions carry evidence
    command = OperatorCommand(time.time_ns(), "rollback", "bob")
    assert OperatorCommand.from_json(through_json(command.to_json())) == command
    resumed = operator_action(record, "resume", "bob", 200.0)
    assert RolloutRecord.from_json(through_json(resumed.to_json())) == resumed
    assert resumed.state.phase == "progressing" and resumed.history[-1] == HistoryEvent(
        200.0, "resume", 50, "bob"
    )


# -- malformed input -----------------------------------------------------------------------------


_MISSING = object()
KEY = f"{FD}/2.1.3"
RECORD = ("rollouts", "records", FD)


def _set(path: tuple[str | int, ...], value: Any = _MISSING) -> Callable[[Any], None]:
    """A change to one field of a JSON document: a new value, or (without one) its removal."""

    def change(data: Any) -> None:
        for part in path[:-1]:
            data = data[part]
        if value is _MISSING:
            del data[path[-1]]
        else:
            data[path[-1]] = value

    return change


SNAPSHOT_DAMAGE = {
    "pid as a string": _set(("pid",), "101"),
    "pid as a bool": _set(("pid",), True),
    "time as null": _set(("time",), None),
    "reload ok as 1": _set(("reloads", 0, "ok"), 1),
    "reload errors not strings": _set(("reloads", 1, "errors"), [3]),
    "reloads not a list": _set(("reloads",), {}),
    "health ready as a string": _set(("health", "backends", "triton-a", "ready"), "yes"),
    "split weight as a float": _set(("splits", FD, "2.1.3"), 100.0),
    "bucket as a string": _set(("stats", "versions", KEY, "buckets", 1), "4"),
    "unrouted not a list": _set(("stats", "unrouted"), 3),
    "admission outcome too short": _set(("admission", "outcomes", 0), ["team-a", FD, "admitted"]),
    "admission outcome count as a string": _set(("admission", "outcomes", 1, 3), "1"),
    "rollout phase unknown": _set((*RECORD, "state", "phase"), "exploded"),
    "rollout buckets of another size": _set((*RECORD, "state", "seen_baseline", "buckets"), [1, 2]),
    "missing pid": _set(("pid",)),
    "missing stats": _set(("stats",)),
    "missing unrouted": _set(("stats", "unrouted")),
    "missing admission": _set(("admission",)),
    "missing consecutive_failures": _set(("stats", "versions", KEY, "consecutive_failures")),
    "missing rollout state": _set((*RECORD, "state")),
    "missing reload revision": _set(("reloads", 1, "revision")),
}


@pytest.mark.parametrize("damage", SNAPSHOT_DAMAGE.values(), ids=SNAPSHOT_DAMAGE.keys())
def test_snapshot_with_a_bad_field_is_rejected(damage: Callable[[Any], None]) -> None:
    data = through_json(snapshot_json(101))
    damage(data)
    with pytest.raises(RecordError):
        WorkerSnapshot.from_json(data)


@pytest.mark.parametrize("data", [[], None, 5, "snapshot", [snapshot_json(101)]], ids=repr)
def test_non_objects_are_rejected(data: object) -> None:
    for read in (WorkerSnapshot.from_json, RolloutRecord.from_json, OperatorCommand.from_json):
        with pytest.raises(RecordError, match="expected an object"):
            read(data)
    with pytest.raises(RecordError):
        ProcessStats.from_json(data)


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(snapshot_json(101))[:500].encode(),  # cut short
        json.dumps(snapshot_json(101))[:-1].encode(),
        b"",
        b"\x00\xff\xfe garbage \x80",
        b"{pid: 101}",
    ],
    ids=["truncated", "last byte missing", "empty", "garbage bytes", "not JSON"],
)
def test_text_that_is_not_json_is_rejected(raw: bytes) -> None:
    with pytest.raises(RecordError, match="not JSON"):
        WorkerSnapshot.from_json(parse_json(raw))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_set(("action",), "explode"), "action"),
        (_set(("id",), "17"), "id"),
        (_set(("who",)), "who: missing"),
    ],
)
def test_malformed_commands_are_rejected(change: Callable[[Any], None], match: str) -> None:
    data = OperatorCommand(17, "pause", "alice").to_json()
    change(data)
    with pytest.raises(RecordError, match=match):
        OperatorCommand.from_json(data)


@pytest.mark.parametrize(
    "change",
    [
        _set(("history", 1, "evidence"), "a string"),
        _set(("history", 0, "weight"), 10.5),
        _set(("ledger", "totals", "2.2.0/pinned", "latency_sum"), "0.25"),
        _set(("ledger", "marks", "host:8:cd", "started")),
        _set(("ledger", "totals", "2.2.0/pinned", "outcomes", 0), -1),
        _set(("ledger",)),
        _set(("evidence",), None),
        _set(("updated",)),
        _set(("last_command",), "1234"),
        _set(("state", "tests", "errors", "components", 0, "log_weight"), "0.0"),
        _set(("state", "tests", "latency", "components", 0, "log_lr"), [0.0]),
        _set(("state", "tests", "looks"), True),
    ],
)
def test_malformed_rollout_records_are_rejected(change: Callable[[Any], None]) -> None:
    data = through_json(rollout_record().to_json())
    change(data)
    with pytest.raises(RecordError):
        RolloutRecord.from_json(data)


# -- readers skip what they cannot read -----------------------------------------------------------


def bad_state_dir(state: Path) -> dict[str, Path]:
    """One valid worker snapshot and three that are not, side by side."""
    snapshots.prepare(state)
    snapshots.write_snapshot(state, WorkerSnapshot.from_json(snapshot_json(101)))
    workers = state / snapshots.WORKERS
    bad_field = snapshot_json(103)
    bad_field["health"]["backends"]["triton-a"]["ready"] = "yes"
    files = {
        "garbage": workers / "102.json",
        "bad field": workers / "103.json",
        "half-written": workers / "104.json",
        "not an object": workers / "105.json",
    }
    files["garbage"].write_bytes(b"\x00\xff\xfe not json at all")
    files["bad field"].write_text(json.dumps(bad_field))
    files["half-written"].write_text(json.dumps(snapshot_json(104))[:300])
    files["not an object"].write_text("[1, 2, 3]")
    return files


def test_read_snapshots_skips_malformed_files_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.state")
    state = tmp_path / "state"
    files = bad_state_dir(state)

    workers = snapshots.read_snapshots(state)
    assert [w.pid for w in workers] == [101] and workers[0].alive
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(files)
    for path in files.values():
        assert sum(str(path) in message for message in warnings) == 1
    assert any("triton-a.ready" in message for message in warnings)  # the reason names the field

    caplog.clear()
    assert [w.pid for w in snapshots.read_snapshots(state)] == [101]
    assert caplog.records == []  # the same files again: already reported

    later = time.time_ns() + 5_000_000_000
    os.utime(files["bad field"], ns=(later, later))
    snapshots.read_snapshots(state)
    assert [str(files["bad field"]) in r.getMessage() for r in caplog.records] == [True]


def test_read_snapshots_marks_stale_workers_gone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    snapshots.prepare(state)
    snapshots.write_snapshot(state, WorkerSnapshot.from_json(snapshot_json(101)))
    gone = snapshot_json(102, at=time.time() - snapshots.STALE_AFTER - 1)
    snapshots.write_snapshot(state, WorkerSnapshot.from_json(gone))
    assert [(w.pid, w.alive) for w in snapshots.read_snapshots(state)] == [(101, True), (102, False)]


def _samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


async def _never() -> None:
    raise AssertionError("no reload expected")


def plane_with_bad_files(tmp_path: Path) -> ControlPlane:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    plane = ControlPlane(str(routes), tmp_path / "state", _never)
    bad_state_dir(tmp_path / "state")
    return plane


def test_metrics_render_with_malformed_snapshots_present(tmp_path: Path) -> None:
    samples = _samples(metrics.render(plane_with_bad_files(tmp_path)))
    code = frozenset({("model", FD), ("version", "2.1.3"), ("code", "2xx")})
    assert samples[("gateway_requests_total", code)] == 8
    assert samples[("gateway_workers", frozenset({("state", "alive")}))] == 1
    assert samples[("gateway_store_errors_total", frozenset())] == 7
    assert samples[("gateway_mirror_skipped_total", frozenset())] == 4
    admitted = frozenset({("key", "team-a"), ("model", FD), ("outcome", "admitted")})
    assert samples[("gateway_admission_total", admitted)] == 9
    weight = frozenset({("model", FD)})
    assert samples[("gateway_rollout_canary_weight", weight)] == 50


async def test_admin_api_answers_with_malformed_snapshots_and_records(tmp_path: Path) -> None:
    plane = plane_with_bad_files(tmp_path)
    store = MemoryStore()
    await store.put_state(record_name(FD), {"model": FD, "spec": 5})
    app = admin.build_admin_app(plane, {TOKEN: "tester"}, store)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with TestClient(TestServer(app)) as client:

        async def get(path: str) -> Any:
            async with client.get(path, headers=headers) as response:
                assert response.status == 200, (path, await response.text())
                return await response.json() if path.startswith("/api/") else await response.text()

        text = await get("/metrics")
        assert 'gateway_requests_total{code="2xx",model="fraud-detector",version="2.1.3"} 8.0' in text
        versions = await get("/api/versions")
        row = versions["models"][FD]["2.1.3"]
        assert row["total"]["requests"] == 10 and row["in_flight"] == 1
        assert row["ready"] is False and row["not_ready_reason"] == "model not loaded"
        routes = await get("/api/routes")
        assert routes["worker_revisions"] == {"101": "rev-a"}
        assert routes["models"][FD]["split_live"] == {"2.1.3": 100, "2.2.0": 0}
        assert routes["backends"]["triton-a"]["health"]["101"]["ready"] is True
        assert routes["backends"]["triton-b"]["health"] == {"101": None}
        reloads = await get("/api/reloads")
        events = [(e["pid"], e["ok"], e["trigger"], e["duration_ms"]) for e in reloads["events"]]
        assert events == [(101, False, "file", 1.0), (101, True, "start", 2.5)]
        assert reloads["last_error"]["errors"] == ["bad"]
        backends = await get("/api/backends")
        assert set(backends) == {"101"} and backends["101"]["alive"] is True
        assert set(backends["101"]) == {"alive", "backends", "versions"}
        store_view = await get("/api/store")
        assert store_view == {
            "101": {
                "alive": True,
                "store_url": "memory://",
                "store_up": True,
                "on_error": "fail_closed",
                "live_processes": 1,
                "store_errors": 7,
                "fail_open": 0,
                "fail_closed": 3,
            }
        }
        status = await get("/api/status")
        assert status["workers"] == {"alive": 1, "gone": 0} and status["reload_failing"] == ["101"]
        rollouts = (await get("/api/rollouts"))["rollouts"][FD]
        assert rollouts["record"] is None and rollouts["differs_from_file"] is False
        assert "rollout record.spec" in rollouts["record_error"]


# -- the controller ------------------------------------------------------------------------------


async def test_controller_treats_a_malformed_record_as_absent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.rollout")
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    table = config.load_table(routes)
    store = MemoryStore()
    await store.put_state(record_name(FD), {"model": FD, "state": "garbage"})
    await store.put_state(command_name(FD), {"id": "x", "action": "pause", "who": "alice"})
    await store.put_stats("elsewhere", {"versions": {f"{FD}/2.1.3": {"statuses": "lots"}}}, 5.0)
    followed: list[dict[str, Any]] = []
    controller = RolloutController(store, "here", Stats(), lambda model, version: True, followed.append)

    await controller.tick(table)
    record = await read_record(store, FD)
    assert record is not None and record.spec == spec_digest(table.models[FD])
    assert record.history[-1].action == "start" and record.state.weight == 10
    assert controller.records == {FD: record}
    assert dict(followed[-1][FD]) == {"2.1.3": 90, "2.2.0": 10}
    messages = [r.getMessage() for r in caplog.records]
    assert any("stored record is unreadable" in m for m in messages)
    assert any("malformed statistics" in m for m in messages)

    caplog.clear()
    for _ in range(3):
        await controller.tick(table)  # the malformed command is ignored, and reported once
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreadable operator command" in m for m in messages) == 1
    assert not any("record is unreadable" in m for m in messages)
    stored = await read_record(store, FD)
    assert stored is not None and stored.state.phase == "progressing"

    await store.put_state(command_name(FD), OperatorCommand(42, "pause", "alice", stored.id).to_json())
    await controller.tick(table)
    paused = await read_record(store, FD)
    assert paused is not None and paused.state.phase == "paused" and paused.last_command == 42
    assert paused.history[-1] == HistoryEvent(paused.updated, "pause", 10, "alice")
