"""Per-process delta accounting: what every gateway process served, each request counted once.

Every process publishes its cumulative counters, since it started, about once a second (with a time to
live in the store). Summing the latest of those across processes is not a count of requests: a process
that exits, is restarted with reset counters or stalls past its time to live drops out of the sum, and
its requests leave the total, to come back when it returns or be fed in again as "new" by a reader
that takes a drop for a reset. A sequential test fed the same events twice no longer keeps its error
bound (the rollout issue measured 18 false rollbacks in 200 A/A runs with a worker restarting every
40 s, at a 1% budget).

The `Ledger` counts differences instead. It remembers, per run of a process (`Reading.process` is a
fresh id per start, whatever the pid), the last cumulative counts it took in (a `Mark`), and adds only
what grew since. One reading of a run it has no mark for:

  - started after `horizon` (on the store's clock): its counters began after the ledger did and after
    every run the ledger has forgotten, so all of them are new and are added;
  - started at or before `horizon`: it may have served before the ledger began, or be a run whose mark
    was forgotten, so nothing is added and the reading becomes its mark.

A run's counters only grow, so a reading that does not cover its mark (key by key) adds nothing and
leaves that mark as it was. A mark not refreshed for `FORGET_AFTER` seconds is dropped, and `horizon`
rises to that run's start, so the run is never mistaken for a new one if it comes back. Hence: totals
never go down, each request is in them at most once, and a request is missing only if the process
never published it, or stalled for longer than FORGET_AFTER (then the stall's requests are lost, never
doubled).

Pure and immutable: `take` returns a new ledger, the caller (the rollout controller) stores it in the
rollout record, so a new controller carries on from exactly where the last stored one stood. Keys are
the caller's (the controller uses "<version>/<choice>").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.stats.records import Tally
from gateway.typed_json import Fields

FORGET_AFTER = 120.0  # seconds without a reading before a run's mark is dropped (bounds the ledger)


@dataclass(frozen=True, slots=True)
class Reading:
    """One process run's cumulative counts, as published."""

    process: str  # this run of the process: another start is another id
    started: float  # when its counters began, on the store's clock
    tallies: Mapping[str, Tally]


@dataclass(frozen=True, slots=True)
class Mark:
    """The last counts of one run the ledger took in."""

    started: float
    seen: float  # store time of the reading
    tallies: Mapping[str, Tally]

    def to_json(self) -> dict[str, Any]:
        return {"started": self.started, "seen": self.seen, "tallies": _tallies_json(self.tallies)}

    @classmethod
    def read(cls, f: Fields) -> Mark:
        return cls(f.number("started"), f.number("seen"), f.mapping("tallies", Tally.read))


def _tallies_json(tallies: Mapping[str, Tally]) -> dict[str, Any]:
    return {key: tally.to_json() for key, tally in tallies.items() if tally != Tally()}


@dataclass(frozen=True, slots=True)
class Ledger:
    """Counts added since `restart` (one rollout step), and the marks they were taken from."""

    horizon: float  # store time: a run without a mark that started after it is new
    marks: Mapping[str, Mark]
    totals: Mapping[str, Tally]

    @classmethod
    def begin(cls, now: float) -> Ledger:
        return cls(now, {}, {})

    def total(self, key: str) -> Tally:
        return self.totals.get(key, Tally())

    def restart(self) -> Ledger:
        """The same marks, totals from zero: what is added from now on belongs to a new step."""
        return Ledger(self.horizon, self.marks, {})

    def take(self, now: float, readings: Iterable[Reading]) -> Ledger:
        """The ledger after the readings of one round (store time `now`); readings may repeat."""
        horizon, marks, totals = self.horizon, dict(self.marks), dict(self.totals)
        for reading in readings:
            mark = marks.get(reading.process)
            if mark is None:
                if reading.started > horizon:  # all of its counts are new
                    for key, tally in reading.tallies.items():
                        totals[key] = totals.get(key, Tally()).plus(tally)
                marks[reading.process] = Mark(reading.started, now, dict(reading.tallies))
                continue
            tallies = dict(mark.tallies)
            for key, tally in reading.tallies.items():
                last = tallies.get(key, Tally())
                if tally.covers(last):
                    totals[key] = totals.get(key, Tally()).plus(tally.minus(last))
                    tallies[key] = tally
            marks[reading.process] = Mark(mark.started, now, tallies)
        for process, mark in list(marks.items()):
            if now - mark.seen > FORGET_AFTER:
                del marks[process]
                horizon = max(horizon, mark.started)
        return Ledger(horizon, marks, totals)

    def to_json(self) -> dict[str, Any]:
        return {
            "horizon": self.horizon,
            "marks": {process: mark.to_json() for process, mark in self.marks.items()},
            "totals": _tallies_json(self.totals),
        }

    @classmethod
    def read(cls, f: Fields) -> Ledger:
        return cls(f.number("horizon"), f.mapping("marks", Mark.read), f.mapping("totals", Tally.read))
