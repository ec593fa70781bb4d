"""Seeded simulation of automatic canary analysis through the real controller, ledger and engine.

Run: .venv/bin/python load_tests/simulate_rollout.py [--runs 1000] [--long-runs 200] [--seed 1]
     [--jobs N] [--only NAME]

Every simulated second, in every run: each gateway process (2 by default) gets Poisson arrivals, splits
them between the versions by its own smooth weighted round-robin (the canary's count over any window is
within one of its weight), draws failures (binomial), caller faults (4xx, the caller's: not evidence)
and latency buckets (multinomial over the gateway's buckets of a lognormal, median 20 ms, sigma 0.5:
p95 45.5 ms), adds them to its cumulative per-choice tallies and publishes them. The rollout
controller's own `advance` (gateway.rollout.controller) takes the readings into the rollout's `Ledger`
(gateway.stats.accounting: restarted processes are never counted twice), calls `decide` and applies
the decision; a step up changes the weight the processes split by. Failures in a row are drawn exactly
per process (the position of the last success in a second is random), as the counters count them.

Rows, 1000 runs each (`--runs`) unless marked long (`--long-runs`: those that must run 30 minutes or
more of simulated time per run):
  - A/A: the canary behaves as the baseline; any rollback is a false one (budget: false_rollback_rate,
    1%). The run ends when promoted or at its horizon. Variants: error levels and low traffic, process
    departures and a crash loop, bursts of errors shared by both versions, the error null's edge
    (max_error_odds_ratio 2, canary odds exactly twice the baseline's at every moment, bursts included),
    sticky users with heterogeneous failure rates, a pinning adversary, caller faults, a 50% baseline error
    rate at low traffic and a shared outage.
  - False promotions: a canary outside the margins; any step up or promotion is a false one (budget:
    false_promotion_rate, 5%).
  - Detection: a worse canary held at 5% (the rollout paused: it still rolls back, never steps up);
    the time from the regression's start to the rollback. Some start after 10 or 30 healthy minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from gateway.rollout.controller import advance, new_record
from gateway.routing.table import Model, Rollout, Version
from gateway.stats.accounting import Reading
from gateway.stats.kinds import BUCKETS, CHOICES, LATENCY_BUCKETS, Choice, Outcome
from gateway.stats.records import Tally

Floats = npt.NDArray[np.float64]

MEDIAN, SIGMA = 0.020, 0.5
BASE_P95 = MEDIAN * math.exp(SIGMA * 1.6448536269514722)
STEPS = (5, 25, 50, 100)


def bucket_probabilities(median: float, sigma: float = SIGMA) -> Floats:
    """The gateway's latency buckets' probabilities under a lognormal (the last one is +Inf)."""
    cdf = [0.5 * (1 + math.erf(math.log(b / median) / (sigma * math.sqrt(2)))) for b in LATENCY_BUCKETS]
    return np.diff(np.array([0.0, *cdf, 1.0]))


def tail_law(share: float, factor: float) -> Floats:
    """Like the baseline, except `share` of the requests at `factor` times the baseline's p95."""
    at = np.zeros(BUCKETS)
    at[int(np.searchsorted(LATENCY_BUCKETS, BASE_P95 * factor))] = 1.0
    out: Floats = (1 - share) * bucket_probabilities(MEDIAN) + share * at
    return out


BASE_LAW = bucket_probabilities(MEDIAN)


def rollout(**settings: object) -> Rollout:
    return replace(Rollout("base", "canary", STEPS), **settings)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "aa" (false rollbacks), "promotion" (false promotions), "detect" (time to roll back)
    config: Rollout = field(default_factory=rollout)
    rate: float = 1000.0  # requests a second, all processes together
    base_errors: float = 0.002
    error_factor: float = 1.0  # canary's odds of failing (aa: 1) or rate multiplier (others)
    odds: bool = False  # error_factor multiplies the odds, not the rate
    error_increase: float = 0.0  # added to the canary's error rate
    canary_law: Floats = field(default_factory=lambda: BASE_LAW)
    change_at: int = 0  # second the canary's regression begins
    paused: bool = False  # held at the first step: watches, never steps up
    horizon: int = 1800
    long: bool = False
    processes: int = 2
    restart_every: int = 0  # one process crashes and restarts this often (its last second is lost)
    depart_every: int = 0  # a process leaves for good and a new one takes its place this often
    bursts: tuple[int, int, float] | None = None  # every, length, error rate shared by both versions
    outage: tuple[int, int] | None = None  # from, to: every request of both versions fails
    sticky_share: float = 0.0  # of the traffic, sticky users (20,000; 0.5% fail 30%)
    pinned_rate: float = 0.0  # requests a second pinned to the canary by an adversary, all failing
    caller_faults: float = 0.0  # share of the split requests that are the caller's fault (4xx)


def scenarios() -> list[Scenario]:
    tail = tail_law(0.075, 10.0)
    slow15, slow50 = bucket_probabilities(MEDIAN * 1.15), bucket_probabilities(MEDIAN * 1.5)
    return [
        Scenario("A/A 0.2% errors", "aa"),
        Scenario("A/A 1% errors", "aa", base_errors=0.01),
        Scenario("A/A 20 req/s, 1% errors", "aa", rate=20.0, base_errors=0.01, long=True),
        Scenario("A/A, 4 processes, one replaced every 60 s", "aa", processes=4, depart_every=60),
        Scenario("A/A, a process crash-looping every 40 s", "aa", restart_every=40),
        Scenario("A/A, 10 s bursts of 20% errors every 120 s, else 0.1%", "aa", base_errors=0.001,
                 bursts=(120, 10, 0.2)),
        Scenario("odds ratio at the null's edge (2), with bursts", "aa", base_errors=0.001,
                 bursts=(120, 10, 0.2), error_factor=2.0, odds=True,
                 config=rollout(max_error_odds_ratio=2.0)),
        Scenario("A/A, 30% sticky users, 0.5% of users fail 30%", "aa", sticky_share=0.3),
        Scenario("A/A, an adversary pins 20 req/s to the canary, all failing", "aa", pinned_rate=20.0),
        Scenario("A/A, 20% of requests are caller faults (4xx)", "aa", caller_faults=0.2),
        Scenario("A/A 20 req/s, 50% errors (failures in a row)", "aa", rate=20.0, base_errors=0.5,
                 horizon=3600, long=True),
        Scenario("A/A, a shared outage: both fail everything for 30 s", "aa", outage=(20, 50)),
        Scenario("p95 10.6x: 7.5% of requests at 10x the p95", "promotion", canary_law=tail),
        Scenario("uniformly 1.15x slower, max_latency_increase 5%", "promotion", canary_law=slow15,
                 config=rollout(max_latency_increase=0.05)),
        Scenario("errors +0.5 points, max_error_rate_increase 0.25 points", "promotion",
                 error_increase=0.005, config=rollout(max_error_rate_increase=0.0025)),
        Scenario("errors 3x", "detect", error_factor=3.0, paused=True),
        Scenario("errors 10x", "detect", error_factor=10.0, paused=True),
        Scenario("p95 +50%", "detect", canary_law=slow50, paused=True),
        Scenario("errors 3x after 10 healthy minutes", "detect", error_factor=3.0, paused=True,
                 change_at=600, horizon=1200, long=True),
        Scenario("p95 +50% after 10 healthy minutes", "detect", canary_law=slow50, paused=True,
                 change_at=600, horizon=1200, long=True),
        Scenario("errors 3x after 30 healthy minutes", "detect", error_factor=3.0, paused=True,
                 change_at=1800, horizon=2400, long=True),
        Scenario("p95 +50% after 30 healthy minutes", "detect", canary_law=slow50, paused=True,
                 change_at=1800, horizon=2400, long=True),
    ]  # fmt: skip


@dataclass
class Process:
    """One gateway process: its cumulative tallies, its own split and its run of canary failures."""

    id: str
    started: float
    phase: float  # where its round-robin starts
    tallies: dict[str, list[int]] = field(default_factory=dict)  # outcomes + buckets, per key
    split: int = 0  # split requests since the weight last changed
    canary: int = 0  # of which to the canary
    weight: int = -1
    streak: int = 0

    def add(self, key: str, outcomes: list[int], buckets: npt.NDArray[np.int64]) -> None:
        row = self.tallies.setdefault(key, [0] * (len(Outcome) + BUCKETS))
        for i, n in enumerate(outcomes):
            row[i] += n
        for i in np.flatnonzero(buckets):
            row[len(Outcome) + i] += int(buckets[i])

    def reading(self) -> Reading:
        n = len(Outcome)
        return Reading(
            self.id,
            self.started,
            {k: Tally(tuple(v[:n]), tuple(v[n:]), 0.0) for k, v in self.tallies.items()},
        )


@dataclass(frozen=True)
class RunResult:
    rollback: float  # seconds from the regression's start (or the run's) to the rollback; inf: none
    promoted: float  # inf: not promoted
    stepped_up: float  # first step up; inf: none
    fired: str | None


def _trailing_failures(rng: np.random.Generator, n: int, failures: int) -> int:
    """Failures after the last non-failure, for `failures` placed at random among `n` (n > failures)."""
    k = 0
    while k < failures and rng.random() < (failures - k) / (n - k):
        k += 1
    return k


class World:
    """The traffic of one run: error rates and latency laws over time."""

    def __init__(self, sc: Scenario, rng: np.random.Generator) -> None:
        self.sc, self.rng = sc, rng
        bad_users = rng.binomial(20_000, 0.005)  # sticky users, hashed at the canary's weight below
        self.bad_share = bad_users / 20_000

    def base_rate(self, t: int) -> float:
        sc = self.sc
        if sc.outage is not None and sc.outage[0] <= t < sc.outage[1]:
            return 1.0
        if sc.bursts is not None and t % sc.bursts[0] < sc.bursts[1]:
            return sc.bursts[2]
        return sc.base_errors

    def canary_rate(self, t: int) -> float:
        sc, e = self.sc, self.base_rate(t)
        if t < sc.change_at or e >= 1.0:
            return e
        if sc.odds:
            odds = e / (1 - e) * sc.error_factor
            return odds / (1 + odds)
        return min(1.0, e * sc.error_factor + sc.error_increase)

    def canary_law(self, t: int) -> Floats:
        return BASE_LAW if t < self.sc.change_at else self.sc.canary_law


def _serve(
    rng: np.random.Generator, p: Process, key: str, n: int, rate: float, law: Floats, faults: float
) -> tuple[int, int]:
    """n requests to one version; returns (served, failed)."""
    if n <= 0:
        return 0, 0
    cf = int(rng.binomial(n, faults)) if faults else 0
    served = n - cf
    failed = int(rng.binomial(served, rate))
    outcomes = [0] * len(Outcome)
    outcomes[Outcome.OK], outcomes[Outcome.SERVER_ERROR], outcomes[Outcome.CLIENT_ERROR] = (
        served - failed,
        failed,
        cf,
    )
    p.add(key, outcomes, rng.multinomial(served, law) if served else np.zeros(BUCKETS, dtype=np.int64))
    return n - failed, failed


def run_one(sc: Scenario, seed: int) -> RunResult:
    rng = np.random.default_rng(seed)
    world = World(sc, rng)
    versions = {v: Version(v, "triton", "m", str(i + 1)) for i, v in enumerate(("base", "canary"))}
    model = Model("m", versions, split=(("base", 100), ("canary", 0)), rollout=sc.config)
    starts = iter(range(10**9))
    procs = [Process(f"p{next(starts)}", 0.0, rng.uniform()) for _ in range(sc.processes)]
    record = new_record(model, "sim", 0.0, [p.reading() for p in procs])
    if sc.paused:
        record = replace(record, state=replace(record.state, phase="paused"))
    split, sticky, pinned = (f"{{}}/{CHOICES[c]}" for c in (Choice.SPLIT, Choice.STICKY, Choice.PINNED))
    stepped = math.inf
    for t in range(1, sc.horizon + 1):
        weight = record.state.weight
        e_b, e_c, law_c = world.base_rate(t), world.canary_rate(t), world.canary_law(t)
        lost = -1
        if sc.restart_every and t % sc.restart_every == 0:
            lost = 0
        if sc.depart_every and t % sc.depart_every == 0:
            lost = t // sc.depart_every % sc.processes
        for i, p in enumerate(procs):
            n = int(rng.poisson(sc.rate / sc.processes))
            n_sticky = int(rng.binomial(n, sc.sticky_share)) if sc.sticky_share else 0
            n_split = n - n_sticky
            if p.weight != weight:
                p.weight, p.split, p.canary = weight, 0, 0
            p.split += n_split
            now_canary = math.floor(p.split * weight / 100 + p.phase)
            n_c, p.canary = now_canary - p.canary, now_canary
            _serve(rng, p, split.format("base"), n_split - n_c, e_b, BASE_LAW, sc.caller_faults)
            ok, failed = _serve(rng, p, split.format("canary"), n_c, e_c, law_c, sc.caller_faults)
            if n_c:
                p.streak = p.streak + failed if ok == 0 else _trailing_failures(rng, n_c, failed)
            if n_sticky:  # users hashed to the canary at its weight; some of them fail 30% of the time
                s_c = int(rng.binomial(n_sticky, weight / 100))
                _serve(rng, p, sticky.format("base"), n_sticky - s_c, e_b, BASE_LAW, 0.0)
                sticky_rate = min(1.0, e_c + world.bad_share * 0.3)
                _serve(rng, p, sticky.format("canary"), s_c, sticky_rate, law_c, 0.0)
            if sc.pinned_rate and i == 0:
                _serve(rng, p, pinned.format("canary"), int(rng.poisson(sc.pinned_rate)), 1.0, law_c, 0.0)
            if i == lost:  # crashed before publishing this second: a new run, counting from zero
                procs[i] = Process(f"p{next(starts)}", float(t), rng.uniform())
        readings = [p.reading() for p in procs if p.started < t]
        streak = max(p.streak for p in procs)
        record, decision = advance(model, record, float(t), readings, True, streak)
        since = float(t - sc.change_at)
        if decision.action == "step_up":
            stepped = min(stepped, float(t))
        elif decision.action == "rollback":
            return RunResult(since, math.inf, stepped, decision.evidence.get("fired"))
        elif decision.action == "promote":
            return RunResult(math.inf, float(t), min(stepped, float(t)), None)
        elif decision.action == "hold":
            break
    return RunResult(math.inf, math.inf, stepped, None)


def run_rows(job: tuple[Scenario, int, int]) -> list[RunResult]:
    sc, runs, seed = job
    return [run_one(sc, int(s)) for s in np.random.SeedSequence(seed).generate_state(runs)]


def _median(times: list[float]) -> str:
    if not times:
        return "-"
    value = float(np.quantile(times, 0.5, method="inverted_cdf"))
    return "never" if math.isinf(value) else f"{value:.0f} s"


def table(results: list[tuple[Scenario, list[RunResult]]]) -> list[str]:
    lines = [
        "| scenario | runs | false rollbacks | false promotions | rolled back · median s from start "
        "· p95 | promoted · median s |",
        "|---|---|---|---|---|---|",
    ]
    for sc, runs in results:
        n = len(runs)
        backs = [r.rollback for r in runs]
        rolled = sum(math.isfinite(x) for x in backs)
        promoted = [r.promoted for r in runs]
        ups = sum(math.isfinite(r.stepped_up) for r in runs)
        false_back = f"{rolled}/{n} ({rolled / n:.1%})" if sc.kind == "aa" else ""
        false_up = f"{ups}/{n} ({ups / n:.1%})" if sc.kind == "promotion" else ""
        p95 = float(np.quantile(backs, 0.95, method="inverted_cdf"))
        detect = (
            f"{rolled}/{n} · {_median(backs)} · {'never' if math.isinf(p95) else f'{p95:.0f} s'}"
            if sc.kind != "aa"
            else ""
        )
        done = sum(math.isfinite(x) for x in promoted)
        promote = f"{done}/{n} · {_median(promoted)}" if sc.kind == "aa" else ""
        lines.append(f"| {sc.name} | {n} | {false_back} | {false_up} | {detect} | {promote} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs per row (default 1000)")
    parser.add_argument("--long-runs", type=int, default=200, help="runs per long row (default 200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="", help="rows whose name contains this")
    args = parser.parse_args(argv)
    started = time.monotonic()
    print(f"$ {shlex.join([os.path.relpath(sys.executable), *sys.argv])}", flush=True)
    chosen = [sc for sc in scenarios() if args.only in sc.name]
    seeds = np.random.SeedSequence(args.seed).generate_state(len(chosen))
    # Each row in chunks of 50 runs, so the processes share the work evenly.
    jobs: list[tuple[Scenario, int, int]] = []
    owner: list[int] = []
    for i, (sc, s) in enumerate(zip(chosen, seeds, strict=True)):
        runs = args.long_runs if sc.long else args.runs
        for chunk, first in enumerate(range(0, runs, 50)):
            jobs.append((sc, min(50, runs - first), int(s) * 1000 + chunk))
            owner.append(i)
    merged: list[list[RunResult]] = [[] for _ in chosen]
    run: Callable[[tuple[Scenario, int, int]], list[RunResult]] = run_rows
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, rows in zip(owner, pool.map(run, jobs), strict=True):
            merged[i] += rows
    print(
        "Every run through gateway.rollout.controller.advance (Ledger + decide), once a simulated second; "
        "defaults: false_rollback_rate 1%, false_promotion_rate 5%, steps 5/25/50/100, "
        "max_error_rate_increase 0.5 points, max_latency_increase 20%, 1000 req/s, 0.2% errors, "
        "2 processes. Detection rows: the canary held at 5%."
    )
    print("\n".join(table(list(zip(chosen, merged, strict=True)))))
    print(f"runtime {time.monotonic() - started:.0f} s on {os.cpu_count()} cores, {args.jobs} jobs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
