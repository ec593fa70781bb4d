"""Forwarding over HTTP: send a planned request to its version's backend and relay the answer.

Bodies are never decoded: the request body goes upstream as the chunks it arrived in, the response body
comes back as the chunks the backend sent, so JSON and binary tensors pass through untouched. Only the
path changes (the public model and version become Triton's model name and number) and the headers that
belong to one hop are dropped.

Every callback an exchange receives (connected, response head, body, end, failure) is an exception
boundary: a bug answers 500 or aborts this client's connection, drops the upstream connection, and
touches no other exchange.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway.pipeline import steps
from gateway.pipeline.http_answer import send_error
from gateway.pipeline.snapshot import VersionRoute
from gateway.stats.counters import Outcome, outcome_of
from gateway.wire.headers import HOP_BY_HOP, Headers, connection_options
from gateway.wire.http_server import ClientConnection, Request
from gateway.wire.upstream import Failure, UpstreamConnection

log = logging.getLogger("gateway.forward")

# Rebuilt by the gateway, or secrets the backend has no business seeing.
DROP_REQUEST = HOP_BY_HOP | {
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
DROP_RESPONSE = HOP_BY_HOP | {b"content-length", b"x-model-version", b"x-request-id", b"proxy-authenticate"}
MAX_MIRRORS_IN_FLIGHT = 128  # shadow copies beyond this are skipped: a slow mirror must not pile up

CrashReport = Callable[[bytes, BaseException], None]  # (request id, exception): log once and count


def upstream_request(
    request: Request, route: VersionRoute, request_id: bytes, shadow: bool = False
) -> list[bytes]:
    """The request as the backend gets it: Triton's path, our Host, end-to-end headers, the same body."""
    path = route.path if not request.query else route.path + b"?" + request.query.encode("latin-1")
    head = [b"POST ", path, b" HTTP/1.1\r\nhost: ", route.host, b"\r\n"]
    options = connection_options(request.header(b"connection"))
    drop = DROP_REQUEST | options if options else DROP_REQUEST
    forwarded_for = b""
    for name, value in request.headers:
        if name not in drop:
            head += (name, b": ", value, b"\r\n")
        elif name == b"x-forwarded-for":
            forwarded_for = forwarded_for + b", " + value if forwarded_for else value
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


class Mirrors:
    """Shadow copies in flight and skipped, for this process."""

    __slots__ = ("in_flight", "skipped")

    def __init__(self) -> None:
        self.in_flight = 0
        self.skipped = 0

    def send(self, request: Request, route: VersionRoute, request_id: bytes) -> None:
        """Send a shadow copy; its answer is read and dropped, and it never delays the real one."""
        if self.in_flight >= MAX_MIRRORS_IN_FLIGHT:
            self.skipped += 1
            return
        payload = upstream_request(request, route, request_id, shadow=True)
        self.in_flight += 1
        shadow = ShadowExchange(self)

        def connected(upstream: UpstreamConnection | None, why: str) -> None:
            if upstream is None:
                shadow.upstream_failed(Failure.CONNECT, why)
            else:
                upstream.send(payload, shadow)

        route.pool.acquire(connected)


class ShadowExchange:
    """Receives a mirrored request's answer and drops it."""

    __slots__ = ("_mirrors",)

    def __init__(self, mirrors: Mirrors) -> None:
        self._mirrors = mirrors

    def upstream_headers(self, status: int, headers: Headers, content_length: int | None) -> None:
        pass

    def upstream_body(self, data: bytes) -> None:
        pass

    def upstream_done(self) -> None:
        self._mirrors.in_flight -= 1

    def upstream_failed(self, failure: Failure, detail: str) -> None:
        self._mirrors.in_flight -= 1
        log.debug("shadow request failed: %s", detail)

    def upstream_crashed(self, exc: BaseException) -> None:
        self._mirrors.in_flight -= 1
        log.error("internal error relaying a shadow answer", exc_info=exc)


class ProxyExchange:
    """One inference request on its way to a backend and back."""

    __slots__ = (
        "_extra",
        "_recorded",
        "_report",
        "_route",
        "_status",
        "_t0",
        "_upstream",
        "conn",
        "request_id",
    )

    def __init__(
        self,
        conn: ClientConnection,
        route: VersionRoute,
        request_id: bytes,
        extra_headers: Headers | None,
        report: CrashReport,
    ):
        self._extra = extra_headers  # rate-limit headers from admission
        self._report = report
        self.conn = conn
        self._route = route
        self.request_id = request_id
        self._upstream: UpstreamConnection | None = None
        self._status = 0  # the backend's status once its response has started
        self._t0 = 0.0
        self._recorded = False

    def start(self, payload: list[bytes]) -> None:
        self.conn.on_lost = self.client_lost
        self._t0 = time.perf_counter()
        self._route.counters.in_flight += 1

        def connected(upstream: UpstreamConnection | None, why: str) -> None:
            try:
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
            except Exception as exc:
                self._crash(exc)

        self._route.pool.acquire(connected)

    # -- UpstreamListener --------------------------------------------------------------------------

    def upstream_headers(self, status: int, headers: Headers, content_length: int | None) -> None:
        try:
            self._status = status
            drop = DROP_RESPONSE
            for name, value in headers:
                if name == b"connection":
                    drop = drop | {token.strip().lower() for token in value.split(b",")}
            out = [header for header in headers if header[0] not in drop]
            self.conn.start_response(status, out + self._own_headers(), content_length)
        except Exception as exc:
            self._crash(exc)

    def upstream_body(self, data: bytes) -> None:
        try:
            self.conn.write(data)
        except Exception as exc:
            self._crash(exc)

    def upstream_done(self) -> None:
        try:
            self._upstream = None
            self._record(self._status, outcome_of(self._status))
            if not self.conn.closed:
                self.conn.end_response()
        except Exception as exc:
            self._crash(exc)

    def upstream_failed(self, failure: Failure, detail: str) -> None:
        try:
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
        except Exception as exc:
            self._crash(exc)

    def _record(self, status: int, outcome: Outcome) -> None:
        if not self._recorded:
            self._recorded = True
            self._route.counters.in_flight -= 1
            steps.record(self._route, status, outcome, self._t0)

    def upstream_crashed(self, exc: BaseException) -> None:
        self._crash(exc)

    def _crash(self, exc: BaseException) -> None:
        """Our bug, not the version's: counted apart, never recorded against it."""
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abandon()
        if not self._recorded:
            self._recorded = True
            self._route.counters.in_flight -= 1
        self._report(self.request_id, exc)
        self.conn.fail_internal()

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
        if not self.conn.closed:
            send_error(self.conn, status, message, self._own_headers())

    def _own_headers(self) -> Headers:
        """What the gateway adds to every answer for this request, from the backend or its own."""
        own = [(b"x-model-version", self._route.id), (b"x-request-id", self.request_id)]
        return own + self._extra if self._extra else own
