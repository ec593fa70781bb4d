"""Per-version request statistics, counted in process memory and published as snapshots.

On the hot path a request costs a few list increments and one bisect; nothing is locked, written to a
file or sent anywhere. Once a second each worker writes a snapshot of its cumulative totals (see
`gateway.state.files`), and readers merge the snapshots of all workers: counters add up exactly, and a
rate or a quantile over the last minute is the difference of two merged snapshots.

Latency buckets are log-spaced from 1 ms to 30 s (each bound about 1.25 times the previous one), fine
enough for a p95 to within about 12% and cheap to merge.

Each version also keeps one tally per way it was chosen (split, sticky, pinned, shadow: `Choice`). Only
split and sticky traffic is a rollout's evidence, and only answers that are not the caller's fault
(`Outcome.CLIENT_ERROR`, `Outcome.ABANDONED`) count as requests or latencies there; the per-version
totals beside them stay what clients were answered, for metrics and the live views.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.stats.kinds import (
    BUCKET_FACTOR,
    BUCKETS,
    CHOICES,
    LATENCY_BUCKETS,
    OUTCOMES,
    Choice,
    Outcome,
)
from gateway.stats.records import StatsRecord, Tally, VersionStats

__all__ = ["BUCKET_FACTOR", "LATENCY_BUCKETS", "OUTCOMES", "STATUS_CLASSES", "Choice", "Outcome"]

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_CALLER_FAULT = (False, True, False, False, False, True)  # by Outcome: see kinds.CALLER_FAULTS
_FAILURE = (False, False, True, True, True, False)


def outcome_of(status: int) -> Outcome:
    if status >= 500:
        return Outcome.SERVER_ERROR
    if status >= 400:
        return Outcome.CLIENT_ERROR
    return Outcome.OK


class _Tally:
    """A `Tally` as it is counted: plain lists, incremented in place."""

    __slots__ = ("buckets", "latency_sum", "outcomes")

    def __init__(self) -> None:
        self.outcomes = [0] * len(Outcome)
        self.buckets = [0] * BUCKETS
        self.latency_sum = 0.0

    def frozen(self) -> Tally:
        return Tally(tuple(self.outcomes), tuple(self.buckets), self.latency_sum)


class VersionCounters:
    """Cumulative totals for one (model, version) in this process."""

    __slots__ = (
        "buckets",
        "consecutive_failures",
        "in_flight",
        "latency_sum",
        "outcomes",
        "statuses",
        "tallies",
    )

    def __init__(self) -> None:
        self.statuses = [0] * len(STATUS_CLASSES)  # responses sent to clients, by status class
        self.outcomes = [0] * len(Outcome)
        self.buckets = [0] * BUCKETS  # non-cumulative; the last one is +Inf
        self.latency_sum = 0.0
        self.in_flight = 0
        self.consecutive_failures = 0  # the rollout's guardrail: a run of failures acts at once
        self.tallies = tuple(_Tally() for _ in Choice)

    def record(self, status: int, outcome: Outcome, seconds: float, choice: Choice = Choice.SPLIT) -> None:
        """One answer; `seconds` is the backend's time (request sent to response received)."""
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        tally = self.tallies[choice]
        tally.outcomes[outcome] += 1
        # Only the experiment's own traffic feeds its guardrail. A caller's 4xx ends a run too (the version
        # answered, and rightly refused the request); a client that left says nothing either way.
        if choice is Choice.SPLIT and outcome is not Outcome.ABANDONED:
            self.consecutive_failures = self.consecutive_failures + 1 if _FAILURE[outcome] else 0
        if not _CALLER_FAULT[outcome]:
            tally.buckets[bucket] += 1
            tally.latency_sum += seconds
        if choice is Choice.SHADOW:
            return  # nobody was answered
        self.statuses[min(status // 100, 5) - 1] += 1
        self.outcomes[outcome] += 1
        self.buckets[bucket] += 1
        self.latency_sum += seconds

    def snapshot(self) -> VersionStats:
        return VersionStats(
            tuple(self.statuses),
            tuple(self.outcomes),
            tuple(self.buckets),
            self.latency_sum,
            self.in_flight,
            self.consecutive_failures,
            {name: tally.frozen() for name, tally in zip(CHOICES, self.tallies, strict=True)},
        )


class _Uncounted(VersionCounters):
    """Counters that count nothing, for measuring what counting costs (`gateway serve --no-stats`)."""

    __slots__ = ()

    def record(self, status: int, outcome: Outcome, seconds: float, choice: Choice = Choice.SPLIT) -> None:
        pass


class Stats:
    """All versions' counters in this process, keyed by (model, version id)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.created = time.monotonic()  # when every counter here began at zero
        self.versions: dict[tuple[str, str], VersionCounters] = {}
        self.unrouted = [0] * len(STATUS_CLASSES)  # answers the gateway gave without a version: 4xx mostly

    def counters(self, model: str, version: str) -> VersionCounters:
        key = (model, version)
        counters = self.versions.get(key)
        if counters is None:
            counters = self.versions[key] = VersionCounters() if self.enabled else _Uncounted()
        return counters

    def snapshot(self) -> StatsRecord:
        """A copy of the counters now, to publish."""
        return StatsRecord(
            {f"{model}/{version}": c.snapshot() for (model, version), c in self.versions.items()},
            tuple(self.unrouted),
        )

    def to_json(self) -> dict[str, Any]:
        return self.snapshot().to_json()


@dataclass(frozen=True)
class Totals:
    """Merged cumulative totals for one version, across processes, for the admin views and metrics.

    Not for a rollout's evidence: a merge drops a process that leaves and restarts one from zero, so
    its differences can count requests twice (gateway.stats.accounting counts them once).
    """

    statuses: tuple[int, ...]
    outcomes: tuple[int, ...]
    buckets: tuple[int, ...]
    latency_sum: float
    in_flight: int
    choices: tuple[Tally, ...] = tuple(Tally() for _ in Choice)  # by Choice

    @property
    def requests(self) -> int:
        return sum(self.outcomes)

    @staticmethod
    def merge(parts: Sequence[VersionStats | Totals]) -> Totals:
        """The sum of `parts`, each list padded or cut to this release's size (another release may
        have written them)."""

        def add(values: Sequence[tuple[int, ...]], size: int) -> tuple[int, ...]:
            total = [0] * size
            for counts in values:
                for i, value in enumerate(counts[:size]):
                    total[i] += value
            return tuple(total)

        def tallies(part: VersionStats | Totals) -> Sequence[Tally]:
            if isinstance(part, Totals):
                return part.choices
            return [part.tally(name) for name in CHOICES]

        return Totals(
            add([p.statuses for p in parts], len(STATUS_CLASSES)),
            add([p.outcomes for p in parts], len(Outcome)),
            add([p.buckets for p in parts], BUCKETS),
            sum(p.latency_sum for p in parts),
            sum(p.in_flight for p in parts),
            tuple(Tally.total(t[c] for t in map(tallies, parts)) for c in Choice),
        )

    def minus(self, earlier: Totals) -> Totals:
        """What happened between `earlier` and these totals (a worker restart can only make it smaller)."""
        return Totals(
            tuple(max(0, a - b) for a, b in zip(self.statuses, earlier.statuses, strict=True)),
            tuple(max(0, a - b) for a, b in zip(self.outcomes, earlier.outcomes, strict=True)),
            tuple(max(0, a - b) for a, b in zip(self.buckets, earlier.buckets, strict=True)),
            max(0.0, self.latency_sum - earlier.latency_sum),
            self.in_flight,
            tuple(
                now.minus(then) if now.covers(then) else Tally()
                for now, then in zip(self.choices, earlier.choices, strict=True)
            ),
        )

    def quantile(self, q: float) -> float | None:
        """The q-quantile of latency in seconds, interpolated within its bucket; None without data."""
        count = sum(self.buckets)
        if count == 0:
            return None
        rank = q * count
        seen = 0
        for i, n in enumerate(self.buckets):
            if n and seen + n >= rank:
                lower = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
                upper = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else LATENCY_BUCKETS[-1]
                return lower + (upper - lower) * (rank - seen) / n
            seen += n
        return LATENCY_BUCKETS[-1]

    @property
    def failures(self) -> int:
        """Requests the version failed: 5xx, timeouts and broken connections (never 4xx)."""
        return (
            self.outcomes[Outcome.SERVER_ERROR]
            + self.outcomes[Outcome.TIMEOUT]
            + self.outcomes[Outcome.UPSTREAM_ERROR]
        )
