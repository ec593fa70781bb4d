"""Automatic canary analysis: the decision engine (pure code) and its sequential statistics.

`decide(config, state, observation)` turns the counts of a canary and its baseline into continue, step
up, promote or roll back, with the evidence; see `gateway.rollout.engine` for the policy and
`gateway.rollout.sequential` for the statistics and the literature behind them.
"""

from gateway.rollout.engine import (
    CONSECUTIVE_FAILURE_LIMIT,
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
from gateway.rollout.sequential import Counts, Plan, TestStats

__all__ = [
    "CONSECUTIVE_FAILURE_LIMIT",
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
