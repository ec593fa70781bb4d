"""The OpenAPI 3.1 document of the admin API, served at `GET /openapi.json`.

Kept as a plain constant next to the handlers in `gateway.admin.app`; a test compares its paths and methods
with the routes the application registers, so the two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.admin.keys import KEYS_OPENAPI_PATHS, KEYS_OPENAPI_SCHEMAS
from gateway.admin.shadow import SHADOW_OPENAPI_PATHS, SHADOW_OPENAPI_SCHEMAS
from gateway.admin.versions import VERSIONS_OPENAPI_PATHS, VERSIONS_OPENAPI_SCHEMAS


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: {"$ref": f"#/components/responses/{_ERROR_NAMES[status]}"} for status in statuses}


_ERROR_NAMES = {
    "400": "BadRequest",
    "401": "Unauthorized",
    "403": "Forbidden",
    "404": "NotFound",
    "500": "InternalError",
}


def _read(operation_id: str, summary: str, schema: str, description: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "responses": {"200": _json(schema, description), **_errors("401", "500")},
        }
    }


def _page(operation_id: str, summary: str) -> dict[str, Any]:
    """A dashboard file: public (it holds no data), so no security requirement and no 401."""
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "security": [],
            "responses": {"200": {"description": "The file"}, **_errors("404")},
        }
    }


_OBJECT = {"type": "object"}
_NULLABLE_STRING = {"type": ["string", "null"]}
_LATENCY = {
    "type": "object",
    "description": "Latency quantiles in milliseconds over the window; null without requests.",
    "properties": {q: {"type": ["number", "null"]} for q in ("p50", "p95", "p99")},
}
_READY = {
    "type": ["boolean", "null"],
    "description": "Every live worker sees it ready; null if none checked.",
}

_SCHEMAS: dict[str, Any] = {
    "History": {
        "type": "object",
        "properties": {
            "window_seconds": {"type": "number", "description": "What each point covers"},
            "models": {
                "type": "object",
                "description": "model -> version -> [{t (Unix time), rps, error_rate, p50, p95, p99 (ms)}]",
            },
        },
    },
    "WhoAmI": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "The token's name, as the audit log records it"},
            "role": {"enum": ["read", "operate"]},
            "can_act": {"type": "boolean", "description": "Whether actions (any method but GET) are allowed"},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What went wrong, in words."}},
    },
    "ReloadEvent": {
        "type": "object",
        "properties": {
            "time": {"type": "number", "description": "Unix time"},
            "ok": {"type": "boolean"},
            "revision": _NULLABLE_STRING,
            "trigger": {"enum": ["start", "file", "signal", "admin"]},
            "errors": {
                "type": "array",
                "items": {"type": "string"},
                "description": "file:line:column: message",
            },
            "duration_ms": {"type": "number"},
            "pid": {"type": "integer"},
        },
    },
    "RoutesView": {
        "type": "object",
        "description": "The routing table in the file now, and what each live worker serves.",
        "properties": {
            "source": {"type": "string"},
            "file_valid": {"type": "boolean"},
            "revision": _NULLABLE_STRING,
            "worker_revisions": {"type": "object", "additionalProperties": {"type": "string"}},
            "consistent": {"type": "boolean", "description": "Every live worker serves the same revision."},
            "backends": {"type": "object", "additionalProperties": _OBJECT},
            "models": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "versions": {"type": "object", "additionalProperties": _OBJECT},
                        "aliases": {"type": "object", "additionalProperties": {"type": "string"}},
                        "split_in_file": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "split_live": {"type": ["object", "null"]},
                        "override": {"oneOf": [{"$ref": "#/components/schemas/Override"}, {"type": "null"}]},
                        "sticky_header": _NULLABLE_STRING,
                        "mirror": {"type": ["object", "null"]},
                    },
                },
            },
        },
    },
    "VersionsView": {
        "type": "object",
        "properties": {
            "models": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "window_seconds": {"type": "number"},
                            "requests": {"type": "integer"},
                            "rps": {"type": "number"},
                            "error_rate": {
                                "type": "number",
                                "description": "5xx, timeouts, broken connections",
                            },
                            "latency_ms": _LATENCY,
                            "in_flight": {"type": "integer"},
                            "total": _OBJECT,
                            "ready": _READY,
                            "not_ready_reason": {"type": "string"},
                        },
                    },
                },
            }
        },
    },
    "ReloadsView": {
        "type": "object",
        "properties": {
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/ReloadEvent"}},
            "last_error": {"oneOf": [{"$ref": "#/components/schemas/ReloadEvent"}, {"type": "null"}]},
        },
    },
    "RolloutsView": {
        "type": "object",
        "description": "rollouts: per model, its baseline, canary, steps, the stored record (state, weights, "
        "history of decisions with their evidence) and whether the live weights differ from the file; "
        "record_error says why, when the stored record is unreadable (record is then null).",
        "properties": {"rollouts": {"type": "object"}},
    },
    "Accepted": {"type": "object", "properties": {"accepted": {"type": "boolean"}}},
    "StoreView": {
        "type": "object",
        "description": "Per worker pid: store_url (password hidden), store_up, on_error, live_processes, "
        "store_errors, fail_open and fail_closed counts.",
        "additionalProperties": {"type": "object"},
    },
    "BackendsView": {
        "type": "object",
        "description": "Per worker pid: whether it is alive and what its health checks see.",
        "additionalProperties": {
            "type": "object",
            "properties": {
                "alive": {"type": "boolean"},
                "backends": {"type": "object", "additionalProperties": _OBJECT},
                "versions": {"type": "object", "additionalProperties": _OBJECT},
            },
        },
    },
    "Audit": {
        "type": "object",
        "properties": {
            "entries": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["time", "who", "action"],
                    "properties": {
                        "time": {"type": "number"},
                        "who": {"type": "string", "description": "the name of the admin token used"},
                        "action": {
                            "type": "string",
                            "examples": ["reload", "override.set", "override.clear"],
                        },
                    },
                    "additionalProperties": True,
                },
            }
        },
    },
    "Status": {
        "type": "object",
        "description": "A compact overview for `gateway status`.",
        "properties": {
            "revision": _NULLABLE_STRING,
            "file_valid": {"type": "boolean"},
            "consistent": {"type": "boolean"},
            "in_sync": {"type": "boolean", "description": "Every live worker serves the file's revision."},
            "worker_revisions": {"type": "object", "additionalProperties": {"type": "string"}},
            "workers": {
                "type": "object",
                "properties": {"alive": {"type": "integer"}, "gone": {"type": "integer"}},
            },
            "worker_restarts": {
                "type": "object",
                "description": "Dead workers the supervisor started again (after a delay that doubles, "
                "0.5 s to 30 s, while one keeps dying); the latest first.",
                "properties": {"total": {"type": "integer"}, "recent": {"type": "array"}},
            },
            "audit_write_failures": {"type": "integer", "description": "Audit lines that were lost."},
            "models": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "override": {"type": ["object", "null"]},
                        "live_split_agrees": {"type": "boolean"},
                        "versions": {
                            "type": "object",
                            "additionalProperties": {
                                "type": "object",
                                "properties": {
                                    "weight_in_file": {"type": ["integer", "null"]},
                                    "weight_live": {"type": ["integer", "null"]},
                                    "rps": {"type": "number"},
                                    "error_rate": {"type": "number"},
                                    "latency_ms": _LATENCY,
                                    "in_flight": {"type": "integer"},
                                    "ready": _READY,
                                    "not_ready_reason": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
            "last_reload_error": {"oneOf": [{"$ref": "#/components/schemas/ReloadEvent"}, {"type": "null"}]},
            "reload_failing": {
                "type": "array",
                "items": {"type": "string"},
                "description": "pids of live workers whose latest reload was refused",
            },
        },
    },
    "ReloadOutcome": {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "workers": {
                "type": "object",
                "additionalProperties": {"$ref": "#/components/schemas/ReloadEvent"},
            },
            "missing": {
                "type": "array",
                "items": {"type": "string"},
                "description": "live pids that did not report",
            },
            "error": {"type": "string"},
        },
    },
    "WeightsRequest": {
        "type": "object",
        "required": ["weights"],
        "properties": {
            "weights": {
                "type": "object",
                "description": "version id or alias -> whole-number weight; the weights add up to 100",
                "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100},
                "examples": [{"2.1.3": 50, "2.2.0": 50}],
            },
            "reason": {"type": "string", "maxLength": 1000},
        },
        "additionalProperties": False,
    },
    "Override": {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "weights": {"type": "object", "additionalProperties": {"type": "integer"}},
            "model_digest": {"type": "string", "description": "the model's spec when set; a change ends it"},
            "set_by": {"type": "string"},
            "set_at": {"type": "number"},
            "reason": {"type": "string"},
            "active": {"type": "boolean"},
        },
    },
    "Cleared": {"type": "object", "properties": {"model": {"type": "string"}, "cleared": {"const": True}}},
}

_MODEL_PARAMETER = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Model gateway admin API",
        "version": __version__,
        "description": "Read and steer a running gateway. Every route needs `Authorization: Bearer <token>` "
        "(GATEWAY_ADMIN_TOKEN, or the generated `<state dir>/admin-token`); every action is audited "
        "under the token's name. A token with the `read` role may call every GET and is refused every "
        "other method with 403; `operate` (the default) may call all. The dashboard's static files "
        "(`/`, `/static/{name}`) need no token.",
    },
    "security": [{"bearerAuth": []}],
    "paths": {
        "/api/routes": _read("getRoutes", "Routing table, revision, overrides", "RoutesView", "The table"),
        "/api/versions": _read("getVersions", "Versions with live stats", "VersionsView", "Per version"),
        "/api/history": _read(
            "getHistory",
            "Per version, points over the last 5 minutes (rps, error rate, p50/p95/p99 over 10 s each)",
            "History",
            "Per model and version, oldest first",
        ),
        "/api/reloads": _read("getReloads", "Reload history with errors", "ReloadsView", "Newest first"),
        "/api/backends": _read("getBackends", "Backend and version health", "BackendsView", "Per worker"),
        "/api/rollouts": _read(
            "getRollouts",
            "Rollouts: state, weights, and the evidence behind every decision",
            "RolloutsView",
            "Per model with a rollout",
        ),
        "/api/rollouts/{model}/{action}": {
            "post": {
                "operationId": "actOnRollout",
                "summary": "Pause, resume, promote now or roll back now; applied within a second",
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": ["pause", "resume", "promote", "rollback"]},
                    },
                ],
                "responses": {
                    "202": _json("Accepted", "The command is queued for the running rollout it names"),
                    "409": {"description": "No rollout of the model is running (not started, or ended)"},
                    **_errors("401", "404", "500"),
                },
            }
        },
        "/api/store": _read(
            "getStore",
            "Store health per worker",
            "StoreView",
            "URL (password hidden), reachability, fallbacks",
        ),
        "/api/status": _read("getStatus", "Overview for the CLI", "Status", "Routes and versions together"),
        "/api/audit": {
            "get": {
                "operationId": "getAudit",
                "summary": "Audit log of operator actions, oldest first",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100},
                    }
                ],
                "responses": {"200": _json("Audit", "The latest entries"), **_errors("400", "401", "500")},
            }
        },
        "/api/reload": {
            "post": {
                "operationId": "reload",
                "summary": "Make every worker reload routes.yaml now",
                "responses": {
                    "200": _json("ReloadOutcome", "Every live worker loaded the file"),
                    "422": _json("ReloadOutcome", "A worker refused the file; the last good table serves"),
                    "504": _json("ReloadOutcome", "A live worker did not report within a few seconds"),
                    **_errors("401", "500"),
                },
            }
        },
        "/api/models/{model}/weights": {
            "parameters": [_MODEL_PARAMETER],
            "put": {
                "operationId": "setWeights",
                "summary": "Override a model's split until the file changes that model or it is cleared",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/WeightsRequest"}}
                    },
                },
                "responses": {
                    "200": _json("Override", "The override now set"),
                    **_errors("400", "401", "500"),
                },
            },
            "delete": {
                "operationId": "clearWeights",
                "summary": "Clear a model's weight override",
                "responses": {
                    "200": _json("Cleared", "The override is gone"),
                    **_errors("401", "404", "500"),
                },
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics, summed over all workers",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
                    },
                    **_errors("401", "500"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": _OBJECT}},
                    },
                    **_errors("401"),
                },
            }
        },
        "/api/whoami": _read("whoami", "The calling token's name and role", "WhoAmI", "Name and role"),
        "/": _page("dashboard", "The dashboard page"),
        "/index.html": _page("dashboardIndex", "The dashboard page (same as /)"),
        "/static/{name}": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            **_page("dashboardAsset", "A script or style sheet of the dashboard"),
        },
        **KEYS_OPENAPI_PATHS,
        **VERSIONS_OPENAPI_PATHS,
        **SHADOW_OPENAPI_PATHS,
    },
    "components": {
        "securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An admin token"}
        },
        "responses": {
            "BadRequest": _json("Error", "The request is malformed or the action was refused (see error)"),
            "Unauthorized": {
                **_json("Error", "No token, or not a configured one"),
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
            },
            "NotFound": _json("Error", "Nothing there"),
            "Forbidden": _json("Error", "A read token asked for an action; it needs the operate role"),
            "InternalError": _json("Error", "The gateway failed; the details are in its log"),
        },
        "schemas": {**_SCHEMAS, **KEYS_OPENAPI_SCHEMAS, **VERSIONS_OPENAPI_SCHEMAS, **SHADOW_OPENAPI_SCHEMAS},
    },
}

# Every action answers 403 to a read token (gateway.admin.auth): said once here, not in each operation.
for _item in OPENAPI["paths"].values():
    for _method, _operation in _item.items():
        if _method in ("put", "post", "patch", "delete"):
            _operation["responses"].update(_errors("403"))
