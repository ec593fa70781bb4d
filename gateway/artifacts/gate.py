"""The schema gate's decisions: which versions a reload or rollout must check, against what, and the verdict.

A version is checked when it is about to get traffic for the first time: a reload gives it weight in
the file's split while it had none (in the file or live), or a rollout starts with it as the canary. It
is compared with its rollout's baseline, else with the version that holds most traffic now. A version
without a baseline (a new model) has nothing to be compatible with and passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.artifacts.schema import Schema, differences
from gateway.routing.table import Model, RouteTable
from gateway.typed_json import Fields

Split = Sequence[tuple[str, int]]
Where = Literal["reload", "rollout"]
RECENT = 20  # refusals kept for the admin API


@dataclass(frozen=True, slots=True)
class Check:
    model: str
    version: str  # about to get traffic
    baseline: str  # what it must be able to stand in for
    reason: str  # why that baseline, for messages: "the rollout's baseline", "the version with most traffic"


def _baseline(model: Model, version: str, live: Mapping[str, int], file: Mapping[str, int]) -> Check | None:
    if model.rollout is not None and model.rollout.canary == version and model.rollout.baseline != version:
        return Check(model.name, version, model.rollout.baseline, "its rollout's baseline")
    for weights, reason in (
        (live, "the version with the most traffic now"),
        (file, "the file's main version"),
    ):
        ranked = sorted(((w, v) for v, w in weights.items() if v != version and w > 0), reverse=True)
        if ranked:
            return Check(model.name, version, ranked[0][1], reason)
    return None


def reload_checks(serving: RouteTable, candidate: RouteTable, live: Callable[[str], Split]) -> list[Check]:
    """The versions a reload from `serving` to `candidate` gives weight for the first time."""
    checks = []
    for model in candidate.models.values():
        old = serving.models.get(model.name)
        if old is None:
            continue
        live_weights = {v: w for v, w in live(model.name) if v in old.versions}
        file_weights = dict(old.split)
        for version, weight in model.split:
            if weight <= 0 or live_weights.get(version, 0) > 0 or file_weights.get(version, 0) > 0:
                continue
            check = _baseline(model, version, live_weights, file_weights)
            if check is not None and check.baseline in old.versions:
                checks.append(check)
    return checks


def rollout_check(model: Model) -> Check | None:
    rollout = model.rollout
    if rollout is None or rollout.canary == rollout.baseline:
        return None
    return Check(model.name, rollout.canary, rollout.baseline, "its rollout's baseline")


@dataclass(frozen=True, slots=True)
class Verdict:
    check: Check
    problems: tuple[str, ...]  # one sentence per tensor that differs
    allowed: bool  # the version sets allow_schema_change: the problems are let through (and audited)

    @property
    def passes(self) -> bool:
        return not self.problems or self.allowed

    def message(self) -> str:
        c = self.check
        head = f"schema gate: {c.model} {c.version} cannot take the traffic of {c.baseline} ({c.reason})"
        hint = f"; if the change is intended, set allow_schema_change: true on {c.version}"
        return f"{head}: " + "; ".join(self.problems) + ("" if self.allowed else hint)


def judge(check: Check, baseline: Schema, candidate: Schema, allow: bool) -> Verdict:
    return Verdict(check, tuple(differences(baseline, candidate, check.baseline, check.version)), allow)


@dataclass(frozen=True, slots=True)
class Refusal:
    time: float
    model: str
    version: str
    where: str  # reload or rollout
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "model": self.model,
            "version": self.version,
            "where": self.where,
            "message": self.message,
        }

    @classmethod
    def read(cls, f: Fields) -> Refusal:
        return cls(f.number("time"), f.text("model"), f.text("version"), f.text("where"), f.text("message"))


@dataclass(frozen=True, slots=True)
class GateView:
    """What one worker's schema gate did, as published in its snapshot: rollouts it holds now, its
    latest refusals, and counts of refusals and audited passes for the metric."""

    held: Mapping[str, str] = field(default_factory=dict)  # model -> why its rollout does not start
    recent: tuple[Refusal, ...] = ()
    refused: Mapping[str, int] = field(default_factory=dict)  # "model/version/where" -> count
    allowed: Mapping[str, int] = field(default_factory=dict)  # the same, for allow_schema_change passes

    def to_json(self) -> dict[str, Any]:
        return {
            "held": dict(self.held),
            "recent": [r.to_json() for r in self.recent],
            "refused": dict(self.refused),
            "allowed": dict(self.allowed),
        }

    @classmethod
    def read(cls, f: Fields) -> GateView:
        held = f.child("held")
        return cls(
            {model: held.text(model) for model in held.data},
            tuple(Refusal.read(r) for r in f.entries("recent")),
            _counts(f.child("refused")),
            _counts(f.child("allowed")),
        )


def _counts(f: Fields) -> dict[str, int]:
    return {key: f.integer(key) for key in f.data}


def count_key(model: str, version: str, where: str) -> str:
    return f"{model}/{version}/{where}"
