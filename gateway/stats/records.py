"""The statistics one process publishes, as typed records: in its worker snapshot and in the store.

Counters are cumulative since the process started. Lists keep whatever length the writer had:
`Totals.merge` pads or cuts them to this release's sizes, so a reader never trusts their length.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.typed_json import Fields


@dataclass(frozen=True, slots=True)
class VersionStats:
    """One (model, version)'s cumulative counters in one process."""

    statuses: tuple[int, ...]  # responses sent, by status class 1xx..5xx
    outcomes: tuple[int, ...]  # by `Outcome`
    buckets: tuple[int, ...]  # latency, non-cumulative; the last one is +Inf
    latency_sum: float
    in_flight: int
    consecutive_failures: int

    def to_json(self) -> dict[str, Any]:
        return {
            "statuses": list(self.statuses),
            "outcomes": list(self.outcomes),
            "buckets": list(self.buckets),
            "latency_sum": self.latency_sum,
            "in_flight": self.in_flight,
            "consecutive_failures": self.consecutive_failures,
        }

    @classmethod
    def read(cls, f: Fields) -> VersionStats:
        return cls(
            f.integers("statuses"),
            f.integers("outcomes"),
            f.integers("buckets"),
            f.number("latency_sum"),
            f.integer("in_flight"),
            f.integer("consecutive_failures"),
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
    """A process's statistics as it publishes them to the store for the rollout controller."""

    versions: Mapping[str, VersionStats]

    def to_json(self) -> dict[str, Any]:
        return {"versions": _versions_json(self.versions)}

    @classmethod
    def from_json(cls, data: object) -> ProcessStats:
        """Raises `RecordError` for anything but a well-formed payload."""
        return cls(Fields(data, "stats").mapping("versions", VersionStats.read))
