"""Automatic canary analysis: the decision engine (pure code) and its sequential statistics.

`decide(config, state, observation)` turns the counts of a canary and its baseline into continue, step
up, promote, hold or roll back, with the evidence; see `gateway.rollout.engine` for the policy,
`gateway.rollout.statistics` for what alpha and beta bound and `gateway.rollout.sequential` and
`gateway.rollout.p95` for the statistics and the literature behind them.
"""

from gateway.rollout.engine import (
    MIN_CANARY_REQUESTS,
    MIN_STEP_SECONDS,
    Action,
    Decision,
    Observation,
    Phase,
    RolloutState,
    decide,
    initial_state,
    plan_of,
)
from gateway.rollout.sequential import Counts
from gateway.rollout.statistics import Plan, TestStats

__all__ = [
    "MIN_CANARY_REQUESTS",
    "MIN_STEP_SECONDS",
    "Action",
    "Counts",
    "Decision",
    "Observation",
    "Phase",
    "Plan",
    "RolloutState",
    "TestStats",
    "decide",
    "initial_state",
    "plan_of",
]
