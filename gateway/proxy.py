"""The data plane's handler: route an inference request to a version and relay the backend's answer.

Bodies are never decoded: the request body goes upstream as the chunks it arrived in, the response body
comes back as the chunks the backend sent, so JSON and binary tensors pass through untouched. Only the
path changes (the public model and version become Triton's model name and number) and the headers that
belong to one hop are dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from gateway import control, keys
from gateway.admission import ADMITTED, Admission, Decision
from gateway.http_server import ClientConnection, Headers, Request
from gateway.routing import Endpoint, Router, Target, effective_split, parse_path
from gateway.stats import Outcome, Stats, VersionCounters, outcome_of
from gateway.table import Model, RouteTable, Version
from gateway.upstream import Failure, Pool, UpstreamConnection

log = logging.getLogger("gateway.proxy")

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade")
)
# Rebuilt by the gateway, or secrets the backend has no business seeing.
_DROP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-request-id",
    b"x-model-version",
    b"authorization",
    b"x-api-key",
    b"proxy-authorization",
}
_DROP_RESPONSE = HOP_BY_HOP | {b"content-length", b"x-model-version", b"x-request-id", b"proxy-authenticate"}
_JSON = (b"content-type", b"application/json")
_BEARER = [(b"www-authenticate", b"Bearer")]
MAX_REQUEST_ID = 200
PATH_CACHE_SIZE = 4096
MAX_MIRRORS_IN_FLIGHT = 128  # shadow copies beyond this are skipped: a slow mirror must not pile up

# Generated request ids: a random per-process prefix and a counter, unique across processes and far
# cheaper than a random number per request. They identify requests; they are not secrets.
_ID_PREFIX = os.urandom(6).hex().encode()
_id_counter = itertools.count(1)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def request_id_of(request: Request) -> bytes:
    """The caller's X-Request-Id when it is a sane token, else a new unique one."""
    given = request.header(b"x-request-id")
    if given is not None and 0 < len(given) <= MAX_REQUEST_ID and all(33 <= byte <= 126 for byte in given):
        return given
    return b"%s-%x" % (_ID_PREFIX, next(_id_counter))


class _VersionRoute:
    """What the proxy needs to reach one version, precomputed as bytes when the table is loaded."""

    __slots__ = ("counters", "host", "id", "path", "pool", "version")

    def __init__(self, version: Version, pool: Pool, counters: VersionCounters) -> None:
        self.version = version
        self.pool = pool
        self.counters = counters
        self.id = version.id.encode()
        backend = pool.backend
        self.host = f"{backend.host}:{backend.port}".encode()
        self.path = (control.triton_model_path(version) + "/infer").encode()


class Gateway:
    """Routes and forwards requests for one routing table at a time."""

    def __init__(
        self, table: RouteTable, loop: asyncio.AbstractEventLoop, stats: Stats | None = None
    ) -> None:
        self.loop = loop
        self.stats = stats or Stats()
        self.overrides: Mapping[str, tuple[tuple[str, int], ...]] = {}
        self.unready: Mapping[tuple[str, str], str] = {}  # (model, version) -> why it gets no traffic
        self.control = control.Control()
        self._pools: dict[str, Pool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.table = table
        self.router = Router(table)
        self._routes: dict[tuple[str, str], _VersionRoute] = {}
        self._targets: dict[str, Target | None] = {}  # parsed paths; clients reuse a handful of them
        self.admission: Admission | None = None  # set by the worker once the store is open
        self.mirrors_in_flight = 0
        self.mirrors_skipped = 0
        self.set_table(table)

    def set_table(self, table: RouteTable) -> None:
        """Serve a new table; requests in flight finish with the pools they started on."""
        pools = {}
        for name, backend in table.backends.items():
            pool = self._pools.get(name)
            pools[name] = pool if pool is not None and pool.backend == backend else Pool(backend, self.loop)
        for name, pool in self._pools.items():
            if pools.get(name) is not pool:
                pool.close()
        self._pools = pools
        self._routes = {
            (model.name, version.id): _VersionRoute(
                version, pools[version.backend], self.stats.counters(model.name, version.id)
            )
            for model in table.models.values()
            for version in model.versions.values()
        }
        self.table = table
        self.refresh_routing()

    def refresh_routing(
        self,
        overrides: Mapping[str, tuple[tuple[str, int], ...]] | None = None,
        unready: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        """Rebuild the router from the table, operators' overrides and backend readiness."""
        if overrides is not None:
            self.overrides = overrides
        if unready is not None:
            self.unready = unready
        weights = {}
        for name, model in self.table.models.items():
            down = frozenset(version for (m, version) in self.unready if m == name)
            weights[name] = effective_split(model, self.overrides.get(name), down)
        self.router = Router(self.table, weights)

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        await self.control.close()

    # -- the request path --------------------------------------------------------------------------

    def handle(self, request: Request, conn: ClientConnection) -> None:
        try:
            target = self._targets[request.path]
        except KeyError:
            target = parse_path(request.path)
            if len(self._targets) >= PATH_CACHE_SIZE:
                self._targets.clear()  # endless distinct paths get no cache, nothing worse
            self._targets[request.path] = target
        if target is None:
            self.reject(conn, 404, f"no such endpoint: {request.path}")
            return
        if target.endpoint is not Endpoint.INFER:
            if request.method not in ("GET", "HEAD"):
                self.reject(conn, 405, f"{request.path} accepts GET, not {request.method}")
                return
            self._spawn(self._serve_control(request, conn, target.endpoint, target.model, target.version))
            return
        if request.method != "POST":
            self.reject(conn, 405, f"inference takes POST, not {request.method}")
            return
        table = self.table
        if table.keys.required and not (request.header(b"authorization") or request.header(b"x-api-key")):
            # Before the model lookup, so callers without a key cannot probe which models exist.
            self.reject(conn, 401, keys.KEY_REQUIRED.message, _BEARER)
            return
        model = table.models.get(target.model)
        if model is None:
            self.reject(conn, 404, self._unknown_model(target.model))
            return
        if self.admission is not None and self.admission.needed(table, model):

            def admitted(decision: Decision) -> None:
                if not conn.closed:
                    self._forward(request, conn, model, target.version, decision)

            self.admission.admit(table, model, request, admitted)
            return
        self._forward(request, conn, model, target.version, ADMITTED)

    def _forward(
        self, request: Request, conn: ClientConnection, model: Model, path_pin: str, decision: Decision
    ) -> None:
        """Route an admitted request to a version and send it on its way."""
        if decision.status:
            extra = decision.headers + (_BEARER if decision.status == 401 else [])
            self.reject(conn, decision.status, decision.message, extra)
            return
        pin = path_pin or (request.header(b"x-model-version") or b"").decode("latin-1")
        version = self._pick(model, pin, request)
        if version is None:
            if pin:
                versions = ", ".join(model.versions)
                self.reject(
                    conn, 404, f"model {model.name} has no version or alias {pin!r}; versions: {versions}"
                )
            else:
                reasons = "; ".join(
                    f"{version} is not ready: {why}"
                    for (m, version), why in self.unready.items()
                    if m == model.name
                )
                message = f"no version of model {model.name} is taking traffic"
                self.reject(conn, 503, f"{message} ({reasons})" if reasons else message)
            return
        if self.unready and (model.name, version.id) in self.unready:
            why = self.unready[(model.name, version.id)]
            self.reject(conn, 503, f"version {version.id} of {model.name} is not ready: {why}")
            return
        route = self._routes[(model.name, version.id)]
        exchange = ProxyExchange(self, conn, route, request_id_of(request), decision.headers)
        exchange.start(self._upstream_request(request, route, exchange.request_id))
        if model.mirror is not None:
            shadow = self.router.mirror_to(model, version)
            if shadow is not None:
                self._mirror(request, self._routes[(model.name, shadow.id)], exchange.request_id)

    def _mirror(self, request: Request, route: _VersionRoute, request_id: bytes) -> None:
        """Send a shadow copy; its answer is read and dropped, and it never delays the real one."""
        if self.mirrors_in_flight >= MAX_MIRRORS_IN_FLIGHT:
            self.mirrors_skipped += 1
            return
        payload = self._upstream_request(request, route, request_id, shadow=True)
        self.mirrors_in_flight += 1
        shadow = ShadowExchange(self)

        def connected(upstream: UpstreamConnection | None, why: str) -> None:
            if upstream is None:
                shadow.upstream_failed(Failure.CONNECT, why)
            else:
                upstream.send(payload, shadow)

        route.pool.acquire(connected)

    def _pick(self, model: Model, pin: str, request: Request) -> Version | None:
        if pin:
            return model.resolve(pin)
        sticky = request.header(model.sticky_header.encode()) if model.sticky_header else None
        return self.router.choose(model, sticky)

    def _upstream_request(
        self, request: Request, route: _VersionRoute, request_id: bytes, shadow: bool = False
    ) -> list[bytes]:
        path = route.path if not request.query else route.path + b"?" + request.query.encode("latin-1")
        head = [b"POST ", path, b" HTTP/1.1\r\nhost: ", route.host, b"\r\n"]
        forwarded_for = None
        drop = _DROP_REQUEST
        connection = b",".join(value for name, value in request.headers if name == b"connection") or None
        if connection is not None and connection.lower() not in (b"close", b"keep-alive"):
            # Headers named in Connection are hop-by-hop too (RFC 9110 section 7.6.1).
            drop = drop | {token.strip().lower() for token in connection.split(b",")}
        for name, value in request.headers:
            if name in drop:
                if name == b"x-forwarded-for":
                    forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
                continue
            head += (name, b": ", value, b"\r\n")
        client = request.client.encode()
        head += (
            b"x-forwarded-for: ",
            forwarded_for + b", " + client if forwarded_for else client,
            b"\r\nx-request-id: ",
            request_id,
            b"\r\nx-gateway-shadow: 1" if shadow else b"",
            b"\r\ncontent-length: %d\r\n\r\n" % request.body_size,
        )
        return [b"".join(head), *request.body]

    def reject(self, conn: ClientConnection, status: int, message: str, extra: Headers | None = None) -> None:
        """Answer a request the gateway itself refuses (no version involved), and count it."""
        self.stats.unrouted[min(status // 100, 5) - 1] += 1
        self.respond_error(conn, status, message, extra)

    def respond_error(
        self, conn: ClientConnection, status: int, message: str, extra: Headers | None = None
    ) -> None:
        headers = [_JSON]
        if extra:
            headers += extra
        conn.respond(status, headers, error_body(message))

    def _unknown_model(self, name: str) -> str:
        known = ", ".join(sorted(self.table.models)) or "none"
        return f"unknown model {name!r}; models served here: {known}"

    # -- metadata, readiness and health (rare; through aiohttp) ------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_control(
        self, request: Request, conn: ClientConnection, endpoint: Endpoint, model: str, version: str
    ) -> None:
        try:
            status, payload = await self.control.answer(self.table, self.router, endpoint, model, version)
        except Exception:  # a bug here must not leave the client hanging
            log.exception("error answering %s", request.path)
            status, payload = 500, {"error": "internal error"}
        if conn.closed:
            return
        body = json.dumps(payload).encode()  # for HEAD only its length is sent
        conn.respond(status, [_JSON, (b"x-request-id", request_id_of(request))], body)


class ShadowExchange:
    """Receives a mirrored request's answer and drops it."""

    __slots__ = ("_gateway",)

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def upstream_headers(self, status: int, headers: Headers, content_length: int | None) -> None:
        pass

    def upstream_body(self, data: bytes) -> None:
        pass

    def upstream_done(self) -> None:
        self._gateway.mirrors_in_flight -= 1

    def upstream_failed(self, failure: Failure, detail: str) -> None:
        self._gateway.mirrors_in_flight -= 1
        log.debug("shadow request failed: %s", detail)


class ProxyExchange:
    """One inference request on its way to a backend and back."""

    __slots__ = (
        "_extra",
        "_gateway",
        "_route",
        "_status",
        "_t0",
        "_upstream",
        "conn",
        "request_id",
    )

    def __init__(
        self,
        gateway: Gateway,
        conn: ClientConnection,
        route: _VersionRoute,
        request_id: bytes,
        extra_headers: Headers | None = None,
    ):
        self._extra = extra_headers  # rate-limit headers from admission
        self._gateway = gateway
        self.conn = conn
        self._route = route
        self.request_id = request_id
        self._upstream: UpstreamConnection | None = None
        self._status = 0  # the backend's status once its response has started
        self._t0 = 0.0

    def start(self, payload: list[bytes]) -> None:
        self.conn.on_lost = self.client_lost
        self._t0 = time.perf_counter()
        self._route.counters.in_flight += 1

        def connected(upstream: UpstreamConnection | None, why: str) -> None:
            if upstream is None:
                self._record(503, Outcome.UPSTREAM_ERROR)
                self._fail(503, why)
            elif self.conn.closed:
                self._route.pool.release(upstream)
                self._record(499, Outcome.CLIENT_ERROR)
            else:
                self._upstream = upstream
                self.conn.flow = self
                upstream.send(payload, self)
                if self.conn.write_paused:
                    upstream.pause_reading()

        self._route.pool.acquire(connected)

    # -- UpstreamListener --------------------------------------------------------------------------

    def upstream_headers(self, status: int, headers: Headers, content_length: int | None) -> None:
        self._status = status
        drop = _DROP_RESPONSE
        for name, value in headers:
            if name == b"connection":
                drop = drop | {token.strip().lower() for token in value.split(b",")}
        out = [header for header in headers if header[0] not in drop]
        self.conn.start_response(status, out + self._own_headers(), content_length)

    def upstream_body(self, data: bytes) -> None:
        self.conn.write(data)

    def upstream_done(self) -> None:
        self._upstream = None
        self._record(self._status, outcome_of(self._status))
        if not self.conn.closed:
            self.conn.end_response()

    def upstream_failed(self, failure: Failure, detail: str) -> None:
        self._upstream = None
        outcome = Outcome.TIMEOUT if failure is Failure.TIMEOUT else Outcome.UPSTREAM_ERROR
        status = 504 if failure is Failure.TIMEOUT else 502
        self._record(self._status or status, outcome)
        if self.conn.closed:
            return
        if self._status:
            self.conn.abort()  # the client has part of a response; closing is the only honest signal
            return
        self._fail(status, detail)

    def _record(self, status: int, outcome: Outcome) -> None:
        counters = self._route.counters
        counters.in_flight -= 1
        counters.record(status, outcome, time.perf_counter() - self._t0)

    # -- FlowListener: the client is slower than the backend ---------------------------------------

    def pause_source(self) -> None:
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_source(self) -> None:
        if self._upstream is not None:
            self._upstream.resume_reading()

    def client_lost(self) -> None:
        if self._upstream is not None:
            self._upstream.abandon()
            self._upstream = None
            # 499: nginx's code for a client that left; it is not the version's fault.
            self._record(499, Outcome.CLIENT_ERROR)

    def _fail(self, status: int, message: str) -> None:
        if self.conn.closed:
            return
        self._gateway.respond_error(self.conn, status, message, self._own_headers())

    def _own_headers(self) -> Headers:
        """What the gateway adds to every answer for this request, from the backend or its own."""
        own = [(b"x-model-version", self._route.id), (b"x-request-id", self.request_id)]
        return own + self._extra if self._extra else own
