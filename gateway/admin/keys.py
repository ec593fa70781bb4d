"""The admin API for API keys: create (and rotate), list, show, update, revoke.

Mounted on the admin application (`add_key_routes`), behind its token middleware; the token's name is
who each action is audited as. A key's secret exists in exactly one place after creation: the one
201 answer that returns it. The store gets its SHA-256 only, and the audit log, the server log and every
other answer name keys by their name alone.

The store's `put_key` / `delete_key` tell every gateway process about the change, so a revoked,
disabled or rotated key stops working everywhere within about a second
(`gateway.access.key_cache.KeyCache`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from gateway.access import keys
from gateway.admin.auth import WHO
from gateway.routing.table import Limit
from gateway.state.files import AuditLog
from gateway.store.base import KeyRecord, Store, StoreUnavailable

log = logging.getLogger("gateway.admin.app")

_CREATE_FIELDS = ("name", "models", "rate", "burst", "model_limits", "expires_in", "replace")
_UPDATE_FIELDS = ("disabled", "models", "rate", "burst", "model_limits", "expires_in")
SHOWN_ONCE = "this secret is shown only now; the gateway keeps only its hash and cannot show it again"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


def limits_view(limits: Mapping[str, Limit]) -> dict[str, dict[str, Any]]:
    return {model: {"rate": limit.rate, "burst": limit.burst} for model, limit in limits.items()}


def key_view(record: KeyRecord, now: float) -> dict[str, Any]:
    """A key as the API shows it: everything but the hash (and, of course, the secret)."""
    return {
        "name": record.name,
        "models": list(record.models),
        "rate": record.rate,
        "burst": record.burst,
        "model_limits": limits_view(record.model_limits),
        "expires_at": record.expires_at,
        "expired": record.expires_at is not None and now >= record.expires_at,
        "disabled": record.disabled,
        "created_at": record.created_at,
        "created_by": record.created_by,
    }


async def _body(request: web.Request, allowed: tuple[str, ...], example: str) -> dict[str, Any]:
    try:
        body = json.loads(await request.text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise keys.KeySettingError(f"body must be JSON like {example}: {exc}") from None
    if not isinstance(body, dict):
        raise keys.KeySettingError(f"body must be a JSON object like {example}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise keys.KeySettingError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(allowed)}"
        )
    return body


def _translated(handler: Handler) -> Handler:
    """Refusals become 400 and an unreachable store 503, both as {"error": ...}."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except keys.KeySettingError as exc:
            return _error(400, str(exc))
        except StoreUnavailable:
            # Not the exception's text: it may carry the store's URL, and with it a password.
            log.warning("admin: the key store is unavailable for %s %s", request.method, request.path)
            return _error(503, "the key store is unavailable; try again when it is back")

    return wrapped


# -- the handlers --------------------------------------------------------------------------------


class KeysAPI:
    def __init__(self, store: Store, audit_log: AuditLog, who: Callable[[web.Request], str]) -> None:
        self.store = store
        self.audit_log = audit_log
        self.who = who
        # Changes are read-modify-write on the store; one at a time in this process, so two operators
        # creating the same name here cannot both succeed. (Across machines the store would need a
        # create-if-absent operation for that.)
        self._lock = asyncio.Lock()

    async def _find(self, name: str) -> KeyRecord | None:
        # The store indexes keys by hash; by name there is only the list, which admin traffic can afford.
        return next((k for k in await self.store.list_keys() if k.name == name), None)

    def _audit(self, request: web.Request, action: str, details: dict[str, Any]) -> None:
        self.audit_log.append(self.who(request), action, details)

    async def create(self, request: web.Request) -> web.Response:
        now = time.time()
        body = await _body(request, _CREATE_FIELDS, '{"name": "team-a", "models": ["m"], "rate": "100/s"}')
        if "name" not in body:
            raise keys.KeySettingError('"name" is required')
        name = keys.key_name(body["name"])
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            raise keys.KeySettingError(f'"replace" must be true or false, not {replace!r}')
        changes = keys.key_settings(body, now)
        secret = keys.new_secret()
        who = self.who(request)
        async with self._lock:
            old = await self._find(name)
            if old is not None and not replace:
                return _error(
                    409, f'an API key named {name!r} exists; send "replace": true to give it a new secret'
                )
            # Rotating keeps what the body leaves out: a rotation must never widen a key by accident.
            base = old if old is not None else KeyRecord(name=name, secret_hash="")
            record = dataclasses.replace(
                base, **changes, secret_hash=keys.hash_secret(secret), created_at=now, created_by=who
            )
            keys.check_record(record)
            await self.store.put_key(record)
        view = key_view(record, now)
        action = "keys.rotate" if old is not None else "keys.create"
        self._audit(request, action, {k: v for k, v in view.items() if k not in ("created_by", "expired")})
        log.info("admin: %s %s API key %s", who, "rotated" if old else "created", name)
        answer = {**view, "secret": secret, "replaced": old is not None, "warning": SHOWN_ONCE}
        # no-store: caches and proxies between operator and gateway must not keep a copy of the secret.
        return _json(answer, status=201, headers={"Cache-Control": "no-store"})

    async def list_keys(self, request: web.Request) -> web.Response:
        now = time.time()
        return _json({"keys": [key_view(k, now) for k in await self.store.list_keys()]})

    async def show(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        record = await self._find(name)
        if record is None:
            return _error(404, f"no API key named {name!r}")
        return _json(key_view(record, time.time()))

    async def update(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        now = time.time()
        body = await _body(request, _UPDATE_FIELDS, '{"disabled": true}')
        changes = keys.key_settings(body, now)
        if not changes:
            raise keys.KeySettingError(f"nothing to change; send one or more of {', '.join(_UPDATE_FIELDS)}")
        async with self._lock:
            old = await self._find(name)
            if old is None:
                return _error(404, f"no API key named {name!r}")
            record = dataclasses.replace(old, **changes)
            keys.check_record(record)
            await self.store.put_key(record)
        if set(changes) == {"disabled"}:
            action = "keys.disable" if record.disabled else "keys.enable"
            self._audit(request, action, {"name": name})
        else:
            shown = {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}
            if "model_limits" in changes:
                shown["model_limits"] = limits_view(changes["model_limits"])
            self._audit(request, "keys.update", {"name": name, "changes": shown})
        log.info("admin: %s changed API key %s: %s", self.who(request), name, ", ".join(sorted(changes)))
        return _json(key_view(record, now))

    async def revoke(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        async with self._lock:
            removed = await self.store.delete_key(name)
        if removed is None:
            return _error(404, f"no API key named {name!r}")
        self._audit(request, "keys.revoke", {"name": name})
        log.info("admin: %s revoked API key %s", self.who(request), name)
        return _json({"name": name, "revoked": True})


def add_key_routes(app: web.Application, store: Store, audit_log: AuditLog) -> None:
    """Serve /api/keys on an admin application built by `gateway.admin.app.build_admin_app`."""

    def who(request: web.Request) -> str:
        return str(request[WHO])

    api = KeysAPI(store, audit_log, who)
    router = app.router
    router.add_get("/api/keys", _translated(api.list_keys), allow_head=False)
    router.add_post("/api/keys", _translated(api.create))
    router.add_get("/api/keys/{name}", _translated(api.show), allow_head=False)
    router.add_patch("/api/keys/{name}", _translated(api.update))
    router.add_delete("/api/keys/{name}", _translated(api.revoke))


# -- OpenAPI ---------------------------------------------------------------------------------------


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _answer(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("schemas", schema)}}}


_ERRORS = {
    "400": _ref("responses", "BadRequest"),
    "401": _ref("responses", "Unauthorized"),
    "404": _ref("responses", "NotFound"),
    "409": _answer("Error", 'A key of that name exists and "replace" was not true'),
    "500": _ref("responses", "InternalError"),
    "503": _answer("Error", "The key store is unavailable"),
}


def _operation(
    operation_id: str, summary: str, ok: tuple[str, str, str], errors: str, body: str = ""
) -> dict[str, Any]:
    """One operation: `ok` is (status, schema, description), `errors` the other statuses it answers."""
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary}
    if body:
        schema = {"schema": _ref("schemas", body)}
        operation["requestBody"] = {"required": True, "content": {"application/json": schema}}
    responses = {ok[0]: _answer(ok[1], ok[2])} | {status: _ERRORS[status] for status in errors.split()}
    return {**operation, "responses": responses}


_NAME_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}
_SETTINGS = {
    "models": {
        "type": ["array", "null"],
        "items": {"type": "string"},
        "description": "Models the key may call; empty or null: all. Other models answer 403.",
    },
    "rate": {
        "type": ["string", "null"],
        "examples": ["100/s", "600/m"],
        "description": "The key's own limit; null: keys.default_limit applies.",
    },
    "burst": {"type": ["integer", "null"], "minimum": 1, "description": "Needs rate."},
    "model_limits": {
        "type": ["object", "null"],
        "description": "Limits of this key on single models, each on top of its own limit; the whole set "
        "is replaced; null or {}: none. A model named must be among the key's models, if it has any.",
        "additionalProperties": {
            "type": "object",
            "required": ["rate"],
            "properties": {
                "rate": {
                    "type": ["string", "number"],
                    "examples": ["100/s", 1.5],
                    "description": "like the key's rate, or a number of requests per second",
                },
                "burst": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "default: the rate per second, rounded up (at least 1)",
                },
            },
            "additionalProperties": False,
        },
        "examples": [{"fraud-detector": {"rate": "100/s", "burst": 200}}],
    },
    "expires_in": {
        "type": ["string", "number", "null"],
        "examples": ["30d", "12h", 3600],
        "description": "From now; a number is seconds; null: never expires.",
    },
}

KEYS_OPENAPI_SCHEMAS: dict[str, Any] = {
    "Key": {
        "type": "object",
        "description": "An API key, without its secret or the secret's hash.",
        "properties": {
            "name": {"type": "string"},
            "models": {"type": "array", "items": {"type": "string"}, "description": "empty: all models"},
            "rate": {"type": ["number", "null"], "description": "requests per second; null: the default"},
            "burst": {"type": ["integer", "null"]},
            "model_limits": {
                "type": "object",
                "description": "model -> its limit for this key; empty: none",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "rate": {"type": "number", "description": "requests per second"},
                        "burst": {"type": "integer"},
                    },
                },
            },
            "expires_at": {"type": ["number", "null"], "description": "Unix time; null: never"},
            "expired": {"type": "boolean"},
            "disabled": {"type": "boolean"},
            "created_at": {"type": "number", "description": "Unix time this secret was made"},
            "created_by": {"type": "string", "description": "the admin token's name"},
        },
    },
    "KeyCreated": {
        "allOf": [
            _ref("schemas", "Key"),
            {
                "type": "object",
                "properties": {
                    "secret": {"type": "string", "description": "Shown in this answer only, never again."},
                    "replaced": {"type": "boolean", "description": "An existing key got a new secret."},
                    "warning": {"type": "string"},
                },
            },
        ]
    },
    "KeyList": {"type": "object", "properties": {"keys": {"type": "array", "items": _ref("schemas", "Key")}}},
    "KeyCreateRequest": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": _NAME_SCHEMA,
            **_SETTINGS,
            "replace": {
                "type": "boolean",
                "default": False,
                "description": "Rotate: a new secret for an existing key; fields left out keep their values.",
            },
        },
        "additionalProperties": False,
    },
    "KeyUpdateRequest": {
        "type": "object",
        "minProperties": 1,
        "properties": {"disabled": {"type": "boolean"}, **_SETTINGS},
        "additionalProperties": False,
    },
    "KeyRevoked": {"type": "object", "properties": {"name": {"type": "string"}, "revoked": {"const": True}}},
}

KEYS_OPENAPI_PATHS: dict[str, Any] = {
    "/api/keys": {
        "get": _operation(
            "listKeys",
            "API keys, by name (never secrets or hashes)",
            ("200", "KeyList", "Every key"),
            "401 500 503",
        ),
        "post": _operation(
            "createKey",
            "Create an API key, or rotate one's secret; the answer holds the secret, once",
            ("201", "KeyCreated", "The key and its secret, shown only in this answer"),
            "400 401 409 500 503",
            body="KeyCreateRequest",
        ),
    },
    "/api/keys/{name}": {
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": _NAME_SCHEMA}],
        "get": _operation("getKey", "One API key", ("200", "Key", "The key"), "401 404 500 503"),
        "patch": _operation(
            "updateKey",
            "Disable, enable or change an API key's models, limits or expiry (the secret stays)",
            ("200", "Key", "The key as changed"),
            "400 401 404 500 503",
            body="KeyUpdateRequest",
        ),
        "delete": _operation(
            "revokeKey",
            "Revoke an API key: it stops working on every gateway process within a second",
            ("200", "KeyRevoked", "The key is gone"),
            "401 404 500 503",
        ),
    },
}
