"""Which version answers a request: pin, alias, sticky cohort or weighted split.

The decisions are pure functions of the table and the request; the only state is a per-model counter
that walks a precomputed split sequence, owned by `Router`, which is rebuilt with every table.

Weighted split uses nginx's *smooth weighted round-robin* order, precomputed once: over any window of
n consecutive requests each version's count is within one or two of `n * weight / 100`, instead of
drifting like a random draw would (a 90/10 split over 200 random requests is off by 4 points 5% of the
time).

Sticky cohorts use weighted rendezvous hashing (highest random weight, with the `-w / ln(h)` score of
Schindelhauer and Schomaker): each (caller, version) pair gets a fixed pseudo-random score scaled by the
version's weight, and the caller goes to the highest. Raising one version's weight raises only its own
scores, so callers can only move *to* it: a canary going from 5% to 10% takes callers from the baseline
and never sends a canary caller back. The hash is keyed blake2b, stable across processes and restarts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import reduce
from hashlib import blake2b

from gateway.routing.table import Model, RouteTable, Version


class Endpoint(Enum):
    INFER = "infer"
    MODEL_METADATA = "model_metadata"
    MODEL_READY = "model_ready"
    MODEL_CONFIG = "model_config"
    HEALTH_LIVE = "health_live"
    HEALTH_READY = "health_ready"
    SERVER_METADATA = "server_metadata"


@dataclass(frozen=True, slots=True)
class Target:
    """What a request path names: an endpoint, and for model endpoints the model and pinned version."""

    endpoint: Endpoint
    model: str = ""
    version: str = ""  # "" when the path names no version


_MODEL_SUFFIXES = {
    "": Endpoint.MODEL_METADATA,
    "ready": Endpoint.MODEL_READY,
    "config": Endpoint.MODEL_CONFIG,
}


def parse_path(path: str) -> Target | None:
    """Map a KServe v2 or /predict path onto a Target; None when the gateway serves no such path."""
    parts = path.split("/")
    # parts[0] is "" because paths start with "/"; a trailing slash leaves a final "" that we ignore.
    if parts[-1] == "" and len(parts) > 2:
        parts.pop()
    n = len(parts)
    if n >= 2 and parts[1] == "predict":
        if n == 3 and parts[2]:
            return Target(Endpoint.INFER, parts[2])
        if n == 4 and parts[2] and parts[3]:
            return Target(Endpoint.INFER, parts[2], parts[3])
        return None
    if n < 2 or parts[1] != "v2":
        return None
    if n == 2:
        return Target(Endpoint.SERVER_METADATA)
    if parts[2] == "health" and n == 4:
        if parts[3] == "live":
            return Target(Endpoint.HEALTH_LIVE)
        if parts[3] == "ready":
            return Target(Endpoint.HEALTH_READY)
        return None
    if parts[2] != "models" or n < 4 or not parts[3]:
        return None
    model = parts[3]
    rest = parts[4:]
    version = ""
    if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
        version = rest[1]
        rest = rest[2:]
    if not rest:
        return Target(Endpoint.MODEL_METADATA, model, version)
    if len(rest) == 1:
        if rest[0] == "infer":
            return Target(Endpoint.INFER, model, version)
        endpoint = _MODEL_SUFFIXES.get(rest[0])
        if endpoint is not None:
            return Target(endpoint, model, version)
    return None


def split_sequence(split: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """One cycle of smooth weighted round-robin over the split, reduced by the weights' common divisor."""
    weighted = [(version, weight) for version, weight in split if weight > 0]
    if not weighted:
        return ()
    divisor = reduce(math.gcd, (weight for _, weight in weighted))
    weights = [weight // divisor for _, weight in weighted]
    total = sum(weights)
    current = [0] * len(weights)
    sequence = []
    for _ in range(total):
        for i, weight in enumerate(weights):
            current[i] += weight
        best = max(range(len(weights)), key=current.__getitem__)
        current[best] -= total
        sequence.append(weighted[best][0])
    return tuple(sequence)


def _unit_hash(key: bytes, version: str) -> float:
    """A stable pseudo-random number in (0, 1) for a (caller, version) pair."""
    digest = blake2b(key, digest_size=8, key=version.encode()[:64]).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


def sticky_choice(split: tuple[tuple[str, int], ...], key: bytes) -> str | None:
    """The version a caller identified by `key` sticks to, by weighted rendezvous hashing."""
    best_version = None
    best_score = -math.inf
    for version, weight in split:
        if weight <= 0:
            continue
        score = -weight / math.log(_unit_hash(key, version))
        if score > best_score:
            best_version, best_score = version, score
    return best_version


class Router:
    """Per-process routing state for one table: the position of each model in its split cycle.

    `weights` overrides a model's split from the file (operator overrides, rollout steps); it is
    applied by building a new Router, never by mutating one in place. `carried` is the Router it
    replaces: a model whose split sequence is the same keeps its place in it, and one whose mirror is
    the same keeps its credit, so a rebuild for an unrelated reason (a health flip, another model's
    rollout step, a reload that changed something else) does not bend the exact shares.
    """

    __slots__ = ("_counters", "_mirror_credit", "_sequences", "_splits", "table")

    def __init__(
        self,
        table: RouteTable,
        weights: Mapping[str, tuple[tuple[str, int], ...]] | None = None,
        carried: Router | None = None,
    ):
        self.table = table
        self._splits = {name: (weights or {}).get(name, model.split) for name, model in table.models.items()}
        self._sequences = {name: split_sequence(split) for name, split in self._splits.items()}
        self._counters = dict.fromkeys(table.models, 0)
        self._mirror_credit = dict.fromkeys(table.models, 0.0)
        if carried is not None:
            self._carry(carried)

    def _carry(self, old: Router) -> None:
        for name, model in self.table.models.items():
            if old._sequences.get(name) == self._sequences[name]:
                self._counters[name] = old._counters[name]
            previous = old.table.models.get(name)
            if previous is not None and previous.mirror == model.mirror:
                self._mirror_credit[name] = old._mirror_credit[name]

    def split_of(self, model: str) -> tuple[tuple[str, int], ...]:
        return self._splits[model]

    def mirror_to(self, model: Model, answering: Version) -> Version | None:
        """The version that gets a shadow copy of this request, if any.

        Credit accumulates by `percent` per request and a copy goes out each time it reaches 100, so the
        share of mirrored requests is exact over any window rather than random.
        """
        mirror = model.mirror
        if mirror is None or mirror.to == answering.id:
            return None
        credit = self._mirror_credit[model.name] + mirror.percent
        if credit >= 100.0:
            self._mirror_credit[model.name] = credit - 100.0
            return model.versions[mirror.to]
        self._mirror_credit[model.name] = credit
        return None

    def choose(self, model: Model, sticky_value: bytes | None) -> Version | None:
        """The version for a request that names none; None when the model has no traffic weight at all."""
        if sticky_value is not None and model.sticky_header is not None:
            version_id = sticky_choice(self._splits[model.name], sticky_value)
            return None if version_id is None else model.versions[version_id]
        sequence = self._sequences[model.name]
        if not sequence:
            return None
        position = self._counters[model.name]
        self._counters[model.name] = (position + 1) % len(sequence)
        return model.versions[sequence[position]]


def effective_split(
    model: Model, override: tuple[tuple[str, int], ...] | None, unready: frozenset[str]
) -> tuple[tuple[str, int], ...]:
    """The weights a model's unpinned traffic follows now.

    An operator's override replaces the file's split; a version whose backend is not ready gets weight
    0, and the others keep their relative weights (the split sequence and sticky hashing renormalise).
    """
    split = override if override is not None else model.split
    if not unready:
        return split
    return tuple((version, 0 if version in unready else weight) for version, weight in split)
