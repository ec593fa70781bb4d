"""Where a version's p95 lies, from its latency buckets, and which latency margins the buckets can test.

The rollout's latency tests (gateway.rollout.statistics) compare the canary's p95 with (1 + m) times the
baseline's, m = `max_latency_increase`. Neither p95 is estimated: every statement is of the form "the
share of requests slower than bucket bound B is above (or at most) 5%", which is exactly "the p95 is
above (or at most) B", and each such share has a time-uniform confidence sequence
(gateway.rollout.sequential.count_bounds). Bounds are indices into LATENCY_BUCKETS; bucket k holds
(B[k-1], B[k]] and the last one is +Inf.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

from gateway.rollout.sequential import count_bounds
from gateway.stats.kinds import LATENCY_BUCKETS

TAIL_LEVEL = 0.95  # the quantile the latency tests look at
TAIL_SHARE = 1.0 - TAIL_LEVEL  # a p95 above a bound: more than this share of requests slower than it
MIN_BOUND_REQUESTS = 200  # requests before a version's p95 is bounded at all
# The bounds are rounded to 6 significant digits, so a shift of d buckets is 1.05**d within 2e-5; a
# margin within this of a represented one counts as represented.
MARGIN_TOLERANCE = 1e-4
BOUNDS = len(LATENCY_BUCKETS)  # bound indices are 0 .. BOUNDS - 1


@functools.cache  # pure, of a handful of margins: decide calls it every look
def _ratios(shift: int) -> tuple[float, ...]:
    return tuple(
        upper / lower for lower, upper in zip(LATENCY_BUCKETS, LATENCY_BUCKETS[shift:], strict=False)
    )


@functools.cache  # pure, of a handful of margins: decide calls it every look
def rollback_shift(margin: float) -> int:
    """d_hi: the fewest buckets with every B[i + d] >= (1 + margin) B[i] (rolling back is conservative)."""
    for shift in range(len(LATENCY_BUCKETS)):
        if all(ratio >= 1.0 + margin for ratio in _ratios(shift)):
            return shift
    return len(LATENCY_BUCKETS)


@functools.cache  # pure, of a handful of margins: decide calls it every look
def promote_shift(margin: float) -> int:
    """d_lo: the most buckets with every B[i + d] <= (1 + margin) B[i] (stepping up is conservative)."""
    shift = 0
    while shift + 1 < len(LATENCY_BUCKETS) and max(_ratios(shift + 1)) <= 1.0 + margin + MARGIN_TOLERANCE:
        shift += 1
    return shift


@functools.cache  # pure, of a handful of margins: decide calls it every look
def effective_margins(margin: float) -> tuple[float, float]:
    """The margins the two tests really use: (stepping up, rolling back), from the bucket shifts.

    Stepping up shows p95_c <= (1 + first) x (a bound below p95_b), so first <= margin; rolling back shows
    p95_c > (1 + second) x (a bound above p95_b), so second >= margin.
    """
    down, up = promote_shift(margin), rollback_shift(margin)
    first = max(_ratios(down)) - 1.0 if down else 0.0
    second = min(_ratios(up)) - 1.0 if up < len(LATENCY_BUCKETS) else float("inf")
    return first, second


@functools.cache  # pure, of a handful of margins: decide calls it every look
def margin_problem(margin: float) -> str | None:
    """Why the buckets cannot test a latency margin, or None when they can (for validation)."""
    if promote_shift(margin) > 0:
        return None
    finest = max(_ratios(1)) - 1.0
    return (
        f"{margin:.4g} is finer than the latency buckets, which are {finest:.2%} apart: a canary could be "
        f"stepped up only when shown faster than its baseline; use at least {finest:.3f}"
    )


def _slower(buckets: Sequence[int]) -> list[int]:
    """slower[k]: requests slower than LATENCY_BUCKETS[k] (in buckets k + 1 and above)."""
    above = list(itertools.accumulate(reversed(buckets)))[::-1]  # above[k]: requests in bucket k and up
    return [*above[1:], 0]


def slower_than(buckets: Sequence[int], bound: int) -> int:
    """Requests slower than LATENCY_BUCKETS[bound]: the buckets entirely above it."""
    return sum(buckets[bound + 1 :])


def _empirical_p95(slower: Sequence[int], total: int) -> int:
    """The lowest bound with at most 5% of the requests slower than it (BOUNDS: none)."""
    return next((k for k in range(BOUNDS) if slower[k] <= TAIL_SHARE * total), BOUNDS)


def upper_bound(buckets: Sequence[int], alpha: float) -> int:
    """u: the lowest bound whose share of slower requests is shown at most 5% (time-uniform, level alpha),
    so p95 <= LATENCY_BUCKETS[u]; -1 with too little data, or when even the last bound is not shown.

    One confidence sequence covers the choice of u among all bounds: a lower bound has more requests
    above it and a larger upper confidence bound, so u below the true p95 would mean the sequence at the
    bound just below the p95 failed.
    """
    total = sum(buckets)
    if total < MIN_BOUND_REQUESTS:
        return -1
    slower = _slower(buckets)
    for k in range(_empirical_p95(slower, total), len(LATENCY_BUCKETS)):
        if count_bounds(slower[k], total, alpha)[1] <= TAIL_SHARE:
            return k
    return -1


def lower_bound(buckets: Sequence[int], alpha: float) -> int:
    """l: the highest bound whose share of slower requests is shown above 5% (time-uniform, level alpha),
    so p95 > LATENCY_BUCKETS[l]; -1 with too little data or none shown (same one-sequence argument)."""
    total = sum(buckets)
    if total < MIN_BOUND_REQUESTS:
        return -1
    slower = _slower(buckets)
    for k in range(min(_empirical_p95(slower, total), len(LATENCY_BUCKETS)) - 1, -1, -1):
        if count_bounds(slower[k], total, alpha)[0] > TAIL_SHARE:
            return k
    return -1


def seconds(bound: int) -> float:
    return LATENCY_BUCKETS[bound]
