"""The rollout's statistics, checked exactly where they can be: each factor of every e-process is at most
1 in expectation at the edge of its null, the confidence sequences cover, the p95 bounds bracket the
true p95, the alpha shares add up, and restarting removes the evidence debt."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.rollout import Plan
from gateway.rollout import p95 as p95_bounds
from gateway.rollout.sequential import (
    MAX_COMPONENTS,
    ODDS_GRID,
    SHARE_FACTORS,
    Counts,
    Restarting,
    count_bounds,
    share_increments,
    split_increments,
    start_weight,
)
from gateway.rollout.statistics import MIN_STREAK, streak_limit
from gateway.rollout.statistics import TestStats as Stats  # not a test class
from gateway.routing.table import Rollout
from gateway.stats.kinds import BUCKETS, LATENCY_BUCKETS
from load_tests.simulate_rollout import BASE_P95, MEDIAN, bucket_probabilities

DEFAULT = Rollout("1.0", "1.1", (5, 25, 50, 100))


def _noncentral(n_c: int, n_b: int, events: int, psi: float) -> list[tuple[int, float]]:
    """Fisher's noncentral hypergeometric law of the canary's events given the interval's totals."""
    xs = range(max(0, events - n_b), min(events, n_c) + 1)
    weights = [math.comb(n_c, x) * math.comb(n_b, events - x) * psi**x for x in xs]
    total = sum(weights)
    return [(x, w / total) for x, w in zip(xs, weights, strict=True)]


@pytest.mark.parametrize("null_odds", [1.0, 1.5, 3.0])
def test_each_error_factor_is_at_most_one_in_expectation_inside_the_null(null_odds: float) -> None:
    """Given an interval's counts the canary's failures follow the noncentral hypergeometric law whatever
    the baseline's rate; at the null's edge (odds ratio = null_odds) and inside it no alternative gains in
    expectation: that is what makes the mixture an e-process, bursts or not."""
    for psi in (null_odds, null_odds / 2, 0.3):
        for n_c, n_b in ((1, 19), (5, 95), (50, 950), (60, 40)):
            share = n_c / (n_c + n_b)
            for events in (1, 2, 5, 12, 40):
                if events > n_c + n_b:
                    continue
                expectation = [0.0] * len(ODDS_GRID)
                for x, p in _noncentral(n_c, n_b, events, psi):
                    for k, inc in enumerate(split_increments(x, events - x, share, null_odds)):
                        expectation[k] += p * math.exp(inc)
                assert max(expectation) <= 1 + 1e-9, (psi, n_c, n_b, events)
    # Missing data is never evidence.
    assert split_increments(0, 0, 0.05, null_odds) == [0.0] * len(ODDS_GRID)
    assert split_increments(3, 0, 1.0, null_odds) == [0.0] * len(ODDS_GRID)


def test_each_latency_factor_is_at_most_one_in_expectation_at_5_percent_slow() -> None:
    for share in (0.05, 0.02):
        for n in (1, 7, 50, 300):
            expectation = [0.0] * len(SHARE_FACTORS)
            for x in range(n + 1):
                log_weight = math.log(math.comb(n, x)) + x * math.log(share) + (n - x) * math.log1p(-share)
                for k, inc in enumerate(share_increments(x, n, p95_bounds.TAIL_SHARE)):
                    expectation[k] += math.exp(log_weight + inc)
            assert max(expectation) <= 1 + 1e-9, (share, n)


def test_restarting_keeps_the_budget_and_removes_the_evidence_debt() -> None:
    # The start weights sum to one: a mixture over any number of starts is still started at most at 1.
    assert sum(start_weight(k) for k in range(10_000)) == pytest.approx(1.0, abs=1e-4)
    assert sum(start_weight(k) for k in range(10_000)) <= 1.0
    # Ten minutes of a healthy canary (5% share, both at 0.2%), then it fails 5x as often.
    rng = np.random.default_rng(3)
    threshold = math.log(1 / Plan.of(DEFAULT).error_alpha)

    def seconds_to_threshold(restart_every: int | None) -> int:
        process = Restarting().restart(len(ODDS_GRID))
        for t in range(1, 3000):
            if restart_every and t % restart_every == 0:
                process = process.restart(len(ODDS_GRID))
                assert len(process.components) <= MAX_COMPONENTS
            rate = 0.002 if t <= 600 else 0.01
            c, b = int(rng.binomial(50, rate)), int(rng.binomial(950, 0.002))
            before = process.log_e()
            process = process.add(split_increments(c, b, 0.05, 1.0))
            if t <= 600 and restart_every is None:
                assert process.log_e() < before + 5  # drifting, not climbing
            if process.log_e() >= threshold:
                return t - 600
        return 10**6

    once, restarting = seconds_to_threshold(None), seconds_to_threshold(60)
    assert restarting < once


def test_count_bounds_cover_the_estimate_and_tighten() -> None:
    assert count_bounds(0, 0, 0.01) == (0.0, 1.0)
    low, high = count_bounds(0, 1000, 0.01)
    assert low == 0.0 and 0.0 < high < 0.02
    previous = 1.0
    for n in (100, 1000, 10_000, 100_000):
        low, high = count_bounds(n // 100, n, 0.0025)
        assert low <= 0.01 <= high and high - low < previous
        previous = high - low


def test_the_p95_bounds_bracket_the_true_p95() -> None:
    rng = np.random.default_rng(0)
    law = bucket_probabilities(MEDIAN)
    for n in (2_000, 200_000):
        buckets = tuple(int(x) for x in rng.multinomial(n, law))
        low, high = p95_bounds.lower_bound(buckets, 0.0025), p95_bounds.upper_bound(buckets, 0.0025)
        assert 0 <= low < high
        assert LATENCY_BUCKETS[low] < BASE_P95 <= LATENCY_BUCKETS[high]
    # Tight with plenty of data: within a few 5%-buckets of each other.
    assert high - low <= 4
    few = (100,) + (0,) * (BUCKETS - 1)
    assert p95_bounds.upper_bound(few, 0.01) == -1 and p95_bounds.lower_bound(few, 0.01) == -1


def test_latency_margins_are_what_the_buckets_represent() -> None:
    # Stepping up uses at most the margin, rolling back at least it: both conservative.
    for margin in (0.05, 0.1, 0.2, 0.5):
        up, down = p95_bounds.effective_margins(margin)
        assert 0 < up <= margin + 1e-4 and margin <= down < margin + 0.06
        assert p95_bounds.margin_problem(margin) is None
    problem = p95_bounds.margin_problem(0.02)
    assert problem is not None and "finer than the latency buckets" in problem


def test_the_shares_of_alpha_add_up_and_beta_is_spread_over_the_decisions() -> None:
    plan = Plan.of(DEFAULT)
    spent = plan.error_alpha + plan.latency_alpha + plan.bound_alpha * plan.decisions + plan.streak_alpha
    assert spent == pytest.approx(DEFAULT.false_rollback_rate)
    assert plan.decisions == 3 and plan.promote_alpha * 4 * plan.decisions == pytest.approx(0.05)
    assert Plan.of(Rollout("1.0", "1.1", (10, 100))).decisions == 1


def test_the_streak_limit_follows_the_baseline() -> None:
    plan, tests = Plan.of(DEFAULT), Stats(looks=10, canary_requests=5000)
    limits = [
        streak_limit(plan, tests, Counts(1000, failures, (1000,) + (0,) * (BUCKETS - 1)))
        for failures in (0, 10, 100, 500)
    ]
    assert limits == sorted(limits) and limits[0] >= MIN_STREAK and limits[-1] > 2 * limits[0]
    assert streak_limit(plan, tests, Counts(1000, 1000, (1000,) + (0,) * (BUCKETS - 1))) == math.inf
    # More canary requests, or more looks, make the limit stricter to keep the same share of alpha.
    longer = Stats(looks=1000, canary_requests=500_000)
    one = Counts(1000, 10, (1000,) + (0,) * (BUCKETS - 1))
    assert streak_limit(plan, longer, one) >= streak_limit(plan, tests, one)
