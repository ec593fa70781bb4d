"""Anytime-valid sequential statistics, as pure functions of counts (no I/O, no clock).

The rollout's tests (gateway.rollout.statistics) are built from three pieces, each valid however often
it is looked at:

- Conditioning on the split (errors). Between two looks the canary served n_c requests and the baseline
  n_b, and F of them failed. Given those counts, the canary's failures follow Fisher's noncentral
  hypergeometric law with odds ratio psi = odds(e_c) / odds(e_b) (e = failure probability in that
  interval); the baseline's own rate, and how much traffic there was, cancel out. For each alternative
  psi1 on ODDS_GRID we multiply, interval by interval, the likelihood ratio of Binomial(F, p(psi1))
  against Binomial(F, p(psi0)), p(psi) = s psi / (s psi + 1 - s), s = n_c / (n_c + n_b) (the mixture
  SPRT of Lindon, Sanden & Shirikian 2022, who condition Poisson counts on their total so that a varying
  load cancels). With psi0 = 1 the exact conditional law (central hypergeometric) is dominated in convex
  order by Binomial(F, s) (Hoeffding 1963, Thm. 4) and each factor is convex in the canary's failures;
  with psi0 > 1 the same holds through the monotone likelihood ratio of the noncentral law in psi
  (checked exactly in tests/test_rollout_statistics.py). So each factor has conditional expectation at
  most 1 under every psi <= psi0 in that interval, whatever the rates do from one interval to the next.
- A one-sample share (latency): the canary's requests slower than a bound, against a null share p0,
  mixed over alternative shares (SHARE_GRID); each factor has expectation at most 1 under every share
  <= p0 (monotone likelihood ratio of the binomial).
- Time-uniform confidence sequences for a rate: the gamma mixture of Poisson exponential
  supermartingales (Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform, nonparametric,
  nonasymptotic confidence sequences"; Bernoulli counts are sub-Poisson).

A product of such factors is a nonnegative supermartingale under the null; so is any mixture of them,
and Ville's inequality bounds the chance that it ever reaches 1/alpha by alpha (Ville 1939; Ramdas,
Grunwald, Vovk & Shafer 2023, "Game-theoretic statistics and safe anytime-valid inference").

`Restarting` removes the evidence debt of a product started once: under a good canary the log
likelihood ratios drift far below 0, so a regression that begins late must first climb back. It is a
mixture over start times (components started at stopping times, prior weights summing to one, each worth
its weight until it starts), which is again a nonnegative supermartingale started at most at 1, so the
same alpha holds; dropping a component only lowers the value, so pruning keeps it (Shin, Ramdas & Rinaldo
2024, "E-detectors: a nonparametric framework for sequential change detection", for the idea of mixing
over change points).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.stats.kinds import BUCKETS

# Alternatives for the error mixture, as multiples of the null odds ratio: 1.25 .. 35.5, evenly spaced in
# log, equal prior weight.
# Coarser and wider grids barely move detection times: neighbouring alternatives share evidence.
ODDS_GRID: tuple[float, ...] = tuple(1.25**k for k in range(1, 17))
# Alternatives for a share test, as multiples of its null share: 1.2 .. 18.5 (6% .. 92% over a 5% null).
SHARE_FACTORS: tuple[float, ...] = tuple(1.2**k for k in range(1, 17))
LOG_PRIOR = -math.log(len(ODDS_GRID))

PRIOR_SHAPE = 1.0  # gamma(c, c) mixture of the confidence sequences: tight from a few to ~1000 events
NEWTON_STEPS = 40  # iterations for a confidence bound; each iterate is already conservative
MAX_COMPONENTS = 12  # of a Restarting e-process: the newest and the strongest are kept


def split_increments(canary_events: int, baseline_events: int, share: float, null_odds: float) -> list[float]:
    """Log likelihood ratio, per alternative null_odds x ODDS_GRID[i], of one interval's events.

    `share` is the canary's share of the interval's requests and `null_odds` the odds ratio psi0 at the
    edge of the null. An interval without traffic on both sides, or without events, adds nothing:
    missing data is never evidence.
    """
    if not 0.0 < share < 1.0 or canary_events + baseline_events == 0:
        return [0.0] * len(ODDS_GRID)
    events = canary_events + baseline_events
    null_norm = math.log(share * null_odds + 1.0 - share)
    return [
        canary_events * math.log(factor)
        + events * (null_norm - math.log(share * null_odds * factor + 1.0 - share))
        for factor in ODDS_GRID
    ]


def log_mixture(log_lrs: Sequence[float]) -> float:
    """Log of the e-value: the prior-weighted mean of the alternatives' likelihood ratios."""
    top = max(log_lrs)
    return top + LOG_PRIOR + math.log(sum(math.exp(x - top) for x in log_lrs))


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


def share_increments(slow: int, requests: int, null_share: float) -> list[float]:
    """Log likelihood ratio, per alternative null_share x SHARE_FACTORS[i], of `slow` out of `requests`.

    No requests: nothing (missing data is never evidence).
    """
    if requests <= 0:
        return [0.0] * len(SHARE_FACTORS)
    fast = requests - slow
    null_slow, null_fast = math.log(null_share), math.log1p(-null_share)
    out = []
    for factor in SHARE_FACTORS:
        p = min(null_share * factor, 0.999)
        out.append(slow * (math.log(p) - null_slow) + fast * (math.log1p(-p) - null_fast))
    return out


def start_weight(k: int) -> float:
    """Prior weight of the k-th start: 1/2 for the first, 1 / (2 k (k + 1)) after it; they sum to one."""
    return 0.5 if k == 0 else 1.0 / (2.0 * k * (k + 1))


@dataclass(frozen=True, slots=True)
class Component:
    log_weight: float
    log_lr: tuple[float, ...]  # per alternative, since this component started

    def log_e(self) -> float:
        return self.log_weight + log_mixture(self.log_lr)


@dataclass(frozen=True, slots=True)
class Restarting:
    """An e-process without evidence debt: a mixture over start times (see the module's docstring)."""

    started: int = 0  # components started so far: their prior weights are spent even once dropped
    components: tuple[Component, ...] = ()

    def restart(self, alternatives: int) -> Restarting:
        """Start the next component (at a time chosen from data seen so far only: a stopping time)."""
        new = Component(math.log(start_weight(self.started)), (0.0,) * alternatives)
        kept = (*self.components, new)
        if len(kept) > MAX_COMPONENTS:  # drop the weakest, never the newest: the value only goes down
            weakest = min(range(len(kept) - 1), key=lambda i: kept[i].log_e())
            kept = kept[:weakest] + kept[weakest + 1 :]
        return Restarting(self.started + 1, kept)

    def add(self, increments: Sequence[float]) -> Restarting:
        if not any(increments):
            return self
        return Restarting(
            self.started,
            tuple(
                Component(c.log_weight, tuple(a + b for a, b in zip(c.log_lr, increments, strict=True)))
                for c in self.components
            ),
        )

    def log_e(self) -> float:
        """Log of the e-value; -inf before the first start."""
        if not self.components:
            return -math.inf
        values = [c.log_e() for c in self.components]
        top = max(values)
        return top + math.log(sum(math.exp(v - top) for v in values))


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
