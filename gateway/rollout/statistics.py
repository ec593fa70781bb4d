"""The rollout's tests: what alpha and beta bound, and how each test spends its share of them.

alpha = `false_rollback_rate`: the probability of ever rolling back a canary that is within the margins,
over the whole rollout, however often it looks. Split by a union bound:
  - errors (ERROR_SHARE of alpha): a `Restarting` mixture of the conditional odds-ratio test
    (gateway.rollout.sequential) with the null "in every interval, odds(e_c) / odds(e_b) <= psi_m",
    psi_m = `max_error_odds_ratio`. The null holds whatever the baseline's rate does over time (bursts of
    errors shared by both versions cancel in each interval's conditioning).
  - latency (LATENCY_SHARE): a `Restarting` mixture of one-sample tests "the canary's share slower than V
    is at most 5%", V = (1 + m) x U rounded up to a bucket bound, U a time-uniform upper bound on the
    baseline's p95 (BOUND_SHARE, split over the steps, each step placing its own from its own data).
    Rolling back therefore means "the canary's p95 is shown above (1 + m) x the baseline's", m =
    `max_latency_increase`, assuming the baseline's latency distribution does not change in the rollout.
  - failures in a row (STREAK_SHARE): the limit is sized so that a canary failing no more often than the
    baseline does in the same interval reaches it with probability at most that share (`streak_limit`).
beta = `false_promotion_rate`: the probability of ever stepping up (or promoting) a canary outside the
margins. Each decision to step up is made on its own step's data, with four confidence sequences at
beta / (4 x decisions) each: the canary's error rate shown within `max_error_rate_increase` of the
baseline's (average rates over the step, so valid when they move together), and the canary's p95 shown
at most (1 + m) x a bound the baseline's p95 is shown above. The last step below 100% decides promotion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gateway.rollout import p95
from gateway.rollout.sequential import (
    ODDS_GRID,
    SHARE_FACTORS,
    Component,
    Counts,
    Restarting,
    count_bounds,
    share_increments,
    split_increments,
)
from gateway.routing.table import Rollout
from gateway.typed_json import Fields, RecordError

ERROR_SHARE, LATENCY_SHARE, BOUND_SHARE, STREAK_SHARE = 0.45, 0.30, 0.15, 0.10  # of alpha; they sum to 1
RESTART_SECONDS = 300.0  # a new component of each e-process starts at each step and at least this often
STEP_ERROR_MARGIN_FLOOR = 0.001  # with max_error_rate_increase 0, "no worse" would be unprovable
MIN_STREAK = 5  # never fewer failures in a row than this, however bad the baseline's interval looked


@dataclass(frozen=True, slots=True)
class Plan:
    """A rollout's settings turned into the tests' levels and margins."""

    null_odds: float  # psi_m
    error_alpha: float
    latency_alpha: float
    bound_alpha: float  # of each step's upper bound on the baseline's p95
    streak_alpha: float
    promote_alpha: float  # of each of the four confidence sequences behind one step up
    error_margin: float  # stepping up: the canary's error rate within this of the baseline's
    latency_margin: float  # m
    rollback_shift: int  # buckets from U to V
    promote_shift: int  # buckets from L to W
    decisions: int  # steps below 100%: each ends in a step up or the promotion

    @classmethod
    def of(cls, config: Rollout) -> Plan:
        alpha, decisions = config.false_rollback_rate, max(1, sum(1 for s in config.steps if s < 100))
        return cls(
            null_odds=config.max_error_odds_ratio,
            error_alpha=alpha * ERROR_SHARE,
            latency_alpha=alpha * LATENCY_SHARE,
            bound_alpha=alpha * BOUND_SHARE / decisions,
            streak_alpha=alpha * STREAK_SHARE,
            promote_alpha=config.false_promotion_rate / (4 * decisions),
            error_margin=max(config.max_error_rate_increase, STEP_ERROR_MARGIN_FLOOR),
            latency_margin=config.max_latency_increase,
            rollback_shift=p95.rollback_shift(config.max_latency_increase),
            promote_shift=p95.promote_shift(config.max_latency_increase),
            decisions=decisions,
        )


@dataclass(frozen=True, slots=True)
class TestStats:
    """The running statistics; they carry over steps, so each budget is spent once per rollout."""

    errors: Restarting = field(default_factory=Restarting)
    latency: Restarting = field(default_factory=Restarting)
    upper_bound: int = -1  # U's index: the baseline's p95 is at most it; -1 until one is placed
    last_start: float = -math.inf  # when the newest components started
    looks: int = 0  # intervals fed, for the streak rule's per-look levels
    canary_requests: int = 0  # fed over the whole rollout

    def to_json(self) -> dict[str, Any]:
        def process(e: Restarting) -> dict[str, Any]:
            return {
                "started": e.started,
                "components": [{"log_weight": c.log_weight, "log_lr": list(c.log_lr)} for c in e.components],
            }

        return {
            "errors": process(self.errors),
            "latency": process(self.latency),
            "upper_bound": self.upper_bound,
            "last_start": self.last_start if math.isfinite(self.last_start) else None,
            "looks": self.looks,
            "canary_requests": self.canary_requests,
        }

    @classmethod
    def read(cls, f: Fields) -> TestStats:
        """Raises RecordError on anything else (a record of another release, or a damaged one)."""

        def process(d: Fields, size: int) -> Restarting:
            components = []
            for c in d.entries("components"):
                log_lr = c.numbers("log_lr")
                if len(log_lr) != size:
                    raise RecordError(f"{c.where}.log_lr: expected {size} alternatives, got {len(log_lr)}")
                components.append(Component(c.number("log_weight"), log_lr))
            return Restarting(d.integer("started"), tuple(components))

        return cls(
            process(f.child("errors"), len(ODDS_GRID)),
            process(f.child("latency"), len(SHARE_FACTORS)),
            f.integer("upper_bound"),
            -math.inf if f.optional_number("last_start") is None else f.number("last_start"),
            f.integer("looks"),
            f.integer("canary_requests"),
        )


@dataclass(frozen=True, slots=True)
class Readout:
    error_log_e: float
    latency_log_e: float
    upper_bound: int  # U; -1: not placed yet
    canary_bound: int  # V = U + rollback_shift; -1: no latency test yet

    @classmethod
    def of(cls, plan: Plan, tests: TestStats) -> Readout:
        return cls(tests.errors.log_e(), tests.latency.log_e(), tests.upper_bound, _canary_bound(plan, tests))


def _canary_bound(plan: Plan, tests: TestStats) -> int:
    top = tests.upper_bound + plan.rollback_shift
    return top if tests.upper_bound >= 0 and top < p95.BOUNDS else -1


def advance(
    plan: Plan,
    tests: TestStats,
    baseline: Counts,
    canary: Counts,
    step_baseline_buckets: tuple[int, ...],
    now: float,
    step_started: float,
) -> TestStats:
    """Adds one interval (`baseline`, `canary`: what happened in it, both with requests) to the tests.

    `step_baseline_buckets` are the baseline's buckets in this step before the interval: U is placed from
    them (predictable), and kept until a later step places its own.
    """
    if (
        not tests.errors.started
        or step_started > tests.last_start
        or now - tests.last_start >= RESTART_SECONDS
    ):
        tests = TestStats(
            tests.errors.restart(len(ODDS_GRID)),
            tests.latency.restart(len(SHARE_FACTORS)),
            tests.upper_bound,
            now,
            tests.looks,
            tests.canary_requests,
        )
    placed = p95.upper_bound(step_baseline_buckets, plan.bound_alpha)
    upper = placed if placed >= 0 else tests.upper_bound
    share = canary.requests / (canary.requests + baseline.requests)
    errors = tests.errors.add(split_increments(canary.failures, baseline.failures, share, plan.null_odds))
    latency = tests.latency
    top = upper + plan.rollback_shift
    if upper >= 0 and top < p95.BOUNDS:
        slow = p95.slower_than(canary.buckets, top)
        latency = latency.add(share_increments(slow, sum(canary.buckets), p95.TAIL_SHARE))
    return TestStats(
        errors, latency, upper, tests.last_start, tests.looks + 1, tests.canary_requests + canary.requests
    )


def streak_limit(plan: Plan, tests: TestStats, baseline_recent: Counts) -> float:
    """Canary failures in a row that roll back at once; inf when the baseline gives no bound.

    If each canary request fails with probability at most p, the chance that a run of k ends at request
    i is at most p**k; with k_i such that p**k_i <= a / (i (i + 1)) the chance over all i is at most a.
    p is a confidence bound on the baseline's failure rate in the same (latest) interval, at a level
    that halves the share again over the looks: a failure shared by both versions raises p and the limit
    with it, so an outage of a common dependency rolls nothing back. Assumes the rates do not change
    within one interval (a second or so).
    """
    n = max(1, tests.canary_requests)
    look = max(1, tests.looks)
    half = plan.streak_alpha / 2
    p = count_bounds(baseline_recent.failures, baseline_recent.requests, half / (look * (look + 1)))[1]
    if p >= 1.0:
        return math.inf
    if p <= 0.0:
        return float(MIN_STREAK)
    return float(max(MIN_STREAK, math.ceil(math.log(half / (n * (n + 1))) / math.log(p))))


@dataclass(frozen=True, slots=True)
class NoWorse:
    """Whether this step's data show the canary within the margins, with the bounds that say so."""

    errors: bool
    latency: bool
    canary_error_ucb: float
    baseline_error_lcb: float
    lower_bound: int  # L's index: the baseline's p95 is shown above it; -1: not yet
    canary_bound: int  # W = L + promote_shift; the canary's p95 must be shown at most it
    canary_tail_ucb: float | None  # its share slower than W, at most
    representable: bool  # False: the latency margin is finer than the buckets (never shown)

    @property
    def shown(self) -> bool:
        return self.errors and self.latency


def no_worse(plan: Plan, baseline: Counts, canary: Counts) -> NoWorse:
    """This step's evidence for stepping up (each bound at level plan.promote_alpha)."""
    a = plan.promote_alpha
    c_ucb = count_bounds(canary.failures, canary.requests, a)[1]
    b_lcb = count_bounds(baseline.failures, baseline.requests, a)[0]
    errors = c_ucb - b_lcb <= plan.error_margin
    representable = plan.promote_shift > 0
    low = p95.lower_bound(baseline.buckets, a)
    top = low + plan.promote_shift
    if low < 0 or top >= p95.BOUNDS:
        return NoWorse(errors, False, c_ucb, b_lcb, low, -1, None, representable)
    served = sum(canary.buckets)
    tail_ucb = count_bounds(p95.slower_than(canary.buckets, top), served, a)[1]
    latency = representable and served > 0 and tail_ucb <= p95.TAIL_SHARE
    return NoWorse(errors, latency, c_ucb, b_lcb, low, top, tail_ucb, representable)
