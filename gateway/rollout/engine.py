"""The rollout decision engine: from merged per-version counts to continue, step up, promote or roll back.

Pure: no I/O, no clock (the time comes in `Observation.now`), no randomness; the controller that applies
decisions and stores the state lives elsewhere. Call `decide` as often as you like (about once a second)
with the counts since the current step started: the tests (`gateway.rollout.statistics`, where alpha and
beta are split, and `gateway.rollout.sequential`, where the statistics and the literature are) are
anytime-valid, so looking more often never raises the false-rollback probability above
`false_rollback_rate`, nor the false-promotion probability above `false_promotion_rate`.

One call, in order:
  1. a finished rollout (promoted, rolled back) stays as it is;
  2. what happened since the interval last fed to the tests is fed to them, once both versions have
     requests in it (at low traffic seconds are batched, so neither side's data is wasted);
  3. guardrails roll back at once: the canary's backend not ready, or a run of canary failures that a
     canary failing as often as the baseline (in the same interval) would reach with probability below
     its share of alpha;
  4. the error or latency e-value reaching its threshold rolls back (with the evidence);
  5. a paused rollout only watches: it still rolls back, it never steps up;
  6. after min_step_duration and min_step_requests in the step, a canary shown within the margins steps
     up; when the next step is 100%, or there is none, it is promoted: at 100% nothing is compared, so
     promotion is decided at the last step below it;
  7. a step still undecided after max_step_duration is held (paused, with an alert) or rolled back.
Too little traffic only ever means waiting: no data, no evidence either way.
"""

from __future__ import annotations

import math
from dataclasses import replace

from gateway.rollout.report import Report
from gateway.rollout.sequential import Counts
from gateway.rollout.state import FINISHED, PHASES, Action, Decision, Observation, Phase, RolloutState
from gateway.rollout.statistics import Plan, Readout, TestStats, advance, no_worse, streak_limit
from gateway.routing.table import DEFAULT_MIN_STEP_DURATION, DEFAULT_MIN_STEP_REQUESTS, Rollout

# Defaults of Rollout.min_step_duration and min_step_requests (routes.yaml may set them per rollout).
MIN_STEP_SECONDS = DEFAULT_MIN_STEP_DURATION  # a step is held at least this long before stepping up
MIN_CANARY_REQUESTS = DEFAULT_MIN_STEP_REQUESTS  # and serves at least this many canary requests


def initial_state(config: Rollout, now: float) -> RolloutState:
    if not config.steps:
        raise ValueError("a rollout needs at least one step")
    return RolloutState("progressing", 0, config.steps[0], now, Counts(), Counts(), TestStats())


def plan_of(config: Rollout) -> Plan:
    return Plan.of(config)


def is_last_decision(config: Rollout, step: int) -> bool:
    """Whether stepping up from this step means promotion (there is no step, or only 100%, above it)."""
    return step + 1 >= len(config.steps) or config.steps[step + 1] >= 100


def decide(config: Rollout, state: RolloutState, observation: Observation) -> tuple[RolloutState, Decision]:
    if state.phase in FINISHED:
        done = state.phase.replace("_", " ")
        return state, Decision("continue", state.weight, {"phase": state.phase, "reason": f"Already {done}."})
    plan = plan_of(config)
    obs = observation
    pending_b, pending_c = obs.baseline.minus(state.seen_baseline), obs.canary.minus(state.seen_canary)
    if pending_b.requests > 0 and pending_c.requests > 0:
        tests = advance(
            plan, state.tests, pending_b, pending_c, state.seen_baseline.buckets, obs.now, state.step_started
        )
        state = replace(state, seen_baseline=obs.baseline, seen_canary=obs.canary, tests=tests)
    readout = Readout.of(plan, state.tests)
    limit = streak_limit(plan, state.tests, pending_b)
    report = Report(config, plan, state, obs, readout, no_worse(plan, obs.baseline, obs.canary), limit)

    fired = _fired(plan, obs, readout, limit)
    if fired is not None:
        return replace(state, phase="rolled_back", weight=0), _decision(report, "rollback", 0, fired)
    if state.phase == "paused":
        return state, _decision(report, "continue", state.weight, None)
    waiting = report.waiting()
    if waiting and obs.now - state.step_started >= config.max_step_duration:
        if config.on_max_step_duration == "rollback":
            return replace(state, phase="rolled_back", weight=0), _decision(
                report, "rollback", 0, "max_step_duration"
            )
        return replace(state, phase="paused"), _decision(report, "hold", state.weight, "max_step_duration")
    if waiting:
        return state, _decision(report, "continue", state.weight, None)
    if is_last_decision(config, state.step):
        return replace(state, phase="promoted", weight=100), _decision(report, "promote", 100, None)
    step = state.step + 1
    weight = config.steps[step]
    # The controller starts counting the new step at obs.now; the tests carry over.
    stepped = replace(
        state, step=step, weight=weight, step_started=obs.now, seen_baseline=Counts(), seen_canary=Counts()
    )
    return stepped, _decision(report, "step_up", weight, None)


def _fired(plan: Plan, obs: Observation, readout: Readout, limit: float) -> str | None:
    if not obs.canary_ready:
        return "canary_not_ready"
    if streak(obs) >= limit:
        return "consecutive_failures"
    if readout.error_log_e >= math.log(1 / plan.error_alpha):
        return "errors"
    if readout.latency_log_e >= math.log(1 / plan.latency_alpha):
        return "latency"
    return None


def streak(obs: Observation) -> int:
    """The canary's failures in a row within this step: a run never counts from before the rollout (or
    the step) began, whatever the processes' counters carried in."""
    return min(obs.consecutive_canary_failures, obs.canary.failures)


def _decision(report: Report, action: Action, weight: int, fired: str | None) -> Decision:
    return Decision(action, weight, report.evidence(action, weight, fired))


__all__ = ["FINISHED", "PHASES", "Action", "Decision", "Observation", "Phase", "RolloutState", "TestStats"]
