"""The admin port: an aiohttp application over `gateway.admin.control_plane.ControlPlane`.

Every route, `/metrics` and `/openapi.json` included, needs a bearer token: the admin port can change
where production traffic goes, and even its read side names backends and versions. Only the dashboard's
static files are served without one (they hold no data). Tokens map to names and roles (read or
operate, `gateway.admin.auth`), and the name (never the secret) is who an action is recorded as in the
audit log.

The control plane's methods read small files and return at once, so handlers call them directly on
the event loop; only a reload waits, and it waits with asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.admin import dashboard, metrics
from gateway.admin.auth import ROLE, WHO, AdminToken, TokenCheck, auth_middleware
from gateway.admin.control_plane import ControlPlane, OverrideError
from gateway.admin.keys import add_key_routes
from gateway.admin.openapi import OPENAPI
from gateway.admin.rollouts import add_rollout_routes
from gateway.admin.shadow import add_shadow_routes
from gateway.admin.versions import add_version_routes
from gateway.store.base import Store

log = logging.getLogger("gateway.admin.app")

SAMPLE_EVERY = 1.0  # seconds; the control plane's live windows expect about one sample a second
MAX_AUDIT = 10_000
MAX_REASON = 1000
_SAMPLER = web.AppKey("sampler", asyncio.Task[None])
_dumps = functools.partial(json.dumps, default=str)  # metadata may hold values JSON lacks; show them


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status=status, headers=headers)


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON for every error, aiohttp's own 404/405/413 included; never a traceback to the caller."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {
            k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
        }
        if exc.status == 404:
            message = f"no such route: {request.method} {request.path}"
        elif exc.status == 405:
            message = (
                f"{request.method} is not allowed on {request.path}; allowed: {exc.headers.get('Allow', '')}"
            )
        else:
            message = exc.reason
        return _error(exc.status, message, headers)
    except Exception:
        log.exception("admin: %s %s failed", request.method, request.path)
        return _error(500, "internal error; the gateway's log has the details")


class AdminAPI:
    """The handlers; each one is a thin translation between HTTP and a ControlPlane method."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    async def routes(self, request: web.Request) -> web.Response:
        return _json(self.plane.routes_view())

    async def versions(self, request: web.Request) -> web.Response:
        return _json(self.plane.versions_view())

    async def reloads(self, request: web.Request) -> web.Response:
        return _json(self.plane.reloads_view())

    async def history(self, request: web.Request) -> web.Response:
        return _json(self.plane.history_view())

    async def backends(self, request: web.Request) -> web.Response:
        return _json(self.plane.backends_view())

    async def store(self, request: web.Request) -> web.Response:
        return _json(self.plane.store_view())

    async def audit(self, request: web.Request) -> web.Response:
        text = request.query.get("limit", "100")
        try:
            limit = int(text)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_AUDIT:
            return _error(400, f"limit must be a whole number from 1 to {MAX_AUDIT}, not {text!r}")
        return _json({"entries": self.plane.audit(limit)})

    async def status(self, request: web.Request) -> web.Response:
        return _json(status_view(self.plane))

    async def reload(self, request: web.Request) -> web.Response:
        outcome = await self.plane.reload(request[WHO])
        answered = outcome.get("workers", {})
        missing = sorted(str(w.pid) for w in self.plane.live_workers() if str(w.pid) not in answered)
        body = {**outcome, "missing": missing}
        refused = {pid: event for pid, event in answered.items() if not event.get("ok")}
        if refused:
            pid, event = next(iter(sorted(refused.items())))
            first = "; ".join(event.get("errors", [])[:3]) or "no reason given"
            body["error"] = f"worker {pid} refused the file, the last good table keeps serving: {first}"
            return _json(body, status=422)
        if missing:
            body["error"] = (
                f"worker(s) {', '.join(missing)} did not report a reload in time; see GET /api/reloads"
            )
            return _json(body, status=504)
        if not answered:
            body["error"] = "no live worker reported a reload; is the gateway serving?"
            return _json(body, status=504)
        return _json(body)

    async def set_weights(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        try:
            body = json.loads(await request.text())
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f'body must be JSON like {{"weights": {{"2.1.3": 50, ...}}}}: {exc}')
        if not isinstance(body, dict):
            return _error(400, 'body must be a JSON object with a "weights" object')
        unknown = sorted(set(body) - {"weights", "reason"})
        if unknown:
            return _error(400, f"unknown field(s) {', '.join(map(repr, unknown))}; expected weights, reason")
        weights, reason = body.get("weights"), body.get("reason", "")
        if not isinstance(weights, dict) or not weights:
            return _error(
                400, '"weights" must be an object of version or alias -> weight, e.g. {"2.1.3": 100}'
            )
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            return _error(400, f'"reason" must be a string of at most {MAX_REASON} characters')
        try:
            override = self.plane.set_override(model, weights, request[WHO], reason)
        except OverrideError as exc:
            return _error(400, str(exc))
        log.info("admin: %s set weights of %s to %s", request[WHO], model, override.get("weights"))
        return _json(override)

    async def clear_weights(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if not self.plane.clear_override(model, request[WHO]):
            return _error(404, f"model {model!r} has no weight override")
        log.info("admin: %s cleared the weight override of %s", request[WHO], model)
        return _json({"model": model, "cleared": True})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(self.plane), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(OPENAPI)

    async def whoami(self, request: web.Request) -> web.Response:
        """Who the token is and what it may do: the dashboard shows actions only to those who can act."""
        role = request[ROLE]
        return _json({"name": request[WHO], "role": role, "can_act": role == "operate"})


def status_view(plane: ControlPlane) -> dict[str, Any]:
    """Routes and versions joined per version, the shape `gateway status` prints."""
    routes = plane.routes_view()
    versions = plane.versions_view()["models"]
    workers = plane.workers()
    live = [w for w in workers if w.alive]
    models: dict[str, Any] = {}
    for name in sorted(set(routes["models"]) | set(versions)):
        route = routes["models"].get(name)
        split_file = route["split_in_file"] if route else {}
        split_live = route["split_live"] if route else None
        # The control plane marks workers that route differently with {"workers_disagree": {...}}.
        agrees = split_live is None or "workers_disagree" not in split_live
        entry: dict[str, Any] = {
            "override": route["override"] if route else None,
            "live_split_agrees": agrees,
            "versions": {},
        }
        for version in sorted(set(route["versions"] if route else ()) | set(versions.get(name, {}))):
            stats = versions.get(name, {}).get(version, {})
            entry["versions"][version] = {
                "weight_in_file": split_file.get(version, 0)
                if route and version in route["versions"]
                else None,
                "weight_live": split_live.get(version, 0) if split_live is not None and agrees else None,
                "rps": stats.get("rps", 0.0),
                "error_rate": stats.get("error_rate", 0.0),
                "latency_ms": stats.get("latency_ms", {"p50": None, "p95": None, "p99": None}),
                "in_flight": stats.get("in_flight", 0),
                "ready": stats.get("ready"),
                "not_ready_reason": stats.get("not_ready_reason", ""),
            }
        models[name] = entry
    served = set(routes["worker_revisions"].values())
    failing = [str(w.pid) for w in live if w.reloads and not w.reloads[-1].ok]
    return {
        "source": routes["source"],
        "revision": routes["revision"],
        "file_valid": routes["file_valid"],
        "consistent": routes["consistent"],
        "in_sync": bool(served) and routes["revision"] is not None and served <= {routes["revision"]},
        "worker_revisions": routes["worker_revisions"],
        "workers": {"alive": len(live), "gone": len(workers) - len(live)},
        "worker_restarts": plane.restarts_view(),
        "audit_write_failures": plane.audit_log.failures + sum(w.audit_failures for w in workers),
        "models": models,
        "last_reload_error": plane.reloads_view()["last_error"],
        "reload_failing": failing,
    }


async def _sample_forever(plane: ControlPlane) -> None:
    while True:
        try:
            plane.sample()
        except Exception:
            # A half-written or odd snapshot must not stop live stats for good.
            log.exception("admin: sampling worker snapshots failed")
        await asyncio.sleep(SAMPLE_EVERY)


def build_admin_app(
    plane: ControlPlane, tokens: Iterable[AdminToken] | Mapping[str, str], store: Store
) -> web.Application:
    """The admin application; `tokens` are AdminTokens, or a mapping of secret -> name (operate tokens)."""
    if isinstance(tokens, Mapping):
        tokens = [AdminToken(name, secret) for secret, name in tokens.items()]
    app = web.Application(middlewares=[_errors_middleware, auth_middleware(TokenCheck(tokens))])
    api = AdminAPI(plane)
    router = app.router
    for path, handler in (
        ("/api/routes", api.routes),
        ("/api/versions", api.versions),
        ("/api/history", api.history),
        ("/api/reloads", api.reloads),
        ("/api/backends", api.backends),
        ("/api/store", api.store),
        ("/api/audit", api.audit),
        ("/api/status", api.status),
        ("/metrics", api.metrics),
        ("/openapi.json", api.openapi),
        ("/api/whoami", api.whoami),
    ):
        router.add_get(path, handler, allow_head=False)
    router.add_post("/api/reload", api.reload)
    router.add_put("/api/models/{model}/weights", api.set_weights)
    router.add_delete("/api/models/{model}/weights", api.clear_weights)
    add_key_routes(app, store, plane.audit_log)
    add_rollout_routes(app, plane, store)
    add_version_routes(app, plane, store)
    add_shadow_routes(app, plane)
    dashboard.add_dashboard_routes(app)

    async def start_sampling(app: web.Application) -> None:
        app[_SAMPLER] = asyncio.create_task(_sample_forever(plane), name="admin-sampler")

    async def stop_sampling(app: web.Application) -> None:
        task = app[_SAMPLER]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.on_startup.append(start_sampling)
    app.on_cleanup.append(stop_sampling)
    return app
