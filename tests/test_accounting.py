"""Per-process delta accounting, in process: the rollout's evidence is every request once, never more.

A small fleet model stands in for gateway processes: each run serves requests, publishes its cumulative
counters each second into a store whose entries live 5 s (as `put_stats` does), and the leader reads the
live ones. The ledger is sent through its JSON form between rounds, as the controller stores it, so a new
leader would see exactly what is tested here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from gateway.rollout.controller import advance, evidence_of, new_record, readings_of
from gateway.rollout.records import RolloutRecord
from gateway.routing.config import parse_table
from gateway.stats.accounting import FORGET_AFTER, Ledger, Reading
from gateway.stats.counters import Choice, Outcome, Stats
from gateway.stats.records import ProcessStats, Tally
from gateway.typed_json import Fields

TTL = 5.0  # controller.STATS_TTL
KEY = "2.2.0/split"


def tally(requests: int, failures: int = 0, caller_faults: int = 0) -> Tally:
    outcomes = (requests - failures, caller_faults, failures, 0, 0, 0)
    return Tally(outcomes, (requests,) + (0,) * (len(Tally().buckets) - 1), 0.001 * requests)


@dataclass
class Run:
    """One run of a gateway process: counters from zero at `started`."""

    id: str
    started: float
    served: int = 0
    failed: int = 0
    published: Tally = field(default_factory=Tally)

    def serve(self, requests: int, failures: int) -> None:
        self.served += requests
        self.failed += failures

    def publish(self) -> Tally:
        self.published = tally(self.served, self.failed)
        return self.published


class Fleet:
    """Runs publishing into a store with a time to live; `truth` is what the ledger must equal."""

    def __init__(self) -> None:
        self.store: dict[str, tuple[float, Reading]] = {}
        self.runs: list[Run] = []
        self.baseline: dict[str, Tally] = {}  # published counts of the runs seen when the ledger began

    def start(self, run_id: str, now: float) -> Run:
        run = Run(run_id, now)
        self.runs.append(run)
        return run

    def publish(self, run: Run, now: float) -> None:
        self.store[run.id] = (now + TTL, Reading(run.id, run.started, {KEY: run.publish()}))

    def live(self, now: float) -> list[Reading]:
        return [reading for expires, reading in self.store.values() if expires > now]

    def begin(self, now: float) -> Ledger:
        self.baseline = {reading.process: reading.tallies[KEY] for reading in self.live(now)}
        return Ledger.begin(now).take(now, self.live(now))

    def truth(self) -> int:
        """Requests published since the ledger began, each run counted from where it then stood."""
        return sum(run.published.requests - self.baseline.get(run.id, Tally()).requests for run in self.runs)


def stored(ledger: Ledger) -> Ledger:
    """The ledger as a new leader reads it back from the record."""
    return Ledger.read(Fields(json.loads(json.dumps(ledger.to_json())), "ledger"))


def naive_evidence(history: Iterable[list[Reading]]) -> int:
    """What the controller before the ledger fed its tests: the merged totals of the processes seen, as
    differences, with a drop taken for a reset (so everything seen is new again)."""
    fed, seen = 0, 0
    for readings in history:
        merged = sum(r.tallies[KEY].requests for r in readings)
        fed += merged if merged < seen else merged - seen
        seen = merged
    return fed


def run_scenario(seconds: int, events: dict[int, list[tuple[str, str]]], rng: random.Random) -> None:
    """Each second: events, serving, publishing, a leader round; asserts the ledger's promise each round."""
    fleet = Fleet()
    runs: dict[str, Run] = {name: fleet.start(f"{name}#0", -30.0) for name in ("a", "b", "c")}
    stalled: set[str] = set()
    for run in runs.values():
        run.serve(500, 1)
        fleet.publish(run, -1.0)
    ledger = fleet.begin(0.0)
    restarts: dict[str, int] = {}
    last_total, history = 0, []
    for now in range(1, seconds + 1):
        for action, name in events.get(now, []):
            if action == "leave":
                del runs[name]
            elif action == "restart":  # a crash: unpublished counts die with it, the new run starts at 0
                restarts[name] = restarts.get(name, 0) + 1
                runs[name] = fleet.start(f"{name}#{restarts[name]}", now - rng.random())
            elif action == "stall":
                stalled.add(name)
            elif action == "resume":
                stalled.discard(name)
        for name, run in runs.items():
            run.serve(rng.randint(20, 80), rng.randint(0, 1))
            if name not in stalled:
                fleet.publish(run, now)
        readings = fleet.live(now)
        rng.shuffle(readings)
        if rng.random() < 0.2:
            readings = readings + readings[:1]  # the same reading twice in one round adds nothing
        history.append(readings)
        ledger = stored(ledger.take(now, readings))
        total = ledger.total(KEY)
        assert total.requests >= last_total, f"went backwards at {now} s"
        assert total.requests == fleet.truth(), f"at {now} s"
        assert total.failures <= sum(r.failed for r in fleet.runs)
        last_total = total.requests
    naive = naive_evidence(history)
    print(f"\nledger {last_total} requests, naive merge {naive}, served {fleet.truth()}")


def test_a_process_that_leaves_is_not_counted_twice() -> None:
    run_scenario(60, {20: [("leave", "b")]}, random.Random(1))


def test_a_crash_loop_every_40_seconds_is_counted_once() -> None:
    events: dict[int, list[tuple[str, str]]] = {t: [("restart", "c")] for t in range(40, 601, 40)}
    run_scenario(600, events, random.Random(2))


def test_a_process_that_stalls_and_comes_back_is_counted_once() -> None:
    run_scenario(
        90,
        {10: [("stall", "a")], 22: [("resume", "a")], 50: [("stall", "b")], 53: [("resume", "b")]},
        random.Random(3),
    )


def test_the_merge_it_replaces_does_count_twice() -> None:
    """The scenario has teeth: the old merge of live totals overcounts it, by far."""
    fleet = Fleet()
    steady, looping = fleet.start("steady", -10.0), fleet.start("loop#0", -10.0)
    history = []
    for now in range(1, 201):
        if now % 40 == 0:
            looping = fleet.start(f"loop#{now}", now - 0.5)
        for run in (steady, looping):
            run.serve(50, 0)
            fleet.publish(run, now)
        history.append(fleet.live(now))
    assert naive_evidence(history) > 1.5 * sum(run.published.requests for run in fleet.runs)


@pytest.mark.parametrize("seed", range(40))
def test_random_fleets_never_overcount_and_never_go_backwards(seed: int) -> None:
    """Random departures, restarts, stalls (some longer than FORGET_AFTER) and missed leader rounds."""
    rng = random.Random(seed)
    fleet = Fleet()
    runs = {f"p{i}": fleet.start(f"p{i}#0", -rng.uniform(1, 100)) for i in range(rng.randint(1, 5))}
    for run in runs.values():
        run.serve(rng.randint(0, 300), 0)
        fleet.publish(run, -0.5)
    ledger = fleet.begin(0.0)
    stalled: dict[str, int] = {}
    last = 0
    for now in range(1, 400):
        for name in list(runs):
            roll = rng.random()
            if roll < 0.01:
                del runs[name]
            elif roll < 0.03:
                runs[name] = fleet.start(f"{name}#{now}", now - rng.random())
            elif roll < 0.04 and name not in stalled:
                stalled[name] = now + rng.choice([3, 8, 30, int(FORGET_AFTER) + 20])
        if rng.random() < 0.02:
            name = f"new{now}"
            runs[name] = fleet.start(f"{name}#0", now - rng.random())
        for name, run in runs.items():
            run.serve(rng.randint(0, 40), 0)
            if stalled.get(name, 0) <= now:
                stalled.pop(name, None)
                fleet.publish(run, now)
        if rng.random() < 0.15:
            continue  # no leader this second (a takeover, the store down)
        ledger = stored(ledger.take(now, fleet.live(now)))
        total = ledger.total(KEY).requests
        assert last <= total <= fleet.truth()
        last = total
    # Only a stall longer than FORGET_AFTER loses anything, and that is bounded by what it served.
    assert len(ledger.marks) <= len(fleet.runs)


def test_a_process_already_serving_counts_from_when_the_ledger_began() -> None:
    old = Reading("old", 10.0, {KEY: tally(1000, 7)})
    ledger = Ledger.begin(100.0).take(100.0, [old])
    assert ledger.total(KEY) == Tally()
    ledger = ledger.take(101.0, [Reading("old", 10.0, {KEY: tally(1030, 8)})])
    assert (ledger.total(KEY).requests, ledger.total(KEY).failures) == (30, 1)
    fresh = Reading("fresh", 100.5, {KEY: tally(12)})  # started after the ledger: all of it is new
    assert ledger.take(102.0, [fresh]).total(KEY).requests == 42


def test_counters_that_go_down_within_a_run_add_nothing() -> None:
    ledger = Ledger.begin(0.0).take(1.0, [Reading("r", 0.5, {KEY: tally(100)})])
    assert ledger.total(KEY).requests == 100
    lower = ledger.take(2.0, [Reading("r", 0.5, {KEY: tally(40)})])
    assert lower.total(KEY).requests == 100
    assert lower.take(3.0, [Reading("r", 0.5, {KEY: tally(130)})]).total(KEY).requests == 130


def test_a_run_forgotten_after_a_long_stall_is_never_counted_again() -> None:
    ledger = Ledger.begin(0.0).take(1.0, [Reading("r", 0.5, {KEY: tally(100)})])
    ledger = ledger.take(2.0 + FORGET_AFTER, [])
    assert "r" not in ledger.marks and ledger.horizon == 0.5
    back = ledger.take(3.0 + FORGET_AFTER, [Reading("r", 0.5, {KEY: tally(150)})])
    assert back.total(KEY).requests == 100  # the 50 of its stall are lost, the first 100 not doubled
    assert back.take(4.0 + FORGET_AFTER, [Reading("r", 0.5, {KEY: tally(170)})]).total(KEY).requests == 120


def test_a_new_step_counts_from_zero_with_the_same_marks() -> None:
    ledger = Ledger.begin(0.0).take(1.0, [Reading("r", 0.5, {KEY: tally(100)})]).restart()
    assert ledger.total(KEY) == Tally() and ledger.marks["r"].tallies[KEY].requests == 100
    assert ledger.take(2.0, [Reading("r", 0.5, {KEY: tally(125)})]).total(KEY).requests == 25


# -- the controller's pure round: the accounting feeding the real engine ------------------------------


ROUTES = """
backends:
  a: {url: "http://127.0.0.1:9", timeout: 1s}
models:
  fraud:
    versions:
      "2.1.3": {backend: a, target: fraud/1}
      "2.2.0": {backend: a, target: fraud/2}
    split: {"2.1.3": 100, "2.2.0": 0}
    rollout: {baseline: "2.1.3", canary: "2.2.0", steps: [25, 50, 100], min_step_duration: 30s,
              min_step_requests: 100}
keys: {required: false}
"""


def publish(stats: Stats, run: str, started: float) -> ProcessStats:
    return ProcessStats.from_json(
        json.loads(json.dumps(ProcessStats(run, started, stats.snapshot().versions).to_json()))
    )


def test_engine_sees_each_request_once_through_a_crash_loop_and_a_step() -> None:
    """Real counters, real records, the real engine: an A/A canary whose second worker crash-loops."""
    model = parse_table(ROUTES).models["fraud"]
    rng = random.Random(7)
    workers = {"w1": (Stats(), -5.0), "w2": (Stats(), -5.0)}
    first = [publish(stats, f"{name}@{started}", started) for name, (stats, started) in workers.items()]
    record: RolloutRecord = new_record(model, "rid", 0.0, readings_of(model, first))
    served = {"2.1.3": 0, "2.2.0": 0}  # split requests published since the step began
    published: dict[str, ProcessStats] = {}
    actions = []
    for now in range(1, 301):
        if now % 40 == 0:  # w2 crashes: a fresh run, its counters at zero
            workers["w2"] = (Stats(), now - 0.3)
        for name, (stats, started) in workers.items():
            for _ in range(rng.randint(200, 300)):
                version = "2.2.0" if rng.random() < record.state.weight / 100 else "2.1.3"
                how = Choice.STICKY if rng.random() < 0.3 else Choice.SPLIT
                stats.counters("fraud", version).record(200, Outcome.OK, 0.002, how)
                served[version] += how is Choice.SPLIT  # sticky callers are counted apart, never evidence
            stats.counters("fraud", "2.2.0").record(200, Outcome.OK, 5.0, Choice.PINNED)  # never evidence
            stats.counters("fraud", "2.2.0").record(400, Outcome.CLIENT_ERROR, 0.001)  # the caller's fault
            published[name] = publish(stats, f"{name}@{started}", started)
        readings = readings_of(model, list(published.values()))
        record, decision = advance(model, record, float(now), readings, True, 0)
        record = RolloutRecord.from_json(json.loads(json.dumps(record.to_json())))
        if decision.action != "continue":
            actions.append(decision.action)
        if decision.action == "step_up":
            assert evidence_of(record.ledger, "2.2.0").requests == 0  # the next step starts from zero
            served = {"2.1.3": 0, "2.2.0": 0}
            continue
        counts = record.evidence["counts"]
        assert (counts["baseline"]["requests"], counts["canary"]["requests"]) == (
            served["2.1.3"],
            served["2.2.0"],
        )
        traffic = record.evidence["traffic"]["2.2.0"]
        assert traffic["pinned"]["requests"] > 0 and traffic["pinned"]["evidence"] is False
        assert traffic["split"]["caller_faults"] > 0 and counts["canary"]["failures"] == 0
        assert traffic["sticky"]["evidence"] is False and traffic["sticky"]["requests"] > 0
        if decision.action == "promote":
            break
    assert actions == ["step_up", "promote"]
