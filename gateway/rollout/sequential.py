"""Anytime-valid sequential tests comparing a canary with its baseline (pure Python, no I/O).

Everything here is a function of counts. The engine (`gateway.rollout.engine`) feeds it what happened
between two of its calls, however far apart, and the tests stay valid however often it looks.

Errors: conditioning on the split. Between two calls the canary served n_c requests and the baseline
n_b, and F of them failed. Given those counts, the number of canary failures follows Fisher's
noncentral hypergeometric law with odds ratio psi = odds(e_c) / odds(e_b) (e = failure probability);
the baseline's own rate, and how much traffic there was, cancel out. The canary is no worse when
e_c <= e_b + delta (delta: `max_error_rate_increase`), i.e. psi <= psi0. For each alternative psi1 on
a grid (ODDS_GRID) we multiply, interval by interval, the likelihood ratio of Binomial(F, p(psi1))
against Binomial(F, p(psi0)), with p(psi) = s*psi / (s*psi + 1 - s) and s = n_c / (n_c + n_b); the
e-value is the grid mixture of those products (Robbins' method of mixtures; the mixture SPRT of
Lindon, Sanden & Shirikian 2022, who also condition Poisson counts on their total so that a varying
load cancels). Why it is valid:
  - with delta = 0 (psi0 = 1) the exact conditional law is the central hypergeometric, which is
    dominated in convex order by Binomial(F, s) (Hoeffding 1963, Thm. 4), and each factor is convex
    in the canary's failures, so its expectation is at most 1; for psi < psi0 the law is stochastically
    smaller (monotone likelihood ratio) and the increasing factor gains nothing. Each alternative's
    product is therefore a nonnegative supermartingale under every null, so is any mixture, and
    Ville's inequality bounds the chance that it ever reaches 1/alpha by alpha (Ville 1939; Ramdas,
    Grunwald, Vovk & Shafer 2023, "Game-theoretic statistics and safe anytime-valid inference").
  - with delta > 0, psi0 depends on the unknown e_b. odds(e + delta) / odds(e) decreases in e (for
    e < (1 - delta) / 2), so a time-uniform LOWER confidence bound L on e_b gives a psi0 at least as
    large as the true one; the test spends alpha_L on that bound (union bound). The bound is
    predictable (computed before the interval it is used on). A rate-ratio boundary would be slightly
    anti-conservative for Bernoulli counts; the odds-ratio one is not (checked exactly in the tests).

Latency: the same test on "slow" requests. The baseline's buckets give B_j, the bucket bound just below
its p95 (at least 5% of its requests are slower). Under "the canary is at most (1 + m) slower at that
tail level" the canary's share slower than B_{j+d} (d buckets further out, with B_{j+d} >= (1 + m) B_j)
is at most the baseline's share slower than B_j, so the slow requests of the two versions form the
same conditional test with psi0 = 1. Being a whole bucket further out is the conservative rounding:
a canary that is uniformly (1 + m) slower is never evidence, whatever bucket the p95 falls in, and
no quantile has to be estimated (the choice of j is predictable: made from earlier baseline data).

Stepping up needs the opposite: the canary shown no worse. Time-uniform confidence sequences (a
gamma-mixture of Poisson exponential supermartingales, Howard, Ramdas, McAuliffe & Sekhon 2021,
"Time-uniform, nonparametric, nonasymptotic confidence sequences"; valid for Bernoulli counts, which
are sub-Poisson) bound the canary's error rate and tail share from above and the baseline's from
below; the canary is no worse when the first stay within the margins of the second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.stats.counters import LATENCY_BUCKETS

BUCKETS = len(LATENCY_BUCKETS) + 1  # bucket counts per version; the last bucket is +Inf

# Alternatives for the mixture: odds ratios 1.25 .. 35.5, evenly spaced in log, equal prior weight.
# The simulation (load_tests/simulate_rollout.py) tried coarser and wider grids: the detection times
# barely move, because neighbouring alternatives share evidence; 1.25 keeps small regressions in reach.
ODDS_GRID: tuple[float, ...] = tuple(1.25**k for k in range(1, 17))
LOG_PRIOR = -math.log(len(ODDS_GRID))

PRIOR_SHAPE = 1.0  # gamma(c, c) mixture of the confidence sequences: tight from a few to ~1000 events
NEWTON_STEPS = 40  # iterations for a confidence bound; each iterate is already conservative
TAIL_LEVEL = 0.95  # the latency test looks at the baseline's p95
MIN_BOUND_REQUESTS = 200  # baseline requests in a step before its p95 bucket is trusted
STEP_ERROR_MARGIN_FLOOR = 0.001  # with an allowance of 0, "no worse" would be unprovable


@dataclass(frozen=True, slots=True)
class Plan:
    """How a rollout's settings turn into the tests' levels (alpha split) and margins."""

    allowance: float  # delta: absolute increase of the error rate that is still no worse
    latency_shift: int  # d: how many buckets further out the canary's tail is measured
    error_alpha: float  # level of the error e-process
    lcb_alpha: float  # level of the baseline's lower error bound (only when allowance > 0)
    latency_alpha: float  # level of the latency e-process
    step_alpha: float  # level of each of the four bounds that show the canary no worse
    step_error_margin: float  # the error allowance used to step up

    @classmethod
    def of(cls, alpha: float, allowance: float, max_latency_increase: float) -> Plan:
        # Half of the false-rollback budget each for errors and latency (union bound); with an
        # allowance, half of the error half goes to the bound on the baseline's rate.
        half = alpha / 2
        return cls(
            allowance=allowance,
            latency_shift=latency_shift(max_latency_increase),
            error_alpha=half / 2 if allowance > 0 else half,
            lcb_alpha=half / 2 if allowance > 0 else 0.0,
            latency_alpha=half,
            step_alpha=alpha / 4,
            step_error_margin=max(allowance, STEP_ERROR_MARGIN_FLOOR),
        )


def latency_shift(max_increase: float) -> int:
    """The fewest buckets d such that every bound B[i+d] >= (1 + max_increase) * B[i].

    Measured on the actual (rounded) bounds rather than assumed from the 1.25 factor.
    """
    for shift in range(len(LATENCY_BUCKETS)):
        pairs = zip(LATENCY_BUCKETS, LATENCY_BUCKETS[shift:], strict=False)
        if all(upper >= (1 + max_increase) * lower for lower, upper in pairs):
            return shift
    return len(LATENCY_BUCKETS)


def split_increments(canary_events: int, baseline_events: int, share: float, null_odds: float) -> list[float]:
    """Log likelihood ratio, per alternative in ODDS_GRID, of one interval's events.

    `share` is the canary's share of the interval's requests and `null_odds` the odds ratio psi0 at the
    edge of the null. An interval without traffic on both sides, or without events, adds nothing:
    missing data is never evidence. Alternatives at or below psi0 do not bet (factor 1).
    """
    if not 0.0 < share < 1.0 or not math.isfinite(null_odds) or canary_events + baseline_events == 0:
        return [0.0] * len(ODDS_GRID)
    events = canary_events + baseline_events
    null_norm = math.log(share * null_odds + 1.0 - share)
    out = []
    for odds in ODDS_GRID:
        if odds <= null_odds:
            out.append(0.0)
            continue
        norm = math.log(share * odds + 1.0 - share)
        out.append(canary_events * math.log(odds / null_odds) + events * (null_norm - norm))
    return out


def log_mixture(log_lrs: Sequence[float]) -> float:
    """Log of the e-value: the prior-weighted mean of the alternatives' likelihood ratios."""
    top = max(log_lrs)
    return top + LOG_PRIOR + math.log(sum(math.exp(x - top) for x in log_lrs))


def allowed_odds_ratio(baseline_lcb: float, allowance: float) -> float:
    """psi0: the largest odds ratio a canary within the allowance can have, given e_b >= baseline_lcb.

    Infinite (no test) until the baseline's rate is bounded away from 0, and when it may be so high that
    the odds ratio stops decreasing in it (a baseline failing half its requests: the guardrails act).
    """
    if allowance <= 0.0:
        return 1.0
    if baseline_lcb <= 0.0 or baseline_lcb >= (1.0 - allowance) / 2:
        return math.inf
    high = baseline_lcb + allowance
    return (high / (1.0 - high)) / (baseline_lcb / (1.0 - baseline_lcb))


def count_bounds(events: int, exposure: int, alpha: float) -> tuple[float, float]:
    """Time-uniform (1 - alpha) lower and upper bounds on a rate: events per unit of exposure.

    The gamma(c, c) mixture of exp(lambda*S - x*(e^lambda - 1)) over r = e^lambda is, in closed form,
    M(x) = e^x c^c Gamma(S + c) / (Gamma(c) (x + c)^(S + c)) with x = rate * exposure; the bounds are
    where log M(x) = log(1/alpha). log M is convex in x, so Newton's method from outside each root moves
    monotonically towards it: every iterate is already a valid (conservative) bound.
    """
    if exposure <= 0:
        return 0.0, 1.0
    s, c, target = float(events), PRIOR_SHAPE, math.log(1.0 / alpha)
    const = c * math.log(c) + math.lgamma(s + c) - math.lgamma(c) - target

    def excess(x: float) -> float:
        return x - (s + c) * math.log(x + c) + const

    def slope(x: float) -> float:
        return 1.0 - (s + c) / (x + c)

    low = 0.0
    for _ in range(NEWTON_STEPS):
        gap = excess(low)
        if not (gap > 0.0 and s > 0.0):
            break  # at (or, by rounding, a hair past) the root: nothing moves any more
        low -= gap / slope(low)
    high = s + c + target
    while excess(high) < 0.0:  # excess grows without bound above s: this ends
        high *= 2.0
    for _ in range(NEWTON_STEPS):
        gap = excess(high)
        if not gap > 0.0:
            break
        high -= gap / slope(high)
    return low / exposure, min(1.0, high / exposure)


def tail_bound(buckets: Sequence[int]) -> int:
    """Index i of LATENCY_BUCKETS[i], the bound just below the p95 bucket; -1 with too little data.

    At least 5% of the requests are slower than that bound (bucket k holds (B[k-1], B[k]]).
    """
    total = sum(buckets)
    if total < MIN_BOUND_REQUESTS:
        return -1
    rank = TAIL_LEVEL * total
    seen = 0
    for k, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return k - 1
    return -1


def slower_than(buckets: Sequence[int], bound: int) -> int:
    """Requests slower than LATENCY_BUCKETS[bound]: the buckets entirely above it."""
    return sum(buckets[bound + 1 :])


def latency_bounds(plan: Plan, bound: int) -> tuple[int, int] | None:
    """(baseline bound, canary bound) indices for the latency test, or None when there is none."""
    if bound < 0 or bound + plan.latency_shift >= len(LATENCY_BUCKETS):
        return None
    return bound, bound + plan.latency_shift


@dataclass(frozen=True, slots=True)
class Counts:
    """What one version served: requests, failures, latency buckets (len(LATENCY_BUCKETS) + 1)."""

    requests: int = 0
    failures: int = 0
    buckets: tuple[int, ...] = (0,) * BUCKETS

    def __post_init__(self) -> None:
        if len(self.buckets) != BUCKETS:
            raise ValueError(f"expected {BUCKETS} latency buckets, got {len(self.buckets)}")

    def minus(self, earlier: Counts) -> Counts:
        """What happened since `earlier`, an earlier reading of the same step's counts.

        Those never go down (the ledger of gateway.stats.accounting adds only increments), so a count
        below `earlier` is never taken for a reset: that would feed the same events in twice.
        """
        return Counts(
            max(0, self.requests - earlier.requests),
            max(0, self.failures - earlier.failures),
            tuple(max(0, a - b) for a, b in zip(self.buckets, earlier.buckets, strict=True)),
        )


@dataclass(frozen=True, slots=True)
class TestStats:
    """The running statistics: they carry over steps, so the false-rollback budget is spent once."""

    error_log_lr: tuple[float, ...] = (0.0,) * len(ODDS_GRID)
    latency_log_lr: tuple[float, ...] = (0.0,) * len(ODDS_GRID)
    latency_bound: int = -1  # baseline bound index B_j; -1 until the baseline has enough data
    baseline_requests: int = 0  # over the whole rollout, for the lower bound on its error rate
    baseline_failures: int = 0


@dataclass(frozen=True, slots=True)
class Readout:
    error_log_e: float
    latency_log_e: float
    null_odds: float  # psi0 used for this interval's errors
    baseline_lcb: float  # the lower bound behind it (0 when the allowance is 0)
    latency_bound: int


def advance(
    plan: Plan, tests: TestStats, baseline: Counts, canary: Counts, step_baseline_buckets: Sequence[int]
) -> tuple[TestStats, Readout]:
    """Adds one interval (`baseline`, `canary`: what happened in it) to the tests.

    `step_baseline_buckets` are the baseline's buckets before this interval; the latency bound is chosen
    from them (predictable), and so is the error null from the rollout's earlier baseline counts.
    """
    chosen = tail_bound(step_baseline_buckets)
    bound = chosen if chosen >= 0 else tests.latency_bound
    lcb = 0.0
    if plan.allowance > 0:
        lcb = count_bounds(tests.baseline_failures, tests.baseline_requests, plan.lcb_alpha)[0]
    null_odds = allowed_odds_ratio(lcb, plan.allowance)
    served = baseline.requests + canary.requests
    share = canary.requests / served if served else 0.0
    error_inc = split_increments(canary.failures, baseline.failures, share, null_odds)
    bounds = latency_bounds(plan, bound)
    if bounds is None:
        latency_inc = [0.0] * len(ODDS_GRID)
    else:
        slow_b, slow_c = slower_than(baseline.buckets, bounds[0]), slower_than(canary.buckets, bounds[1])
        latency_inc = split_increments(slow_c, slow_b, share, 1.0)
    error_log_lr = tuple(a + b for a, b in zip(tests.error_log_lr, error_inc, strict=True))
    latency_log_lr = tuple(a + b for a, b in zip(tests.latency_log_lr, latency_inc, strict=True))
    new = TestStats(
        error_log_lr,
        latency_log_lr,
        bound,
        tests.baseline_requests + baseline.requests,
        tests.baseline_failures + baseline.failures,
    )
    readout = Readout(log_mixture(error_log_lr), log_mixture(latency_log_lr), null_odds, lcb, bound)
    return new, readout


@dataclass(frozen=True, slots=True)
class NoWorse:
    """Whether this step's data show the canary no worse, with the bounds that say so."""

    errors: bool
    latency: bool
    canary_error_ucb: float
    baseline_error_lcb: float
    canary_tail_ucb: float | None  # share slower than the canary bound; None without a bound
    baseline_tail_lcb: float | None

    @property
    def shown(self) -> bool:
        return self.errors and self.latency


def no_worse(plan: Plan, bound: int, baseline: Counts, canary: Counts) -> NoWorse:
    """Compares this step's counts through confidence sequences (each at level plan.step_alpha)."""
    c_ucb = count_bounds(canary.failures, canary.requests, plan.step_alpha)[1]
    b_lcb = count_bounds(baseline.failures, baseline.requests, plan.step_alpha)[0]
    errors = c_ucb - b_lcb <= plan.step_error_margin
    bounds = latency_bounds(plan, bound)
    if bounds is None:
        return NoWorse(errors, False, c_ucb, b_lcb, None, None)
    slow_c = slower_than(canary.buckets, bounds[1])
    slow_b = slower_than(baseline.buckets, bounds[0])
    tail_ucb = count_bounds(slow_c, canary.requests, plan.step_alpha)[1]
    tail_lcb = count_bounds(slow_b, baseline.requests, plan.step_alpha)[0]
    return NoWorse(errors, tail_ucb <= tail_lcb, c_ucb, b_lcb, tail_ucb, tail_lcb)
