"""The statistics one process publishes, as typed records: in its worker snapshot and in the store.

Counters are cumulative since the process started. Lists keep whatever length the writer had:
`Totals.merge` and `Tally.read` pad or cut them to this release's sizes, so a reader never trusts their
length.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.stats.kinds import BUCKETS, CALLER_FAULTS, CHOICES, FAILURES, Outcome
from gateway.typed_json import Fields, RecordError


def fit(values: Sequence[int], size: int) -> tuple[int, ...]:
    """A list another release wrote, padded with zeros or cut to this release's `size`."""
    return tuple(values[:size]) + (0,) * (size - len(values))


@dataclass(frozen=True, slots=True)
class Tally:
    """One version's answers for one way of choosing it (`Choice`), cumulative, as plain numbers.

    Caller faults (4xx, 499) are counted in `outcomes` and nowhere else: they are not requests the
    version served, so neither `requests` nor the latency buckets include them.
    """

    outcomes: tuple[int, ...] = (0,) * len(Outcome)
    buckets: tuple[int, ...] = (0,) * BUCKETS  # latency of the answers that are not caller faults
    latency_sum: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.outcomes) - self.caller_faults

    @property
    def failures(self) -> int:
        return sum(self.outcomes[o] for o in FAILURES)

    @property
    def caller_faults(self) -> int:
        return sum(self.outcomes[o] for o in CALLER_FAULTS)

    def plus(self, other: Tally) -> Tally:
        return Tally(
            tuple(a + b for a, b in zip(self.outcomes, other.outcomes, strict=True)),
            tuple(a + b for a, b in zip(self.buckets, other.buckets, strict=True)),
            self.latency_sum + other.latency_sum,
        )

    def minus(self, earlier: Tally) -> Tally:
        """What was added since `earlier`; only meaningful when `self.covers(earlier)`."""
        return Tally(
            tuple(a - b for a, b in zip(self.outcomes, earlier.outcomes, strict=True)),
            tuple(a - b for a, b in zip(self.buckets, earlier.buckets, strict=True)),
            max(0.0, self.latency_sum - earlier.latency_sum),
        )

    def covers(self, earlier: Tally) -> bool:
        """Every count at least `earlier`'s: `earlier` may be an earlier reading of the same counters."""
        return all(a >= b for a, b in zip(self.outcomes, earlier.outcomes, strict=True)) and all(
            a >= b for a, b in zip(self.buckets, earlier.buckets, strict=True)
        )

    @staticmethod
    def total(parts: Iterable[Tally]) -> Tally:
        total = Tally()
        for part in parts:
            total = total.plus(part)
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "outcomes": list(self.outcomes),
            "buckets": list(self.buckets),
            "latency_sum": self.latency_sum,
        }

    @classmethod
    def read(cls, f: Fields) -> Tally:
        outcomes, buckets = f.integers("outcomes"), f.integers("buckets")
        if any(n < 0 for n in outcomes + buckets):
            raise RecordError(f"{f.where}: a count below zero")
        return cls(fit(outcomes, len(Outcome)), fit(buckets, BUCKETS), f.number("latency_sum"))


@dataclass(frozen=True, slots=True)
class VersionStats:
    """One (model, version)'s cumulative counters in one process."""

    statuses: tuple[int, ...]  # responses sent, by status class 1xx..5xx
    outcomes: tuple[int, ...]  # by `Outcome`
    buckets: tuple[int, ...]  # latency, non-cumulative; the last one is +Inf
    latency_sum: float
    in_flight: int
    consecutive_failures: int  # of split requests (the rollout evidence), the rollout's guardrail
    # By `Choice` name; the lists above are what clients were answered (shadow copies are only here).
    # Absent from the records of releases before it: no evidence from those, rather than wrong evidence.
    choices: Mapping[str, Tally] | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "statuses": list(self.statuses),
            "outcomes": list(self.outcomes),
            "buckets": list(self.buckets),
            "latency_sum": self.latency_sum,
            "in_flight": self.in_flight,
            "consecutive_failures": self.consecutive_failures,
        }
        if self.choices is not None:
            data["choices"] = {name: tally.to_json() for name, tally in self.choices.items()}
        return data

    def tally(self, choice: str) -> Tally:
        return Tally() if self.choices is None else self.choices.get(choice, Tally())

    @classmethod
    def read(cls, f: Fields) -> VersionStats:
        choices = None
        if f.has("choices"):
            choices = {k: v for k, v in f.mapping("choices", Tally.read).items() if k in CHOICES}
        return cls(
            f.integers("statuses"),
            f.integers("outcomes"),
            f.integers("buckets"),
            f.number("latency_sum"),
            f.integer("in_flight"),
            f.integer("consecutive_failures"),
            choices,
        )


def _versions_json(versions: Mapping[str, VersionStats]) -> dict[str, Any]:
    return {key: counters.to_json() for key, counters in versions.items()}


@dataclass(frozen=True, slots=True)
class StatsRecord:
    """A process's statistics as its worker snapshot carries them."""

    versions: Mapping[str, VersionStats]  # keyed "model/version"
    unrouted: tuple[int, ...]  # answers given without a version, by status class

    def to_json(self) -> dict[str, Any]:
        return {"versions": _versions_json(self.versions), "unrouted": list(self.unrouted)}

    @classmethod
    def read(cls, f: Fields) -> StatsRecord:
        return cls(f.mapping("versions", VersionStats.read), f.integers("unrouted"))


@dataclass(frozen=True, slots=True)
class ProcessStats:
    """A process's statistics as it publishes them to the store for the rollout controller.

    `process` names this run of the process (a restart is another one, whatever its pid), and
    `started` is when its counters began, on the store's clock: the rollout's accounting
    (`gateway.stats.accounting`) tells from them a process it has seen from one it has not.
    """

    process: str
    started: float
    versions: Mapping[str, VersionStats]

    def to_json(self) -> dict[str, Any]:
        return {"process": self.process, "started": self.started, "versions": _versions_json(self.versions)}

    @classmethod
    def from_json(cls, data: object) -> ProcessStats:
        """Raises `RecordError` for anything but a well-formed payload."""
        f = Fields(data, "stats")
        return cls(f.text("process"), f.number("started"), f.mapping("versions", VersionStats.read))
