"""The pipeline: runs the steps of steps.py against one routing snapshot, for any front door.

A front door calls `plan` once a request's head is in. The steps that need only the head run then:
target, key, model, admission (which may wait on the store) and version choice. `then` receives either
a `Plan` (where to forward, and what to add to the answer) or a `Refusal`, exactly once. If a step
raises, `crashed` receives the exception instead; a front door answers 500 or aborts, and nothing else
is touched.

The pipeline also owns what outlives a snapshot: the upstream pools (kept across snapshots while a
backend's settings stay the same) and the inputs a new snapshot is built from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NamedTuple

from gateway.access.admission import ADMITTED, Admission, AdmissionDecision, Caller
from gateway.pipeline import steps
from gateway.pipeline.errors import Refusal
from gateway.pipeline.snapshot import (
    HealthMap,
    ModelRoute,
    RoutingSnapshot,
    VersionRoute,
    Weights,
    build_snapshot,
)
from gateway.routing.decisions import Target
from gateway.routing.table import RouteTable
from gateway.stats.counters import Choice, Stats
from gateway.wire.headers import Headers
from gateway.wire.upstream import Pool


class Plan(NamedTuple):
    """A request that passed every head step: where it goes and what its answer carries.

    A NamedTuple rather than a frozen dataclass: one is made per request, and a frozen dataclass's
    `__init__` costs about a microsecond more.
    """

    version: VersionRoute
    shadow: VersionRoute | None
    headers: Headers | None  # rate-limit headers from admission
    key_name: str
    choice: Choice  # how `version` was chosen: split, sticky or pinned (shadow copies are apart)


Planned = Callable[[Plan | Refusal], None]
Crashed = Callable[[BaseException], None]


class Pipeline:
    def __init__(
        self,
        table: RouteTable,
        loop: asyncio.AbstractEventLoop,
        stats: Stats | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.loop = loop
        self.stats = stats or Stats()
        self.admission = admission
        self._pools: dict[str, Pool] = {}
        self._overrides: Weights = {}
        self._health: HealthMap = {}
        self.snapshot: RoutingSnapshot
        self._serving: RoutingSnapshot | None = None  # the snapshot being replaced, once there is one
        self.captured_headers: frozenset[bytes]
        self.set_table(table)

    # -- building snapshots (reload, health flips, overrides, rollout steps) ------------------------

    def set_table(self, table: RouteTable) -> None:
        """Serve a new table; requests in flight finish on the snapshot (and pools) they started on."""
        pools = {}
        for name, backend in table.backends.items():
            pool = self._pools.get(name)
            pools[name] = pool if pool is not None and pool.backend == backend else Pool(backend, self.loop)
        for name, pool in self._pools.items():
            if pools.get(name) is not pool:
                pool.close()
        self._pools = pools
        self._swap(self._rebuild(table))

    def set_routing(self, overrides: Weights | None = None, health: HealthMap | None = None) -> None:
        """New live weights (rollouts and operators' overrides) or readiness: a new snapshot."""
        if overrides is not None:
            self._overrides = overrides
        if health is not None:
            self._health = health
        self._swap(self._rebuild(self.snapshot.table))

    def _swap(self, snapshot: RoutingSnapshot) -> None:
        self._serving = self.snapshot = snapshot
        self.captured_headers = snapshot.captured_headers  # read per request head: one lookup, not two

    def _rebuild(self, table: RouteTable) -> RoutingSnapshot:
        return build_snapshot(table, self._pools, self.stats, self._overrides, self._health, self._serving)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()

    # -- the head steps ----------------------------------------------------------------------------

    def plan(
        self, snapshot: RoutingSnapshot, target: Target, caller: Caller, then: Planned, crashed: Crashed
    ) -> None:
        """Run the head steps for an inference request; `then` gets the plan or the refusal."""
        route = self._model(snapshot, target, caller)
        if isinstance(route, Refusal):
            then(route)
            return
        admission = self.admission
        if admission is None or not route.admission_needed:
            self._choose(snapshot, route, target.version, caller, ADMITTED, then)
            return

        def admitted(decision: AdmissionDecision) -> None:
            # Possibly later, from the store's answer: the exception boundary for what follows.
            try:
                self._choose(snapshot, route, target.version, caller, decision, then)
            except Exception as exc:
                crashed(exc)

        admission.admit(route.access, caller, admitted, crashed)

    def authorize(
        self,
        snapshot: RoutingSnapshot,
        target: Target,
        caller: Caller,
        then: Callable[[ModelRoute | Refusal], None],
        crashed: Crashed,
    ) -> None:
        """The key steps alone, for reads of a model's metadata: same 401 / 403 / 404 as inference."""
        route = self._model(snapshot, target, caller)
        if isinstance(route, Refusal) or self.admission is None or not route.metadata_access.key_required:
            then(route)
            return

        def decided(decision: AdmissionDecision) -> None:
            try:
                then(steps.admission_refusal(decision) if decision.status else route)
            except Exception as exc:
                crashed(exc)

        self.admission.admit(route.metadata_access, caller, decided, crashed)

    def _model(self, snapshot: RoutingSnapshot, target: Target, caller: Caller) -> ModelRoute | Refusal:
        """require_key, then find_model: a caller without a key learns nothing of which models exist."""
        refusal = steps.require_key(snapshot, caller)
        return refusal if refusal is not None else steps.find_model(snapshot, target)

    def _choose(
        self,
        snapshot: RoutingSnapshot,
        route: ModelRoute,
        pin: str,
        caller: Caller,
        decision: AdmissionDecision,
        then: Planned,
    ) -> None:
        if decision.status:
            then(steps.admission_refusal(decision))
            return
        chosen = steps.choose_version(snapshot, route, pin, caller)
        if isinstance(chosen, Refusal):
            then(chosen)
            return
        version, how = chosen
        shadow = steps.shadow_of(snapshot, route, version) if route.model.mirror is not None else None
        then(Plan(version, shadow, decision.headers or None, decision.key_name, how))
