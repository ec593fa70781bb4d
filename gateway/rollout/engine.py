"""The rollout decision engine: from merged per-version counts to continue, step up, promote or roll back.

Pure: no I/O, no clock (the time comes in `Observation.now`), no randomness; the controller that applies
decisions and stores the state lives elsewhere. Call `decide` as often as you like (about once a second)
with the counts since the current step started: the tests it runs (`gateway.rollout.sequential`, where
the statistics and the literature are) are anytime-valid, so looking more often never raises the
false-rollback probability above `false_rollback_rate`, over the whole rollout, all steps together.

One call, in order:
  1. a finished rollout (promoted, rolled back) stays as it is;
  2. what happened since the previous call is added to the sequential tests;
  3. hard guardrails roll back at once: the canary's backend not ready, or CONSECUTIVE_FAILURE_LIMIT
     failures of the canary in a row;
  4. the error or latency e-value reaching its threshold rolls back (with the evidence);
  5. a paused rollout only watches: it still rolls back, it never steps up;
  6. after MIN_STEP_SECONDS and MIN_CANARY_REQUESTS in the step, a canary shown no worse (confidence
     sequences within the margins) steps up, or at the last step is promoted. A step at 100% has no
     baseline left to compare with: holding it that long with the guardrails quiet is enough.
Too little traffic only ever means waiting: no data, no evidence either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from gateway.rollout.sequential import (
    Counts,
    NoWorse,
    Plan,
    Readout,
    TestStats,
    advance,
    latency_bounds,
    no_worse,
    slower_than,
)
from gateway.routing.table import DEFAULT_MIN_STEP_DURATION, DEFAULT_MIN_STEP_REQUESTS, Rollout
from gateway.stats.counters import LATENCY_BUCKETS, Totals

Phase = Literal["progressing", "paused", "promoted", "rolled_back"]
Action = Literal["continue", "step_up", "promote", "rollback"]

CONSECUTIVE_FAILURE_LIMIT = 20  # at 1% errors, 20 in a row happens once in 10^40 requests
# Defaults of Rollout.min_step_duration and min_step_requests (routes.yaml may set them per rollout).
MIN_STEP_SECONDS = DEFAULT_MIN_STEP_DURATION  # a step is held at least this long before stepping up
MIN_CANARY_REQUESTS = DEFAULT_MIN_STEP_REQUESTS  # and serves at least this many canary requests
FINISHED: tuple[Phase, ...] = ("promoted", "rolled_back")


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
    seen_baseline: Counts  # what the previous call saw in this step, to take differences
    seen_canary: Counts
    tests: TestStats

    def to_json(self) -> dict[str, Any]:
        def counts(c: Counts) -> dict[str, Any]:
            return {"requests": c.requests, "failures": c.failures, "buckets": list(c.buckets)}

        t = self.tests
        return {
            "phase": self.phase,
            "step": self.step,
            "weight": self.weight,
            "step_started": self.step_started,
            "seen_baseline": counts(self.seen_baseline),
            "seen_canary": counts(self.seen_canary),
            "tests": {
                "error_log_lr": list(t.error_log_lr),
                "latency_log_lr": list(t.latency_log_lr),
                "latency_bound": t.latency_bound,
                "baseline_requests": t.baseline_requests,
                "baseline_failures": t.baseline_failures,
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        def counts(d: dict[str, Any]) -> Counts:
            return Counts(int(d["requests"]), int(d["failures"]), tuple(int(x) for x in d["buckets"]))

        t = data["tests"]
        tests = TestStats(
            tuple(float(x) for x in t["error_log_lr"]),
            tuple(float(x) for x in t["latency_log_lr"]),
            int(t["latency_bound"]),
            int(t["baseline_requests"]),
            int(t["baseline_failures"]),
        )
        if data["phase"] not in ("progressing", "paused", "promoted", "rolled_back"):
            raise ValueError(f"unknown rollout phase {data['phase']!r}")
        return cls(
            cast(Phase, data["phase"]),
            int(data["step"]),
            int(data["weight"]),
            float(data["step_started"]),
            counts(data["seen_baseline"]),
            counts(data["seen_canary"]),
            tests,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    weight: int  # the canary's weight after this decision, percent
    evidence: dict[str, Any]  # JSON-able: counts, estimates, statistics, thresholds, a sentence


def initial_state(config: Rollout, now: float) -> RolloutState:
    if not config.steps:
        raise ValueError("a rollout needs at least one step")
    return RolloutState("progressing", 0, config.steps[0], now, Counts(), Counts(), TestStats())


def plan_of(config: Rollout) -> Plan:
    return Plan.of(config.false_rollback_rate, config.max_error_rate_increase, config.max_latency_increase)


def decide(config: Rollout, state: RolloutState, observation: Observation) -> tuple[RolloutState, Decision]:
    if state.phase in FINISHED:
        done = state.phase.replace("_", " ")
        return state, Decision("continue", state.weight, {"phase": state.phase, "reason": f"Already {done}."})
    plan = plan_of(config)
    obs = observation
    tests, readout = advance(
        plan,
        state.tests,
        obs.baseline.minus(state.seen_baseline),
        obs.canary.minus(state.seen_canary),
        state.seen_baseline.buckets,
    )
    state = replace(state, seen_baseline=obs.baseline, seen_canary=obs.canary, tests=tests)
    shown = no_worse(plan, readout.latency_bound, obs.baseline, obs.canary)
    report = _Report(config, plan, state, obs, readout, shown)

    fired = report.fired()
    if fired is not None:
        return replace(state, phase="rolled_back", weight=0), report.decision("rollback", 0, fired)
    if state.phase == "paused":
        return state, report.decision("continue", state.weight, None)
    if report.waiting():
        return state, report.decision("continue", state.weight, None)
    if state.step == len(config.steps) - 1:
        return replace(state, phase="promoted", weight=100), report.decision("promote", 100, None)
    step = state.step + 1
    weight = config.steps[step]
    # The controller starts counting the new step at obs.now; the tests carry over.
    stepped = replace(
        state, step=step, weight=weight, step_started=obs.now, seen_baseline=Counts(), seen_canary=Counts()
    )
    return stepped, report.decision("step_up", weight, None)


def _num(x: float | None) -> float | None:
    """A JSON-safe number with 6 significant digits (None for infinities and missing values)."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


def _ms(bound: int) -> str:
    return f"{LATENCY_BUCKETS[bound] * 1000:.4g} ms"


class _Report:
    """The evidence and the sentence behind one decision."""

    def __init__(
        self,
        config: Rollout,
        plan: Plan,
        state: RolloutState,
        obs: Observation,
        readout: Readout,
        shown: NoWorse,
    ) -> None:
        self.config = config
        self.plan = plan
        self.state = state
        self.obs = obs
        self.r = readout
        self.shown = shown
        self.elapsed = obs.now - state.step_started
        self.bounds = latency_bounds(plan, readout.latency_bound)

    def fired(self) -> str | None:
        if not self.obs.canary_ready:
            return "canary_not_ready"
        if self.obs.consecutive_canary_failures >= CONSECUTIVE_FAILURE_LIMIT:
            return "consecutive_failures"
        if self.r.error_log_e >= math.log(1 / self.plan.error_alpha):
            return "errors"
        if self.r.latency_log_e >= math.log(1 / self.plan.latency_alpha):
            return "latency"
        return None

    def waiting(self) -> list[str]:
        """Why the canary cannot step up yet (empty: it can)."""
        obs, shown, reasons = self.obs, self.shown, []
        needed, hold = self.config.min_step_requests, self.config.min_step_duration
        if obs.canary.requests < needed:
            reasons.append(f"{obs.canary.requests} canary requests in this step, {needed} needed")
        if self.elapsed < hold:
            reasons.append(f"{self.elapsed:.0f} s into the step, {hold:.0f} s needed")
        if self.state.weight >= 100:
            return reasons  # nothing left to compare with: holding the step is the test
        if not shown.errors:
            reasons.append(
                f"its error rate (at most {shown.canary_error_ucb:.3%}) is not yet shown within "
                f"+{self.plan.step_error_margin:.2%} of the baseline's "
                f"(at least {shown.baseline_error_lcb:.3%})"
            )
        if self.bounds is None:
            reasons.append("the baseline has too few requests in this step to place its p95")
        elif not shown.latency:
            reasons.append(
                f"its share slower than {_ms(self.bounds[1])} (at most {shown.canary_tail_ucb:.2%}) "
                f"is not yet shown below the baseline's share slower than {_ms(self.bounds[0])} "
                f"(at least {shown.baseline_tail_lcb:.2%})"
            )
        return reasons

    def sentence(self, action: Action, weight: int, fired: str | None) -> str:
        obs, b, c = self.obs, self.obs.baseline, self.obs.canary
        if fired == "canary_not_ready":
            return "Rolled back: the canary's backend is not ready."
        if fired == "consecutive_failures":
            return (
                f"Rolled back: the canary failed {obs.consecutive_canary_failures} requests in a row "
                f"(limit {CONSECUTIVE_FAILURE_LIMIT})."
            )
        if fired == "errors":
            allowance = f" + {self.plan.allowance:.2%}" if self.plan.allowance > 0 else ""
            return (
                f"Rolled back: the canary failed {c.failures} of {c.requests} requests in this step "
                f"({_rate(c.failures, c.requests)}) against the baseline's {b.failures} of {b.requests} "
                f"({_rate(b.failures, b.requests)}); the error test's e-value "
                f"{math.exp(min(self.r.error_log_e, 700)):.3g} reached {1 / self.plan.error_alpha:.0f}, "
                f"which a canary failing at most at the baseline's rate{allowance} does with probability "
                f"{self.plan.error_alpha + self.plan.lcb_alpha:.2%} at most."
            )
        if fired == "latency" and self.bounds is not None:
            slow_c, slow_b = slower_than(c.buckets, self.bounds[1]), slower_than(b.buckets, self.bounds[0])
            return (
                f"Rolled back: {slow_c} of the canary's {c.requests} requests in this step "
                f"({_rate(slow_c, c.requests)}) were slower than {_ms(self.bounds[1])}, against "
                f"{_rate(slow_b, b.requests)} of the baseline's slower than {_ms(self.bounds[0])} (the lower "
                f"edge of its p95 bucket); the latency test's e-value "
                f"{math.exp(min(self.r.latency_log_e, 700)):.3g} reached "
                f"{1 / self.plan.latency_alpha:.0f} (a canary at most {self.config.max_latency_increase:.0%} "
                f"slower does so with probability {self.plan.latency_alpha:.2%} at most)."
            )
        if action == "step_up":
            return (
                f"Stepped up from {self.state.weight}% to {weight}%: over {c.requests} canary requests in "
                f"{self.elapsed:.0f} s the canary is shown no worse than the baseline within the margins."
            )
        if action == "promote" and self.state.weight >= 100:
            return (
                f"Promoted: the last step (100%) was held for {self.elapsed:.0f} s over {c.requests} "
                f"requests with the guardrails quiet."
            )
        if action == "promote":
            return f"Promoted: at the last step ({self.state.weight}%) the canary is shown no worse."
        waiting = self.waiting()
        if self.state.phase == "paused":
            status = "not yet shown no worse" if waiting else "shown no worse"
            return f"Paused at {self.state.weight}%: watching only (no step up); the canary is {status}."
        return f"Waiting at {self.state.weight}%: " + "; ".join(waiting) + "."

    def decision(self, action: Action, weight: int, fired: str | None) -> Decision:
        plan, r, shown, obs = self.plan, self.r, self.shown, self.obs
        b, c = obs.baseline, obs.canary
        bounds = self.bounds
        slow = (
            (slower_than(b.buckets, bounds[0]), slower_than(c.buckets, bounds[1])) if bounds else (None, None)
        )
        evidence: dict[str, Any] = {
            "action": action,
            "fired": fired,
            "phase": {"rollback": "rolled_back", "promote": "promoted"}.get(action, self.state.phase),
            "step": self.state.step,  # the step the decision was taken in
            "weight": self.state.weight,  # the canary's weight during it
            "new_weight": weight,
            "step_seconds": _num(self.elapsed),
            "counts": {
                "baseline": {"requests": b.requests, "failures": b.failures, "slower": slow[0]},
                "canary": {"requests": c.requests, "failures": c.failures, "slower": slow[1]},
            },
            "estimates": {
                "baseline_error_rate": _num(b.failures / b.requests) if b.requests else None,
                "canary_error_rate": _num(c.failures / c.requests) if c.requests else None,
                "canary_traffic_share": _num(c.requests / (b.requests + c.requests)) if c.requests else None,
                "canary_failure_share": _num(c.failures / (b.failures + c.failures)) if c.failures else None,
                "baseline_p95_s": _num(_quantile(b, 0.95)),
                "canary_p95_s": _num(_quantile(c, 0.95)),
            },
            "tests": {
                "errors": {
                    "log_e_value": _num(r.error_log_e),
                    "threshold": _num(1 / plan.error_alpha),
                    "alpha": plan.error_alpha,
                    "allowance": plan.allowance,
                    "null_odds_ratio": _num(r.null_odds),  # None: no test yet (baseline rate unbounded)
                    "baseline_error_lcb": _num(r.baseline_lcb),
                    "fired": fired == "errors",
                },
                "latency": {
                    "log_e_value": _num(r.latency_log_e),
                    "threshold": _num(1 / plan.latency_alpha),
                    "alpha": plan.latency_alpha,
                    "baseline_bound_s": LATENCY_BUCKETS[bounds[0]] if bounds else None,
                    "canary_bound_s": LATENCY_BUCKETS[bounds[1]] if bounds else None,
                    "fired": fired == "latency",
                },
            },
            "no_worse": {
                "shown": shown.shown,
                "canary_error_ucb": _num(shown.canary_error_ucb),
                "baseline_error_lcb": _num(shown.baseline_error_lcb),
                "error_margin": plan.step_error_margin,
                "canary_tail_ucb": _num(shown.canary_tail_ucb),
                "baseline_tail_lcb": _num(shown.baseline_tail_lcb),
                "alpha_each": plan.step_alpha,
                "min_canary_requests": self.config.min_step_requests,
                "min_step_seconds": self.config.min_step_duration,
            },
            "guardrails": {
                "canary_ready": obs.canary_ready,
                "consecutive_canary_failures": obs.consecutive_canary_failures,
                "limit": CONSECUTIVE_FAILURE_LIMIT,
            },
            "reason": self.sentence(action, weight, fired),
        }
        return Decision(action, weight, evidence)


def _rate(part: int, whole: int) -> str:
    return f"{part / whole:.2%}" if whole else "n/a"


def _quantile(counts: Counts, q: float) -> float | None:
    return Totals((), (), counts.buckets, 0.0, 0).quantile(q)
