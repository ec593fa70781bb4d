"""The evidence behind one rollout decision, as JSON and as a plain sentence an operator can check."""

from __future__ import annotations

import math
from typing import Any

from gateway.rollout import p95
from gateway.rollout.sequential import Counts
from gateway.rollout.state import Action, Observation, RolloutState
from gateway.rollout.statistics import NoWorse, Plan, Readout
from gateway.routing.table import Rollout
from gateway.stats.counters import Totals


def _num(x: float | None) -> float | None:
    """A JSON-safe number with 6 significant digits (None for infinities and missing values)."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


def _ms(bound: int) -> str:
    return f"{p95.seconds(bound) * 1000:.4g} ms"


def _rate(part: int, whole: int) -> str:
    return f"{part / whole:.2%}" if whole else "n/a"


def _quantile(counts: Counts, q: float) -> float | None:
    return Totals((), (), counts.buckets, 0.0, 0).quantile(q)


def _e(log_e: float) -> str:
    return f"{math.exp(min(log_e, 700)):.3g}" if math.isfinite(log_e) else "0"


class Report:
    """The evidence and the sentence behind one decision."""

    def __init__(
        self,
        config: Rollout,
        plan: Plan,
        state: RolloutState,
        obs: Observation,
        readout: Readout,
        shown: NoWorse,
        streak_limit: float,
    ) -> None:
        self.config = config
        self.plan = plan
        self.state = state
        self.obs = obs
        self.r = readout
        self.shown = shown
        self.streak_limit = streak_limit
        self.elapsed = obs.now - state.step_started

    def waiting(self) -> list[str]:
        """Why the canary cannot step up yet (empty: it can)."""
        obs, shown, reasons = self.obs, self.shown, []
        needed, hold = self.config.min_step_requests, self.config.min_step_duration
        if obs.canary.requests < needed:
            reasons.append(
                f"{obs.canary.requests} canary requests from the split in this step, {needed} needed"
            )
        if self.elapsed < hold:
            reasons.append(f"{self.elapsed:.0f} s into the step, {hold:.0f} s needed")
        if not shown.errors:
            reasons.append(
                f"its error rate (at most {shown.canary_error_ucb:.3%}) is not yet shown within "
                f"+{self.plan.error_margin:.2%} of the baseline's (at least {shown.baseline_error_lcb:.3%})"
            )
        if shown.lower_bound < 0:
            reasons.append("the baseline's p95 is not yet bounded from below in this step")
        elif not shown.latency:
            reasons.append(
                f"its p95 is not yet shown at most {_ms(shown.canary_bound)} (its share slower than that is "
                f"at most {_num(shown.canary_tail_ucb)}, must be at most 5%), where the baseline's p95 is "
                f"above {_ms(shown.lower_bound)}"
                if shown.canary_bound >= 0
                else f"the baseline's p95 bound {_ms(shown.lower_bound)} leaves no bucket for the margin"
            )
        return reasons

    def _rollback_sentence(self, fired: str) -> str:
        obs, b, c, plan = self.obs, self.obs.baseline, self.obs.canary, self.plan
        if fired == "canary_not_ready":
            return "Rolled back: the canary's backend is not ready."
        if fired == "consecutive_failures":
            return (
                f"Rolled back: the canary failed {min(obs.consecutive_canary_failures, obs.canary.failures)} "
                f"requests in a row in this step; a "
                f"canary failing no more often than the baseline did in the same interval reaches "
                f"{self.streak_limit:.0f} with probability {plan.streak_alpha:.2%} at most."
            )
        if fired == "errors":
            null = "" if plan.null_odds == 1 else f" {plan.null_odds:g} times"
            return (
                f"Rolled back: the canary failed {c.failures} of {c.requests} requests in this step "
                f"({_rate(c.failures, c.requests)}) against the baseline's {b.failures} of {b.requests} "
                f"({_rate(b.failures, b.requests)}); the error test's e-value {_e(self.r.error_log_e)} "
                f"reached {1 / plan.error_alpha:.0f}, which a canary whose odds of failing are at most{null} "
                f"the baseline's at every moment does with probability {plan.error_alpha:.2%} at most."
            )
        if fired == "latency" and self.r.canary_bound >= 0:
            slow = p95.slower_than(c.buckets, self.r.canary_bound)
            return (
                f"Rolled back: {slow} of the canary's {sum(c.buckets)} requests in this step "
                f"({_rate(slow, sum(c.buckets))}) were slower than {_ms(self.r.canary_bound)}, where the "
                f"baseline's p95 is at most {_ms(self.r.upper_bound)}; the latency test's e-value "
                f"{_e(self.r.latency_log_e)} reached {1 / plan.latency_alpha:.0f}, which a canary whose p95 "
                f"is at most {self.config.max_latency_increase:.0%} above the baseline's does with "
                f"probability {plan.latency_alpha + plan.bound_alpha * plan.decisions:.2%} at most."
            )
        if fired == "max_step_duration":
            return (
                f"Rolled back: the step at {self.state.weight}% lasted {self.elapsed:.0f} s, past "
                f"max_step_duration ({self.config.max_step_duration:.0f} s), without the canary shown within "
                f"the margins (on_max_step_duration: rollback; a choice of the operator, outside alpha)."
            )
        return f"Rolled back ({fired})."

    def sentence(self, action: Action, weight: int, fired: str | None) -> str:
        c = self.obs.canary
        if action == "rollback" and fired is not None:
            return self._rollback_sentence(fired)
        up, _ = p95.effective_margins(self.plan.latency_margin)
        margins = f"errors within +{self.plan.error_margin:.2%}, p95 within +{up:.1%}"
        if action == "step_up":
            return (
                f"Stepped up from {self.state.weight}% to {weight}%: over {c.requests} canary requests in "
                f"{self.elapsed:.0f} s the canary is shown within the margins ({margins})."
            )
        if action == "promote":
            return (
                f"Promoted from {self.state.weight}%: over {c.requests} canary requests in "
                f"{self.elapsed:.0f} s the canary is shown within the margins ({margins})."
            )
        waiting = "; ".join(self.waiting())
        if action == "hold":
            return (
                f"Held at {self.state.weight}%: the step lasted {self.elapsed:.0f} s, past max_step_duration "
                f"({self.config.max_step_duration:.0f} s), and {waiting}. Resume, promote or roll back."
            )
        if self.state.phase == "paused":
            status = "not yet shown within the margins" if waiting else "shown within the margins"
            return f"Paused at {self.state.weight}%: watching only (no step up); the canary is {status}."
        return f"Waiting at {self.state.weight}%: {waiting}."

    def evidence(self, action: Action, weight: int, fired: str | None) -> dict[str, Any]:
        plan, r, shown, obs = self.plan, self.r, self.shown, self.obs
        b, c = obs.baseline, obs.canary
        slow = (
            (p95.slower_than(b.buckets, r.upper_bound), p95.slower_than(c.buckets, r.canary_bound))
            if r.canary_bound >= 0
            else (None, None)
        )
        up, down = p95.effective_margins(plan.latency_margin)
        phases = {"rollback": "rolled_back", "promote": "promoted", "hold": "paused"}
        return {
            "action": action,
            "fired": fired,
            "phase": phases.get(action, self.state.phase),
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
                "baseline_p95_s": _num(_quantile(b, 0.95)),
                "canary_p95_s": _num(_quantile(c, 0.95)),
            },
            "tests": {
                "errors": {
                    "log_e_value": _num(r.error_log_e),
                    "threshold": _num(1 / plan.error_alpha),
                    "alpha": plan.error_alpha,
                    "null_odds_ratio": plan.null_odds,
                    "fired": fired == "errors",
                },
                "latency": {
                    "log_e_value": _num(r.latency_log_e),
                    "threshold": _num(1 / plan.latency_alpha),
                    "alpha": plan.latency_alpha,
                    "bound_alpha_per_step": plan.bound_alpha,
                    "baseline_p95_at_most_s": p95.seconds(r.upper_bound) if r.upper_bound >= 0 else None,
                    "canary_bound_s": p95.seconds(r.canary_bound) if r.canary_bound >= 0 else None,
                    "margin": plan.latency_margin,
                    "effective_margin": _num(down),
                    "fired": fired == "latency",
                },
            },
            "no_worse": {
                "shown": shown.shown,
                "alpha_each": plan.promote_alpha,
                "canary_error_ucb": _num(shown.canary_error_ucb),
                "baseline_error_lcb": _num(shown.baseline_error_lcb),
                "error_margin": plan.error_margin,
                "baseline_p95_above_s": p95.seconds(shown.lower_bound) if shown.lower_bound >= 0 else None,
                "canary_p95_at_most_s": p95.seconds(shown.canary_bound) if shown.canary_bound >= 0 else None,
                "canary_tail_ucb": _num(shown.canary_tail_ucb),
                "latency_margin": plan.latency_margin,
                "effective_latency_margin": _num(up),
                "min_canary_requests": self.config.min_step_requests,
                "min_step_seconds": self.config.min_step_duration,
                "max_step_seconds": self.config.max_step_duration,
            },
            "guardrails": {
                "canary_ready": obs.canary_ready,
                "consecutive_canary_failures": min(obs.consecutive_canary_failures, obs.canary.failures),
                "limit": _num(self.streak_limit),
                "alpha": plan.streak_alpha,
            },
            "reason": self.sentence(action, weight, fired),
        }
