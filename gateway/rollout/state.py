"""A rollout's state and one look at its counts: the records the engine reads and returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

from gateway.rollout.sequential import Counts
from gateway.rollout.statistics import TestStats
from gateway.typed_json import Fields

Phase = Literal["progressing", "paused", "promoted", "rolled_back"]
Action = Literal["continue", "step_up", "promote", "rollback", "hold"]

FINISHED: tuple[Phase, ...] = ("promoted", "rolled_back")
PHASES: tuple[Phase, ...] = ("progressing", "paused", "promoted", "rolled_back")


@dataclass(frozen=True, slots=True)
class Observation:
    """Counts per version since the current step started (cumulative), and the guardrail inputs."""

    baseline: Counts
    canary: Counts
    canary_ready: bool
    consecutive_canary_failures: int
    now: float  # seconds, on the same clock as RolloutState.step_started


@dataclass(frozen=True, slots=True)
class RolloutState:
    phase: Phase
    step: int  # index into Rollout.steps
    weight: int  # canary weight, percent
    step_started: float
    seen_baseline: Counts  # what was last fed to the tests in this step, to take differences
    seen_canary: Counts
    tests: TestStats

    def to_json(self) -> dict[str, Any]:
        def counts(c: Counts) -> dict[str, Any]:
            return {"requests": c.requests, "failures": c.failures, "buckets": list(c.buckets)}

        return {
            "phase": self.phase,
            "step": self.step,
            "weight": self.weight,
            "step_started": self.step_started,
            "seen_baseline": counts(self.seen_baseline),
            "seen_canary": counts(self.seen_canary),
            "tests": self.tests.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        def counts(d: dict[str, Any]) -> Counts:
            return Counts(int(d["requests"]), int(d["failures"]), tuple(int(x) for x in d["buckets"]))

        if data["phase"] not in PHASES:
            raise ValueError(f"unknown rollout phase {data['phase']!r}")
        return cls(
            cast(Phase, data["phase"]),
            int(data["step"]),
            int(data["weight"]),
            float(data["step_started"]),
            counts(data["seen_baseline"]),
            counts(data["seen_canary"]),
            TestStats.read(Fields(data["tests"], "tests")),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    weight: int  # the canary's weight after this decision, percent
    evidence: dict[str, Any]  # JSON-able: counts, estimates, statistics, thresholds, a sentence
