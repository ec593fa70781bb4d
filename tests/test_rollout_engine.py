"""The rollout decision engine: guardrails, waiting, rollbacks with evidence, stepping up, holding.

Traffic is drawn in-process (1000 requests a second unless said otherwise, an exact split, binomial
failures, lognormal latency buckets) and fed to the real `decide` every second, as the controller does.
Seeded and short: the full statistical table is load_tests/simulate_rollout.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from gateway.rollout import Counts, Decision, Observation, RolloutState, decide, initial_state
from gateway.rollout.statistics import MIN_STREAK
from gateway.routing.table import Rollout
from gateway.stats.kinds import BUCKETS
from load_tests.simulate_rollout import BASE_LAW, Scenario, bucket_probabilities, rollout, run_one, tail_law

Floats = npt.NDArray[np.float64]
DEFAULT = Rollout("2.1.3", "2.2.0", (5, 25, 50, 100))


def traffic(
    seed: int, weight: int, errors: tuple[float, float], canary_law: Floats = BASE_LAW, per_second: int = 1000
) -> Iterator[tuple[Counts, Counts]]:
    """(baseline, canary) per second."""
    rng = np.random.default_rng(seed)
    n_c = per_second * weight // 100
    n_b = per_second - n_c

    def draw(n: int, rate: float, law: Floats) -> Counts:
        return Counts(n, int(rng.binomial(n, rate)), tuple(int(x) for x in rng.multinomial(n, law)))

    while True:
        yield draw(n_b, errors[0], BASE_LAW), draw(n_c, errors[1], canary_law)


def add(a: Counts, b: Counts) -> Counts:
    return Counts(
        a.requests + b.requests,
        a.failures + b.failures,
        tuple(x + y for x, y in zip(a.buckets, b.buckets, strict=True)),
    )


def drive(
    config: Rollout,
    seconds: int,
    seed: int,
    errors: tuple[float, float],
    canary_law: Floats = BASE_LAW,
    per_second: int = 1000,
    state: RolloutState | None = None,
) -> list[tuple[int, Decision]]:
    """A controller: calls the engine every second with the counts since the step started, applies steps
    (the weight changes the split), stops at a final decision or a hold."""
    state = state or initial_state(config, 0.0)
    base, canary = Counts(), Counts()
    decisions = []
    gen = traffic(seed, state.weight, errors, canary_law, per_second)
    for t in range(1, seconds + 1):
        b, c = next(gen)
        base, canary = add(base, b), add(canary, c)
        state, decision = decide(config, state, Observation(base, canary, True, 0, float(t)))
        decisions.append((t, decision))
        if decision.action in ("rollback", "promote", "hold"):
            break
        if decision.action == "step_up":
            base, canary = Counts(), Counts()
            gen = traffic(seed * 7919 + t, state.weight, errors, canary_law, per_second)
    return decisions


def moves(decisions: list[tuple[int, Decision]]) -> list[tuple[str, int]]:
    return [(d.action, d.weight) for _, d in decisions if d.action != "continue"]


def one_second(requests: int, failures: int) -> Counts:
    return Counts(requests, failures, (requests,) + (0,) * (BUCKETS - 1))


def test_a_canary_whose_backend_is_not_ready_is_rolled_back_at_once() -> None:
    state = initial_state(DEFAULT, 0.0)
    new, decision = decide(DEFAULT, state, Observation(Counts(), Counts(), False, 0, 1.0))
    assert (decision.action, decision.weight, decision.evidence["fired"], new.phase) == (
        "rollback",
        0,
        "canary_not_ready",
        "rolled_back",
    )
    assert decision.evidence["reason"] == "Rolled back: the canary's backend is not ready."
    # A finished rollout stays finished, whatever comes in.
    assert decide(DEFAULT, new, Observation(Counts(), Counts(), True, 0, 2.0))[1].action == "continue"


def test_failures_in_a_row_are_judged_against_the_baseline_in_the_same_interval() -> None:
    """The run limit comes from a bound on the baseline's failure rate in the same interval: a run that a
    healthy baseline could hardly produce rolls back; the same run during a shared outage does not."""
    state = initial_state(DEFAULT, 0.0)
    quiet_b = one_second(950, 0)

    def look(baseline: Counts, streak: int, failures: int = 50) -> Decision:
        canary = one_second(50, failures)
        return decide(DEFAULT, state, Observation(baseline, canary, True, streak, 1.0))[1]

    limit = look(quiet_b, 0).evidence["guardrails"]["limit"]
    assert MIN_STREAK <= limit <= 50
    # (50 failures of 50 against none of 950 also fire the error test: the guardrail is checked first.)
    assert look(quiet_b, int(limit) - 1).evidence["fired"] != "consecutive_failures"
    fired = look(quiet_b, int(limit))
    assert (fired.action, fired.evidence["fired"]) == ("rollback", "consecutive_failures")
    assert f"reaches {limit:.0f} with probability" in fired.evidence["reason"]
    # The baseline failing too (a dependency both use is down): no limit, nothing rolls back.
    outage = look(one_second(950, 950), 50)
    assert outage.action == "continue" and outage.evidence["guardrails"]["limit"] is None
    shaky = look(one_second(950, 400), int(limit), failures=25)
    assert shaky.action == "continue" and shaky.evidence["guardrails"]["limit"] > limit
    # A run reported by a process but not in this step's failures (it began before the rollout) is
    # counted only as far as the step's own failures go.
    canary = one_second(50, 0)
    decision = decide(DEFAULT, state, Observation(quiet_b, canary, True, 1000, 1.0))[1]
    assert decision.action == "continue"
    assert decision.evidence["guardrails"]["consecutive_canary_failures"] == 0


def test_no_traffic_or_too_little_means_waiting() -> None:
    state = initial_state(DEFAULT, 0.0)
    for t in range(1, 1201):  # 20 minutes of nothing
        state, decision = decide(DEFAULT, state, Observation(Counts(), Counts(), True, 0, float(t)))
        assert decision.action == "continue"
    assert decision.evidence["tests"]["errors"]["log_e_value"] is None  # no test yet
    assert decision.evidence["reason"].startswith("Waiting at 5%: 0 canary requests")
    # A canary that gets all the failures while its baseline serves nothing: no comparison, no evidence.
    lonely = one_second(50, 50)
    state, decision = decide(DEFAULT, state, Observation(Counts(), lonely, True, 3, 1201.0))
    assert decision.action == "continue" and decision.evidence["tests"]["errors"]["log_e_value"] is None
    # 2 requests a second: a healthy canary is never rolled back.
    assert {a for a, _ in moves(drive(DEFAULT, 1200, 5, (0.01, 0.01), per_second=2))} <= {"step_up"}


def test_seconds_with_one_version_only_are_batched_until_both_have_data() -> None:
    """Low traffic: a second in which only the canary served is held back, then tested together with the
    next second in which the baseline served too, so it counts exactly as one interval would."""
    state0 = initial_state(DEFAULT, 0.0)
    first_c, both_b, both_c = one_second(3, 2), one_second(40, 0), one_second(5, 3)
    held, decision = decide(DEFAULT, state0, Observation(Counts(), first_c, True, 0, 1.0))
    assert decision.evidence["tests"]["errors"]["log_e_value"] is None  # nothing fed yet
    batched, _ = decide(DEFAULT, held, Observation(both_b, add(first_c, both_c), True, 0, 2.0))
    at_once, _ = decide(DEFAULT, state0, Observation(both_b, add(first_c, both_c), True, 0, 2.0))
    assert batched.tests == at_once.tests and batched.tests.errors.log_e() > -math.inf


def test_an_error_regression_is_rolled_back_with_its_evidence() -> None:
    t, decision = drive(DEFAULT, 120, 1, (0.002, 0.02))[-1]
    assert decision.action == "rollback" and t <= 40
    evidence = decision.evidence
    json.dumps(evidence, allow_nan=False)  # JSON-able, no NaN or infinities
    errors = evidence["tests"]["errors"]
    assert evidence["fired"] == "errors" and errors["fired"]
    assert errors["log_e_value"] >= math.log(errors["threshold"])
    assert evidence["counts"]["canary"]["failures"] > 0 and evidence["estimates"]["canary_error_rate"] > 0.01
    assert evidence["reason"].startswith("Rolled back: the canary failed")
    assert "probability 0.45% at most" in evidence["reason"]  # its share of alpha


def test_a_latency_regression_is_rolled_back_for_its_p95() -> None:
    t, decision = drive(DEFAULT, 300, 2, (0.002, 0.002), bucket_probabilities(0.030))[-1]
    assert decision.action == "rollback" and decision.evidence["fired"] == "latency" and t <= 90
    latency = decision.evidence["tests"]["latency"]
    # Rolled back only on the canary's p95 shown above (1 + 20%) x a bound the baseline's p95 is below.
    assert latency["canary_bound_s"] >= 1.2 * latency["baseline_p95_at_most_s"]
    assert latency["effective_margin"] >= 0.2
    assert "where the baseline's p95 is at most" in decision.evidence["reason"]


def test_a_healthy_canary_steps_up_and_is_promoted_from_the_last_step_below_100() -> None:
    decisions = drive(DEFAULT, 1800, 3, (0.002, 0.002))
    assert moves(decisions) == [("step_up", 25), ("step_up", 50), ("promote", 100)]
    t, last = decisions[-1]
    assert t < 600
    assert last.evidence["reason"].startswith("Promoted from 50%")
    assert last.evidence["no_worse"]["shown"] is True
    # Two steps: promotion is decided at 5%, on the evidence of that step.
    assert moves(drive(replace(DEFAULT, steps=(5, 100)), 900, 3, (0.002, 0.002))) == [("promote", 100)]


def test_a_paused_rollout_never_steps_up_but_still_rolls_back() -> None:
    paused = replace(initial_state(DEFAULT, 0.0), phase="paused")
    decisions = drive(DEFAULT, 400, 3, (0.002, 0.002), state=paused)
    assert moves(decisions) == [] and decisions[-1][1].evidence["reason"].startswith("Paused at 5%")
    assert moves(drive(DEFAULT, 400, 3, (0.002, 0.1), state=paused)) == [("rollback", 0)]


def test_a_step_undecided_past_max_step_duration_is_held_or_rolled_back_as_configured() -> None:
    # 1.4x slower with a 20% margin: neither shown within it quickly nor rolled back at once.
    slow = bucket_probabilities(0.020 * 1.15)
    config = replace(DEFAULT, max_step_duration=120.0, max_latency_increase=0.05)
    t, decision = drive(config, 600, 4, (0.002, 0.002), slow)[-1]
    assert (t, decision.action, decision.weight, decision.evidence["phase"]) == (120, "hold", 5, "paused")
    assert decision.evidence["fired"] == "max_step_duration"
    assert decision.evidence["reason"].startswith("Held at 5%: the step lasted 120 s, past max_step_duration")
    t, decision = drive(replace(config, on_max_step_duration="rollback"), 600, 4, (0.002, 0.002), slow)[-1]
    assert (t, decision.action, decision.evidence["fired"]) == (120, "rollback", "max_step_duration")
    assert "outside alpha" in decision.evidence["reason"]


def test_state_survives_json() -> None:
    state = initial_state(DEFAULT, 0.0)
    base, canary = Counts(), Counts()
    for t, (b, c) in zip(range(1, 400), traffic(4, 5, (0.01, 0.012)), strict=False):
        base, canary = add(base, b), add(canary, c)
        state, _ = decide(DEFAULT, state, Observation(base, canary, True, 0, float(t)))
    assert len(state.tests.errors.components) >= 2  # restarted at least once (every 300 s)
    assert RolloutState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_a_canary_worse_than_the_margins_is_never_stepped_up() -> None:
    """The three false-promotion cases of issue 11, a few seeds each (the table runs 1000)."""
    cases = [
        (DEFAULT, (0.002, 0.002), tail_law(0.075, 10.0)),  # p95 10.6x on a 7.5% tail
        (replace(DEFAULT, max_latency_increase=0.05), (0.002, 0.002), bucket_probabilities(0.023)),
        (replace(DEFAULT, max_error_rate_increase=0.0025), (0.002, 0.007), BASE_LAW),
    ]
    for config, errors, law in cases:
        for seed in range(2):
            decisions = drive(config, 300, seed, errors, law)
            assert not any(a in ("step_up", "promote") for a, _ in moves(decisions)), (config, seed)


def test_simulated_fleets_through_the_controller() -> None:
    """A handful of the simulation's runs (two processes, Poisson arrivals, the real ledger and
    controller): A/A with bursts, a crash loop and caller faults is promoted, never rolled back; a 10x
    error regression is rolled back in seconds."""
    for sc in (
        Scenario("bursts", "aa", base_errors=0.001, bursts=(120, 10, 0.2), horizon=1800),
        Scenario("crash loop", "aa", restart_every=40, horizon=600),
        Scenario("caller faults", "aa", caller_faults=0.2, horizon=600),
        Scenario("pinning adversary", "aa", pinned_rate=20.0, horizon=600),
    ):
        for seed in range(2):
            result = run_one(sc, seed)
            assert math.isinf(result.rollback) and math.isfinite(result.promoted), (sc.name, seed)
    detect = Scenario("10x", "detect", config=rollout(), error_factor=10.0, paused=True, horizon=120)
    result = run_one(detect, 0)
    assert result.rollback <= 30 and result.fired == "errors"
