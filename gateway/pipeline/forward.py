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
from gateway.pipeline.blame import CLASSIFIED_STATUSES, MAX_CLASSIFIED_BODY, caller_fault
from gateway.pipeline.http_answer import send_error
from gateway.pipeline.snapshot import VersionRoute
from gateway.shadow.comparer import PRIMARY, SHADOW, Comparer, Pair
from gateway.stats.counters import Choice, Outcome, outcome_of
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
    b"x-gateway-shadow",  # ours: a client must not make its request look like a shadow copy
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
    connection = request.fields.get(b"connection")  # always captured (FRAMING_HEADERS)
    options = connection_options(connection) if connection is not None else None
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


def header_length(headers: Headers) -> int | None:
    """The binary tensor extension's JSON head length, for comparing answers (gateway/shadow)."""
    for name, value in headers:
        if name == b"inference-header-content-length":
            return int(value) if value.strip().isdigit() else -1
    return None


class Mirrors:
    """Shadow copies in flight and skipped, for this process, and the comparer of their answers."""

    __slots__ = ("comparer", "in_flight", "skipped")

    def __init__(self) -> None:
        self.in_flight = 0
        self.skipped = 0
        self.comparer = Comparer()

    def pair(self, primary: VersionRoute, shadow: VersionRoute) -> Pair | None:
        return self.comparer.pair(primary.model, primary.version.id, shadow.version.id)

    def send(
        self, request: Request, route: VersionRoute, request_id: bytes, pair: Pair | None = None
    ) -> None:
        """Send a shadow copy; its answer is read and dropped, and it never delays the real one.

        Only when a connection is free: a shadow copy never waits in a pool's queue, so it never takes a
        turn from real traffic to the same backend.
        """
        if self.in_flight >= MAX_MIRRORS_IN_FLIGHT:
            self.skipped += 1
            if pair is not None:
                pair.cancel()
            return
        payload = upstream_request(request, route, request_id, shadow=True)
        shadow = ShadowExchange(self, route, pair)

        def connected(upstream: UpstreamConnection | None, why: str) -> None:
            if upstream is None:
                shadow.upstream_failed(Failure.CONNECT, why)
            else:
                upstream.send(payload, shadow)

        self.in_flight += 1
        if not route.pool.acquire_if_free(connected):
            self.in_flight -= 1
            self.skipped += 1
            if pair is not None:
                pair.cancel()


def _held_back(status: int, content_length: int | None) -> bool:
    """An answer whose body must be read before its head goes on: it may blame the request (blame.py)."""
    return (
        status in CLASSIFIED_STATUSES and content_length is not None and content_length <= MAX_CLASSIFIED_BODY
    )


class ShadowExchange:
    """Receives a mirrored request's answer, counts it for its version as a shadow copy, drops it."""

    __slots__ = ("_body", "_mirrors", "_pair", "_route", "_started", "_status")

    def __init__(self, mirrors: Mirrors, route: VersionRoute, pair: Pair | None = None) -> None:
        self._mirrors = mirrors
        self._pair = pair
        self._route = route
        self._started = time.perf_counter()  # a free connection is taken at once: this is the send
        self._status = 0
        self._body: list[bytes] | None = None

    def upstream_headers(self, status: int, headers: Headers, content_length: int | None) -> None:
        self._status = status
        if _held_back(status, content_length):
            self._body = []
        if self._pair is not None:
            self._pair.head(SHADOW, status, header_length(headers))

    def upstream_body(self, data: bytes) -> None:
        if self._body is not None:
            self._body.append(data)
        if self._pair is not None:
            self._pair.body(SHADOW, data)

    def upstream_done(self) -> None:
        self._mirrors.in_flight -= 1
        status, outcome = self._status, outcome_of(self._status)
        if self._body is not None and caller_fault(status, b"".join(self._body)) is not None:
            outcome = Outcome.CLIENT_ERROR
        seconds = time.perf_counter() - self._started
        steps.record(self._route, Choice.SHADOW, status, outcome, seconds)
        if self._pair is not None:
            self._pair.done(SHADOW, seconds)

    def upstream_failed(self, failure: Failure, detail: str) -> None:
        self._mirrors.in_flight -= 1
        if self._pair is not None:
            self._pair.failed(SHADOW)
        timeout = failure is Failure.TIMEOUT
        outcome = Outcome.TIMEOUT if timeout else Outcome.UPSTREAM_ERROR
        seconds = time.perf_counter() - self._started
        steps.record(self._route, Choice.SHADOW, 504 if timeout else 502, outcome, seconds)
        log.debug("shadow request failed: %s", detail)

    def upstream_crashed(self, exc: BaseException) -> None:
        self._mirrors.in_flight -= 1
        if self._pair is not None:
            self._pair.failed(SHADOW)
        log.error("internal error relaying a shadow answer", exc_info=exc)


class ProxyExchange:
    """One inference request on its way to a backend and back.

    What it records is the backend's doing only: the time from the request sent to the response
    received, less any time reading from the backend was paused because the client was not reading
    (`pause_source`); a client that leaves or stops reading is 499 (`Outcome.ABANDONED`), never the
    backend's timeout; and a 5xx that blames the request (blame.py) goes to the client as 400 and is
    counted as the caller's fault.
    """

    __slots__ = (
        "_choice",
        "_extra",
        "_held",
        "_pair",
        "_paused_at",
        "_paused_for",
        "_recorded",
        "_report",
        "_route",
        "_sent",
        "_status",
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
        choice: Choice = Choice.SPLIT,
        pair: Pair | None = None,
    ):
        self._extra = extra_headers  # rate-limit headers from admission
        self._pair = pair  # collects the answer for a shadow comparison when a copy was mirrored
        self._report = report
        self.conn = conn
        self._route = route
        self._choice = choice
        self.request_id = request_id
        self._upstream: UpstreamConnection | None = None
        self._status = 0  # the backend's status once its response has started
        self._held: tuple[Headers, list[bytes]] | None = None  # a head and body held back (_held_back)
        self._sent = 0.0  # perf_counter when the request went out (when it was started, until then)
        self._paused_at = 0.0  # since when reading is paused for the client; 0 while it is not
        self._paused_for = 0.0  # time paused so far: the client's, not the backend's
        self._recorded = False

    def start(self, payload: list[bytes]) -> None:
        self.conn.on_lost = self.client_lost
        self._sent = time.perf_counter()
        self._route.counters.in_flight += 1

        def connected(upstream: UpstreamConnection | None, why: str) -> None:
            try:
                if upstream is None:
                    self._record(503, Outcome.UPSTREAM_ERROR)
                    self._fail(503, why)
                elif self.conn.closed:
                    self._route.pool.release(upstream)
                    self._record(499, Outcome.ABANDONED)
                else:
                    self._upstream = upstream
                    self.conn.flow = self
                    self._sent = time.perf_counter()
                    upstream.send(payload, self)
                    if self.conn.write_paused:
                        self.pause_source()
            except Exception as exc:
                self._crash(exc)

        self._route.pool.acquire(connected)

    # -- UpstreamListener --------------------------------------------------------------------------

    def upstream_headers(self, status: int, headers: Headers, content_length: int | None) -> None:
        try:
            self._status = status
            if self._pair is not None:
                self._pair.head(PRIMARY, status, header_length(headers))
            if _held_back(status, content_length):
                self._held = (headers, [])
            else:
                self._start_response(status, headers, content_length)
        except Exception as exc:
            self._crash(exc)

    def upstream_body(self, data: bytes) -> None:
        try:
            if self._pair is not None:
                self._pair.body(PRIMARY, data)
            if self._held is not None:
                self._held[1].append(data)
            else:
                self.conn.write(data)
        except Exception as exc:
            self._crash(exc)

    def upstream_done(self) -> None:
        try:
            self._upstream = None
            status, outcome, held = self._status, outcome_of(self._status), self._held
            if held is None:
                self._record(status, outcome)
                if not self.conn.closed:
                    self.conn.end_response()
                return
            self._held = None
            body = b"".join(held[1])
            blamed = caller_fault(status, body)
            if blamed is not None:
                status, outcome = blamed, Outcome.CLIENT_ERROR
            self._record(status, outcome)
            if not self.conn.closed:
                self._start_response(status, held[0], len(body))
                self.conn.write(body)
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
            if self._status and self._held is None:
                self.conn.abort()  # the client has part of a response; closing is the only honest signal
                return
            self._held = None
            self._fail(status, detail)
        except Exception as exc:
            self._crash(exc)

    def _start_response(self, status: int, headers: Headers, content_length: int | None) -> None:
        drop = DROP_RESPONSE
        for name, value in headers:
            if name == b"connection":
                drop = drop | {token.strip().lower() for token in value.split(b",")}
        out = [header for header in headers if header[0] not in drop]
        self.conn.start_response(status, out + self._own_headers(), content_length)

    def _record(self, status: int, outcome: Outcome) -> None:
        if not self._recorded:
            self._recorded = True
            self._route.counters.in_flight -= 1
            now = time.perf_counter()
            paused = self._paused_for + (now - self._paused_at if self._paused_at else 0.0)
            seconds = now - self._sent - paused
            steps.record(self._route, self._choice, status, outcome, seconds)
            if self._pair is not None:
                self._pair.done(PRIMARY, seconds) if outcome is Outcome.OK else self._pair.failed(PRIMARY)

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
            if self._pair is not None:
                self._pair.failed(PRIMARY)
        self._report(self.request_id, exc)
        self.conn.fail_internal()

    # -- FlowListener: the client is slower than the backend ---------------------------------------

    def pause_source(self) -> None:
        if self._upstream is not None:
            self._upstream.pause_reading()  # which also stops the backend's deadline (upstream.py)
            if not self._paused_at:
                self._paused_at = time.perf_counter()

    def resume_source(self) -> None:
        if self._upstream is not None:
            self._upstream.resume_reading()
        if self._paused_at:
            self._paused_for += time.perf_counter() - self._paused_at
            self._paused_at = 0.0

    def client_lost(self) -> None:
        if self._upstream is not None:
            self._upstream.abandon()
            self._upstream = None
            # 499: nginx's code for a client that left; it is not the version's fault.
            self._record(499, Outcome.ABANDONED)

    def _fail(self, status: int, message: str) -> None:
        if not self.conn.closed:
            send_error(self.conn, status, message, self._own_headers())

    def _own_headers(self) -> Headers:
        """What the gateway adds to every answer for this request, from the backend or its own."""
        own = [(b"x-model-version", self._route.id), (b"x-request-id", self.request_id)]
        return own + self._extra if self._extra else own
