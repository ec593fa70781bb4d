"""Admin routes for the version registry and the schema gate.

`GET /api/versions/{model}` and `GET /api/versions/{model}/{version}` join the registry (in the store)
with the routes file; `PUT /api/versions/{model}/{version}` registers a build (what `gateway archive
deploy` calls); `GET /api/schema-gate` shows what the workers' schema gates hold back and refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.admin.auth import WHO
from gateway.admin.control_plane import ControlPlane
from gateway.artifacts import registry
from gateway.routing import units
from gateway.routing.table import Model
from gateway.state.records import WorkerSnapshot
from gateway.store.base import Store, StoreUnavailable
from gateway.typed_json import RecordError

log = logging.getLogger("gateway.admin.versions")
RECENT_REFUSALS = 50


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def routes_entry(model: Model | None, version: str) -> dict[str, Any]:
    """What the routes file says of a version now."""
    found = model.versions.get(version) if model is not None else None
    if model is None or found is None:
        return {"in_file": False}
    return {
        "in_file": True,
        "backend": found.backend,
        "target": f"{found.triton_model}/{found.triton_version}".rstrip("/"),
        "archive": found.archive or None,
        "allow_schema_change": found.allow_schema_change,
        "weight_in_file": dict(model.split).get(version, 0),
    }


def _deployment(body: dict[str, Any]) -> dict[str, str]:
    value = body.get("deployment", {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError('"deployment" must be an object of strings (backend, url or repository)')
    unknown = sorted(set(value) - {"backend", "url", "repository"})
    if unknown:
        raise ValueError(
            f'unknown "deployment" field(s) {", ".join(unknown)}; expected backend, url, repository'
        )
    return {k: v for k, v in value.items() if v}


def add_version_routes(app: web.Application, plane: ControlPlane, store: Store) -> None:
    def model_of(name: str) -> Model | None:
        table = plane.table()
        return table.models.get(name) if table is not None else None

    async def listing(request: web.Request) -> web.Response:
        name = request.match_info["model"]
        model = model_of(name)
        try:
            records = await registry.registered(store, name)
            ids = sorted(set(records) | set(model.versions if model else ()))
            versions = {}
            for version in ids:
                events = await registry.history(store, name, version)
                versions[version] = {
                    "summary": registry.summary(records.get(version), events),
                    "routes": routes_entry(model, version),
                }
        except StoreUnavailable as exc:
            return _error(503, str(exc))
        if not versions:
            return _error(404, f"model {name!r} has no registered version and is not in the routes file")
        return web.json_response({"model": name, "versions": versions})

    async def show(request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info["version"]
        try:
            record = (await registry.registered(store, name)).get(version)
            events = await registry.history(store, name, version)
        except StoreUnavailable as exc:
            return _error(503, str(exc))
        return web.json_response(
            {
                "model": name,
                "version": version,
                "record": record.to_json() if record else None,
                "summary": registry.summary(record, events),
                "history": events,
                "routes": routes_entry(model_of(name), version),
            }
        )

    async def register(request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info["version"]
        who = str(request.get(WHO, "admin"))
        try:
            body = json.loads(await request.text())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            offered = registry.RegistryRecord.from_json(body.get("record"))
            deployment = _deployment(body)
        except (ValueError, UnicodeDecodeError) as exc:  # RecordError is a ValueError
            return _error(400, f'body must be {{"record": {{...}}, "deployment": {{...}}}}: {exc}')
        if (offered.model, offered.version) != (name, version):
            return _error(
                400, f"the record is {offered.model} {offered.version}, the path says {name} {version}"
            )
        try:
            units.archive_digest(offered.digest)
        except ValueError as exc:
            return _error(400, f"digest {exc}")
        offered = dataclasses.replace(offered, registered_at=time.time(), registered_by=who)
        named = routes_entry(model_of(name), version).get("archive")
        try:
            existing = (await registry.registered(store, name)).get(version)
            if existing is None and named and named != offered.digest:
                return _error(
                    409,
                    f"the routes file names archive {named} for {name} {version}, not {offered.digest}; "
                    "give this build a new version id",
                )
            stored, created = await registry.register(store, offered)
            problem = registry.conflict(stored, offered)
            if problem:
                return _error(409, problem)
            if created:
                entry = registry.event("registered", by=who, digest=offered.digest, target=offered.target)
                await registry.add_event(store, name, version, entry)
            if deployment:
                await registry.add_event(
                    store, name, version, registry.event("deployed", by=who, **deployment)
                )
        except StoreUnavailable as exc:
            return _error(503, str(exc))
        except RecordError as exc:
            return _error(500, f"the registry holds an unreadable record for {name} {version}: {exc}")
        if created:
            log.info("admin: %s registered %s %s as %s", who, name, version, offered.digest)
            plane.audit_log.append(
                who, "version.register", {"model": name, "version": version, "digest": offered.digest}
            )
        return web.json_response(
            {"created": created, "record": stored.to_json()}, status=201 if created else 200
        )

    async def schema_gate(request: web.Request) -> web.Response:
        held: dict[str, str] = {}
        recent = []
        for worker in plane.live_workers():
            held |= dict(worker.schema_gate.held)
            recent += [{**r.to_json(), "pid": worker.pid} for r in worker.schema_gate.recent]
        recent.sort(key=lambda r: r["time"], reverse=True)
        return web.json_response({"held": held, "recent": recent[:RECENT_REFUSALS]})

    app.router.add_get("/api/versions/{model}", listing, allow_head=False)
    app.router.add_get("/api/versions/{model}/{version}", show, allow_head=False)
    app.router.add_put("/api/versions/{model}/{version}", register)
    app.router.add_get("/api/schema-gate", schema_gate, allow_head=False)


def schema_gate_metrics(workers: list[WorkerSnapshot]) -> Iterator[Metric]:
    """Refusals and audited passes summed over every worker that ever ran; holds of live workers."""
    refused = CounterMetricFamily(
        "gateway_schema_gate_refusals",
        "Times the schema gate kept a version from traffic (where: reload or rollout).",
        labels=["model", "version", "where"],
    )
    allowed = CounterMetricFamily(
        "gateway_schema_gate_allowed",
        "Schema differences let through because the version sets allow_schema_change (audited).",
        labels=["model", "version", "where"],
    )
    for family, counts in ((refused, "refused"), (allowed, "allowed")):
        totals: Counter[str] = Counter()
        for worker in workers:
            totals.update(getattr(worker.schema_gate, counts))
        for key, count in sorted(totals.items()):
            family.add_metric(key.split("/", 2), count)
    held = GaugeMetricFamily(
        "gateway_schema_gate_held", "1 while the schema gate holds a model's rollout back.", labels=["model"]
    )
    for model in sorted({m for w in workers if w.alive for m in w.schema_gate.held}):
        held.add_metric([model], 1.0)
    yield from (refused, allowed, held)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _answer(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


_ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "404": {"$ref": "#/components/responses/NotFound"},
    "409": _answer(
        "Error", "The id is registered as another build, or the routes file names another archive"
    ),
    "500": {"$ref": "#/components/responses/InternalError"},
    "503": _answer("Error", "The store (the registry) is unavailable"),
}
_PATH = [
    {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"},
    }
    for name in ("model", "version")
]


def _operation(operation_id: str, summary: str, ok: dict[str, Any], errors: str) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "responses": ok | {status: _ERRORS[status] for status in errors.split()},
    }


VERSIONS_OPENAPI_PATHS: dict[str, Any] = {
    "/api/versions/{model}": {
        "parameters": _PATH[:1],
        "get": _operation(
            "listRegisteredVersions",
            "A model's versions: registration, routes file, first and last served",
            {"200": _answer("RegistryListing", "Every version registered or in the routes file")},
            "401 404 500 503",
        ),
    },
    "/api/versions/{model}/{version}": {
        "parameters": _PATH,
        "get": _operation(
            "showVersion",
            "One version: its registration, history and routes entry",
            {"200": _answer("RegistryVersion", "The version")},
            "401 500 503",
        ),
        "put": {
            **_operation(
                "registerVersion",
                "Register a build under a version id (once, for good) and record a deployment",
                {
                    "201": _answer("Registered", "Registered now"),
                    "200": _answer("Registered", "Already registered as this same build"),
                },
                "400 401 409 500 503",
            ),
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("RegisterRequest")}},
            },
        },
    },
    "/api/schema-gate": {
        "get": _operation(
            "getSchemaGate",
            "Rollouts the schema gate holds and its latest refusals, over live workers",
            {"200": _answer("SchemaGate", "Holds and refusals")},
            "401 500",
        )
    },
}

_OBJECT = {"type": "object"}
_RECORD = {
    "type": "object",
    "description": "A registration: written once, never changed (docs/archives.md).",
    "properties": {
        "model": {"type": "string"},
        "version": {"type": "string"},
        "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
        "triton_model": {"type": "string"},
        "triton_version": {"type": "integer"},
        "schema": _OBJECT,
        "metadata": _OBJECT,
        "created": {"type": "string", "description": "when the archive was built (ISO 8601)"},
        "registered_at": {"type": "number"},
        "registered_by": {"type": "string"},
    },
}
VERSIONS_OPENAPI_SCHEMAS: dict[str, Any] = {
    "RegistryRecord": _RECORD,
    "RegistryListing": {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "versions": {"type": "object", "additionalProperties": _OBJECT},
        },
    },
    "RegistryVersion": {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "version": {"type": "string"},
            "record": {"oneOf": [_ref("RegistryRecord"), {"type": "null"}]},
            "summary": _OBJECT,
            "history": {"type": "array", "items": _OBJECT, "description": "events, oldest first"},
            "routes": _OBJECT,
        },
    },
    "RegisterRequest": {
        "type": "object",
        "required": ["record"],
        "properties": {
            "record": _ref("RegistryRecord"),
            "deployment": {
                "type": "object",
                "properties": {k: {"type": "string"} for k in ("backend", "url", "repository")},
            },
        },
    },
    "Registered": {
        "type": "object",
        "properties": {"created": {"type": "boolean"}, "record": _ref("RegistryRecord")},
    },
    "SchemaGate": {
        "type": "object",
        "properties": {
            "held": {"type": "object", "additionalProperties": {"type": "string"}},
            "recent": {"type": "array", "items": _OBJECT},
        },
    },
}
