"""The routing snapshot: everything a request needs, built once per change and swapped as one reference.

A request takes `Pipeline.snapshot` once, when its head is in, and uses nothing else until it ends: a
reload, a health flip, an operator's override or a rollout step builds a new snapshot while requests
in flight finish on the one they started with (a removed version still has its route in the old
snapshot). Everything per model that does not depend on the request is precomputed here: the live
split, the access policy and its limits, the upstream request line and host as bytes, the sticky
header name as bytes, the reasons a version is not ready.

The snapshot lives in the pipeline rather than in routing/ because it joins the routing table with
the access policy, the upstream pools and the counters, which routing/ knows nothing of. The one
mutable part is the router's position in each split cycle, which advances per request by design.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.access.admission import AccessPolicy, access_policy
from gateway.routing.decisions import Router, effective_split
from gateway.routing.health import Health
from gateway.routing.table import Model, RouteTable, Version, triton_model_path
from gateway.stats.counters import Stats, VersionCounters
from gateway.wire.http_server import FRAMING_HEADERS
from gateway.wire.upstream import Pool

# Request headers the pipeline reads (beside the sticky ones of the models in the table).
PIPELINE_HEADERS = frozenset(
    (b"authorization", b"x-api-key", b"x-model-version", b"x-request-id", b"x-forwarded-for")
)
Weights = Mapping[str, tuple[tuple[str, int], ...]]
HealthMap = Mapping[tuple[str, str], Health]  # (model, version id) -> last check; absent: not checked yet


@dataclass(frozen=True, slots=True)
class VersionRoute:
    """What forwarding needs to reach one version, precomputed as bytes."""

    model: str
    version: Version
    id: bytes
    pool: Pool
    counters: VersionCounters
    host: bytes  # the upstream Host header value
    path: bytes  # Triton's infer path for this version
    unready: str  # why it gets no traffic now; "" when ready or not checked yet


@dataclass(frozen=True, slots=True)
class ModelRoute:
    model: Model
    versions: Mapping[str, VersionRoute]
    access: AccessPolicy
    admission_needed: bool  # access.needed, precomputed: read on every request
    metadata_access: AccessPolicy  # who may read its metadata: the key checks, without the limits
    sticky_header: bytes | None
    not_ready: str  # "2.1.3 is not ready: ...; ..." for the 503 when no version takes traffic


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    table: RouteTable
    models: Mapping[str, ModelRoute]
    router: Router
    health: HealthMap
    captured_headers: frozenset[bytes]

    def split_of(self, model: str) -> tuple[tuple[str, int], ...]:
        return self.router.split_of(model)


def build_snapshot(
    table: RouteTable,
    pools: Mapping[str, Pool],
    stats: Stats,
    overrides: Weights,
    health: HealthMap,
    replacing: RoutingSnapshot | None = None,
) -> RoutingSnapshot:
    """The snapshot for a table, the weights that override its splits, and what health checks saw.

    `replacing` is the snapshot it succeeds: its router's positions carry over (decisions.Router).

    A version whose last check failed gets weight 0 (the others keep their relative weights); a version
    not checked yet keeps its weight: not having looked is not evidence that it is down.
    """
    weights = {}
    models = {}
    for name, model in table.models.items():
        unready = {v: h.detail for (m, v), h in health.items() if m == name and not h.ready}
        weights[name] = effective_split(model, overrides.get(name), frozenset(unready))
        policy = access_policy(table, model)
        versions = {
            version.id: _version_route(model, version, pools[version.backend], stats, unready.get(version.id))
            for version in model.versions.values()
        }
        models[name] = ModelRoute(
            model,
            MappingProxyType(versions),
            policy,
            policy.needed,
            dataclasses.replace(policy, limited=False),
            model.sticky_header.encode() if model.sticky_header else None,
            "; ".join(f"{v} is not ready: {why}" for v, why in unready.items()),
        )
    sticky = {route.sticky_header for route in models.values() if route.sticky_header is not None}
    return RoutingSnapshot(
        table,
        MappingProxyType(models),
        Router(table, weights, replacing.router if replacing is not None else None),
        MappingProxyType(dict(health)),
        FRAMING_HEADERS | PIPELINE_HEADERS | sticky,
    )


def _version_route(
    model: Model, version: Version, pool: Pool, stats: Stats, unready: str | None
) -> VersionRoute:
    backend = pool.backend
    return VersionRoute(
        model.name,
        version,
        version.id.encode(),
        pool,
        stats.counters(model.name, version.id),
        f"{backend.host}:{backend.port}".encode(),
        (triton_model_path(version) + "/infer").encode(),
        unready or "",
    )
