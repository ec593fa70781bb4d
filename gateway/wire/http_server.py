"""The client-facing HTTP/1.1 server: one asyncio Protocol per connection, parsed by httptools (llhttp).

A request is handed to the handler as soon as its head is complete, so that everything that needs only
the head (route, key, limits) is decided before the body is read: a refused request is answered at once,
and the rest of its body is read and dropped if it is small, or the connection is closed if it is not.
`Expect: 100-continue` gets its `100 Continue` only when the handler asks for the body (`read_body`).
Requests pipelined behind the active one wait in a short queue, one answered at a time, in order.

Bounds against hostile or broken clients, each per worker:
- the head is counted in raw bytes as they arrive (a header that never ends gets 431 once the bytes pass
  `max_header_size`, not when httptools finally reports it), and so are chunk framing and trailers;
- request bodies held in memory are budgeted across connections (`BodyBudget`): a request whose
  declared length would exceed it gets 503 with Retry-After before any of its body is read;
- open connections are capped: one more is answered 503 and closed;
- a client that does not read its answers stops being read from and stops having its pipelined
  requests dispatched (backpressure both ways), and one that stays stalled past `write_timeout` is
  aborted.

Timeouts are plain deadlines swept by one timer per connection set (`Deadlines`): the head within
`header_timeout`, the body within `body_timeout` of the head (or of our 100 Continue), an idle
keep-alive connection closed after `keepalive_timeout`.

An exception the handler raises is its bug, not the client's: the connection answers 500 if nothing
was sent yet, else it closes (as uvicorn does), and never parks the error behind a response that will
not come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol, cast

import httptools

from gateway.routing.table import ServerSettings
from gateway.wire.deadlines import Deadlines
from gateway.wire.headers import Headers
from gateway.wire.request import FRAMING_HEADERS, BodyBudget, Request, status_line

log = logging.getLogger("gateway.http")

SMALL_WRITE = 16384  # bodies up to this size leave in the same send as the response head
MAX_PIPELINED = 16  # requests queued behind the active one before we stop reading
DRAIN_LIMIT = 64 * 1024  # the rest of a refused request's body is read and dropped up to this; else close
REQUEST_LINE_OVERHEAD = 32  # bytes of a request line and head end that no parser callback reports
CHUNK_FRAMING = 32  # bytes of framing allowed per chunk (size line, extensions, CRLFs) beyond the budget
RETRY_AFTER = [(b"retry-after", b"1")]
INTERNAL_ERROR = "internal error in the gateway (logged with the request id)"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BUSY_BODY = b'{"error": "too many open connections; retry in a second"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)

__all__ = ["FRAMING_HEADERS", "BodyBudget", "ClientConnection", "Request", "RequestHandler", "status_line"]


class FlowListener(Protocol):
    """Told when the client stops and starts draining what we write to it."""

    def pause_source(self) -> None: ...

    def resume_source(self) -> None: ...


class RequestHandler(Protocol):
    """What a connection hands its requests to: the front door of the request pipeline."""

    @property
    def captured_headers(self) -> frozenset[bytes]:
        """Header names whose first value the handler reads; must include FRAMING_HEADERS."""
        ...

    def handle(self, request: Request, conn: ClientConnection) -> None:
        """Answer the active request (its head is complete; its body may not be), now or later."""

    def refuse(
        self, conn: ClientConnection, status: int, message: str, headers: Headers | None = None
    ) -> None:
        """Answer the active request with an error of the gateway's own, in the handler's shape."""

    def crashed(self, conn: ClientConnection, request: Request | None, exc: BaseException) -> None:
        """Log and count a bug the handler raised; the connection then answers 500 or closes."""


class _Discard:
    """Parser callbacks for a connection we no longer read from."""


class _Rejected(Exception):
    """Raised inside parser callbacks to stop parsing a request we already answered with an error."""


class ClientConnection(asyncio.Protocol):
    def __init__(
        self,
        handler: RequestHandler,
        settings: ServerSettings,
        connections: Deadlines[ClientConnection],
        budget: BodyBudget,
    ) -> None:
        self._handler = handler
        self._settings = settings
        self._max_head = settings.max_header_size  # read per header: one attribute, not two
        self._max_headers = settings.max_headers
        self._connections = connections
        self._budget = budget
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client = ""
        self._reading: Request | None = None  # the request being parsed
        self._head_size = 0  # bytes of the current head's complete pieces (request target, fields, trailers)
        self._head_bytes = 0  # raw bytes of the current head (or, in a chunked body, of its framing)
        self._chunks = 0  # chunks of the current chunked body, each allowed CHUNK_FRAMING bytes
        self._accounted = 0  # bytes of the chunk being fed that callbacks have accounted for
        self._began_at = -1  # ... of which before the message that began in this chunk, if one did
        self._begun = 0  # messages that began in this chunk
        self._queue: deque[Request] = deque()  # heads complete, waiting for the active one to finish
        self._active: Request | None = None  # handed to the handler, response not finished
        self._response_keep_alive = True
        self._response_chunked = False
        self._response_started = False
        self._head = b""
        self._continue_sent = False
        self._pending_error: tuple[int, str, Headers | None] | None = None  # after the queue ahead drains
        self._dispatching = False
        self._read_paused = False
        self._stopped = False  # reading ended for good (after a refusal that closes)
        self._write_paused = False
        self._draining = False  # graceful shutdown: finish what is in flight, then close
        self._closed = False
        self.deadline = 0.0  # loop time when the current timeout fires; 0 for none (see Deadlines)
        self.flow: FlowListener | None = None  # set by the handler while it streams a response
        self.on_lost: Callable[[], None] | None = None  # set by the handler while a request is in flight

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        if len(self._connections) >= self._settings.max_connections:
            self._transport.write(_BUSY)
            self._transport.close()
            self._closed = True
            return
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) else ""
        self._connections.add(self)
        self._arm(self._settings.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._connections.discard(self)
        self.deadline = 0.0
        for request in (self._active, self._reading, *self._queue):
            if request is not None:
                self._budget.release(request)
        if self._active is not None and self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    def data_received(self, data: bytes) -> None:
        if self._pending_error is not None or self._closed:
            return
        reading = self._reading
        self._accounted = 0
        self._began_at = -1
        self._begun = 0
        try:
            self._parser.feed_data(data)
            if self._reading is not None:  # a message not finished by this chunk: budget its raw bytes
                self._count_raw(len(data), reading)
        except _Rejected:
            pass
        except httptools.HttpParserUpgrade:
            # An upgrade we do not support: the request itself was delivered; close after answering it.
            self._stop_reading()
            self._draining = True
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Rejected):
                return
            with contextlib.suppress(_Rejected):
                if cause is not None:  # our own callback failed: a bug, not a malformed request
                    self._crash(self._reading, cause)
                    self._reject(HTTPStatus.INTERNAL_SERVER_ERROR, INTERNAL_ERROR)
                self._reject(HTTPStatus.BAD_REQUEST, f"malformed HTTP request: {exc}")

    def eof_received(self) -> bool:
        # A client may half-close after its last request; answer what we have, then close.
        if self._active is not None or self._queue:
            self._draining = True
            return True
        return False

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()
        self._arm(self._settings.write_timeout)
        if self.flow is not None:
            self.flow.pause_source()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        self._rearm()
        if self.flow is not None:
            self.flow.resume_source()
        if self._active is None and not self._dispatching:
            self._dispatch()

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._stopped:
            raise _Rejected
        self._reading = Request(self._client, self._handler.captured_headers)
        self._head_size = 0
        self._head_bytes = 0
        self._chunks = 0
        self._began_at = self._accounted
        self._begun += 1
        self._continue_sent = False
        self._arm(self._settings.header_timeout)

    def on_url(self, url: bytes) -> None:
        assert self._reading is not None
        self._reading.target += url
        self._accounted += len(url)
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._reading
        assert request is not None
        size = len(name) + len(value) + 4
        self._accounted += size
        self._head_size += size
        if self._head_size > self._max_head:
            self._reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request line and headers are too large")
        if request.method:  # a trailer field after a chunked body: never merged into the header section
            return
        if len(request.headers) >= self._max_headers:
            self._reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many request headers")
        name = name.lower()
        request.headers.append((name, value))
        if name in request.captured:
            fields = request.fields
            if name not in fields:
                fields[name] = value
            elif name == b"connection":
                fields[name] += b"," + value
            if name == b"host":
                request.hosts += 1

    def on_headers_complete(self) -> None:
        request = self._reading
        assert request is not None
        parser = self._parser
        request.method = parser.get_method().decode()
        request.http_version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive() and not parser.should_upgrade()
        target = request.target.decode("latin-1")
        if not target.startswith("/") and "://" in target:  # absolute-form, RFC 9112 section 3.2.2
            target = "/" + target.partition("://")[2].partition("/")[2]
        path, _, request.query = target.partition("?")
        request.path = path
        hosts = request.hosts
        if hosts > 1 or (hosts == 0 and request.http_version == "1.1"):
            self._reject(HTTPStatus.BAD_REQUEST, "an HTTP/1.1 request needs exactly one Host header")
        length = request.fields.get(b"content-length")
        if length is not None:
            declared = request.declared = int(length)  # llhttp has checked it is a number
            if declared > self._settings.max_body_size:
                self._reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
            if declared and not self._budget.reserve(request, declared):
                message = "the gateway is holding too many request bodies; retry in a second"
                self._reject(HTTPStatus.SERVICE_UNAVAILABLE, message, RETRY_AFTER)
        expect = request.fields.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and request.http_version == "1.1":
            request.expect_continue = True
        self._head_bytes = 0  # from here on it counts chunk framing and trailers
        if self._active is None and not self._queue and not self._write_paused:
            self._start(request)
        elif request.expect_continue:
            # The client waits for our 100 before sending the body; its clock starts when we send it.
            self._arm(self._settings.keepalive_timeout)
        else:
            self._arm(self._settings.body_timeout)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        if self._stopped:
            raise _Rejected  # answered and closing: the rest of this chunk is not read
        request = self._reading
        assert request is not None
        size = len(body)
        self._accounted += size
        if request.discard:
            return
        request.body_size += size
        if request.body_size > self._settings.max_body_size:
            self._reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
        if request.declared is None and not self._budget.reserve(request, size):
            message = "the gateway is holding too many request bodies; retry in a second"
            self._reject(HTTPStatus.SERVICE_UNAVAILABLE, message, RETRY_AFTER)
        request.body.append(body)

    def on_message_complete(self) -> None:
        if self._stopped:
            raise _Rejected
        request = self._reading
        assert request is not None
        self._reading = None
        request.complete = True
        if not request.dispatched:
            self._queue.append(request)
            self.deadline = 0.0  # waiting for its turn: nothing more is expected from the client for it
            self._update_reading()
            self._dispatch()
        elif request is self._active:
            self.deadline = 0.0  # in flight: the backend's timeout applies, not the client's
            callback, request.on_complete = request.on_complete, None
            if callback is not None:
                self._run(request, callback)
        elif self._active is None:  # the body of a request answered on its head: it is drained now
            self._dispatch()

    # -- responses (called by the handler) ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    @property
    def response_started(self) -> bool:
        return self._response_started

    def is_active(self, request: Request) -> bool:
        """Whether `request` is still the one this connection waits to answer (not closed, not answered)."""
        return self._active is request and not self._closed

    def read_body(self, request: Request, then: Callable[[], None]) -> None:
        """Call `then` once the active request's body is complete; sends 100 Continue if it waits for one."""
        if request.complete:
            then()
            return
        request.on_complete = then
        if request.expect_continue and not self._continue_sent:
            self._send_continue()

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        """Send a whole response to the active request."""
        self.start_response(status, headers, len(body))
        if body and self._active is not None and self._active.method != "HEAD":
            self.write(body)
        self.end_response()

    def start_response(self, status: int, headers: Headers, content_length: int | None) -> None:
        """Send the status line and headers; `content_length` None streams the body in chunks."""
        request = self._active
        assert request is not None and not self._response_started
        self._response_started = True
        keep_alive = request.keep_alive and not (self._draining and not self._queue)
        if not request.complete and not self._drains(request):
            keep_alive = False
            self._stop_reading()
        parts = [status_line(status)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if status in (204, 304) or request.method == "HEAD":
            self._response_chunked = False  # no body whatever the backend said (RFC 9110 section 6.4.1)
            if content_length is not None and status != 204:
                parts.append(b"content-length: %d\r\n" % content_length)
        elif content_length is not None:
            parts.append(b"content-length: %d\r\n" % content_length)
            self._response_chunked = False
        elif request.http_version == "1.1":
            parts.append(b"transfer-encoding: chunked\r\n")
            self._response_chunked = True
        else:
            keep_alive = False  # HTTP/1.0 without a length: the end of the body is the close
            self._response_chunked = False
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        elif request.http_version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self._response_keep_alive = keep_alive
        # Held back until the first body bytes or the end, so head and body leave in one send.
        self._head = b"".join(parts)

    def write(self, data: bytes) -> None:
        if self._closed or self._transport is None or not data:
            return
        head, self._head = self._head, b""
        if self._response_chunked:
            self._transport.writelines((head, b"%x\r\n" % len(data), data, b"\r\n"))
        elif head and len(data) <= SMALL_WRITE:
            self._transport.write(head + data)  # one send for a small response: copying is cheaper
        else:
            if head:
                self._transport.write(head)
            self._transport.write(data)

    def end_response(self) -> None:
        request = self._active
        assert request is not None
        if not self._closed and self._transport is not None:
            tail = b"0\r\n\r\n" if self._response_chunked else b""
            if self._head or tail:
                self._transport.write(self._head + tail)
        self._head = b""
        self._finished(request)
        if not self._response_keep_alive:
            self._close()
            return
        if not self._dispatching:
            self._dispatch()

    def abort(self) -> None:
        """Give up on the active response midway: the client sees the connection close."""
        if self._active is not None:
            self._finished(self._active)
        self._close()

    def fail_internal(self, headers: Headers | None = None) -> None:
        """The handler failed on the active request: 500 if nothing was sent yet, else close.

        Either way the connection closes after it: whatever state the failed step left behind must not
        meet the next request on this connection.
        """
        request = self._active
        if self._closed or request is None:
            return
        if self._response_started:
            self.abort()
            return
        request.keep_alive = False
        self.flow = None
        self.on_lost = None
        try:
            self._handler.refuse(self, HTTPStatus.INTERNAL_SERVER_ERROR, INTERNAL_ERROR, headers)
        except Exception as exc:
            log.error("cannot answer 500 after an internal error", exc_info=exc)
            self.abort()

    def shutdown(self) -> None:
        """Graceful shutdown: close now if idle, otherwise after the responses in flight."""
        self._draining = True
        if self._active is None and not self._queue and not self._dispatching:
            self._close()

    # -- internals ---------------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        """Make `request` the active one and hand it to the handler (the synchronous exception boundary)."""
        self._active = request
        request.dispatched = True
        if request.complete or request.expect_continue:
            self.deadline = 0.0  # in flight, or the client waits for our decision and its 100 Continue
        else:
            self._arm(self._settings.body_timeout)
        try:
            self._handler.handle(request, self)
        except Exception as exc:
            self._crash(request, exc)
            self.fail_internal()

    def _run(self, request: Request, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:
            self._crash(request, exc)
            self.fail_internal()

    def _finished(self, request: Request) -> None:
        self._budget.release(request)
        request.body = []
        request.on_complete = None
        self._active = None
        self._response_started = False
        self.flow = None
        self.on_lost = None

    def _drains(self, request: Request) -> bool:
        """Whether to read and drop the rest of a request answered before its body arrived."""
        if request.expect_continue and not self._continue_sent:
            return False  # the client may never send it; closing ends the wait for both sides
        if request.declared is not None:
            remaining = request.declared - request.body_size
        elif b"transfer-encoding" not in request.fields:
            remaining = 0  # no body at all (RFC 9112 section 6.3); its end is just not parsed yet
        else:
            return False  # chunked: no telling how much is left
        if remaining > DRAIN_LIMIT:
            return False
        request.discard = True
        self._budget.release(request)
        return True

    def _dispatch(self) -> None:
        self._dispatching = True
        try:
            while self._active is None and self._queue and not self._closed and not self._write_paused:
                request = self._queue.popleft()
                self._update_reading()
                self._start(request)
            reading = self._reading
            if (
                self._active is None
                and not self._queue
                and reading is not None
                and reading.method
                and not reading.dispatched
                and not self._write_paused
                and not self._closed
            ):
                self._start(reading)  # its head came in while others were answered; its body is on the way
        finally:
            self._dispatching = False
        if self._active is not None or self._closed or self._queue:
            return
        if self._pending_error is not None:
            status, message, headers = self._pending_error
            self._pending_error = None
            self._send_error_and_close(status, message, headers)
        elif self._draining:
            self._close()
        elif self._reading is None:
            self._arm(self._settings.keepalive_timeout)

    def _reject(self, status: int, message: str, headers: Headers | None = None) -> None:
        """Refuse the request being read; stop reading from this connection for good."""
        request, self._reading = self._reading, None
        self._stop_reading()
        if request is not None and request is self._active and not self._response_started:
            request.keep_alive = False
            self._handler.refuse(self, status, message, headers)
        elif self._active is None and not self._queue:
            self._send_error_and_close(status, message, headers)
        elif request is None or request is not self._active:
            self._pending_error = (status, message, headers)
        else:
            self.abort()  # its answer has started: closing is the only honest signal
        if request is not None and request is not self._active:
            self._budget.release(request)
        raise _Rejected

    def _send_error_and_close(self, status: int, message: str, headers: Headers | None = None) -> None:
        if self._closed:
            return
        request = Request(self._client)
        request.keep_alive = False
        request.complete = True
        self._active = request
        try:
            # Ends with end_response(), which closes (keep_alive is False).
            self._handler.refuse(self, status, message, headers)
        except Exception as exc:
            self._crash(request, exc)
            self.abort()

    def _crash(self, request: Request | None, exc: BaseException) -> None:
        try:
            self._handler.crashed(self, request, exc)
        except Exception:  # even the reporting failed: say so once, here
            log.exception("internal error while handling a request")

    def _send_continue(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(_CONTINUE)
        self._continue_sent = True
        self._arm(self._settings.body_timeout)

    def _count_raw(self, size: int, reading: Request | None) -> None:
        """Count the raw bytes of an unfinished head, or of a chunked body's framing, after a feed.

        httptools reports a header only once it is complete, and joins its pieces until then, so the
        budget is kept on what arrives: the bytes of this chunk that no callback accounted for.
        """
        current = self._reading
        if current is None or current.discard:
            return
        if not current.method:  # the head is still open
            # Still the request being read before this chunk: the whole chunk is head. Else it began here.
            began = 0 if current is reading else self._began_at
            self._head_bytes += size - began
            if self._head_bytes > self._settings.max_header_size:
                self._reject(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request line and headers are too large"
                )
        elif current.declared is None and b"transfer-encoding" in current.fields:
            # Chunk sizes, extensions, trailers: what no callback accounted for, less the request lines
            # of the messages that began in this chunk (their method, version and line ends).
            self._head_bytes += max(0, size - self._accounted - REQUEST_LINE_OVERHEAD * self._begun)
            if self._head_bytes > self._settings.max_header_size + CHUNK_FRAMING * self._chunks:
                self._reject(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "chunk framing or trailers are too large"
                )

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._settings.max_header_size:
            self._reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request line and headers are too large")

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self._settings.max_body_size} bytes"

    def expired(self) -> None:
        if self._write_paused:
            # It has not read our answer for write_timeout: abort, since close() would wait for the
            # buffer to drain, which is what it is not doing.
            if self._transport is not None:
                self._transport.abort()
            self._closed = True
            return
        reading = self._reading
        if reading is not None and not reading.dispatched:
            with contextlib.suppress(_Rejected):
                self._reject(HTTPStatus.REQUEST_TIMEOUT, "request was not received in time")
        elif reading is not None:  # answered or in flight, and its body stopped coming
            if self._active is reading and not self._response_started:
                with contextlib.suppress(_Rejected):
                    self._reject(HTTPStatus.REQUEST_TIMEOUT, "request body was not received in time")
            else:
                self._close()
        elif self._active is None and not self._queue:
            self._close()

    def _arm(self, delay: float) -> None:
        self.deadline = self._connections.now() + delay

    def _rearm(self) -> None:
        """The deadline for the state the connection is in (after writing resumed)."""
        reading = self._reading
        if reading is not None and not reading.method:
            self._arm(self._settings.header_timeout)
        elif reading is not None and not (reading.expect_continue and not self._continue_sent):
            self._arm(self._settings.body_timeout)
        elif self._active is not None or self._queue or reading is not None:
            self.deadline = 0.0
        else:
            self._arm(self._settings.keepalive_timeout)

    def _update_reading(self) -> None:
        """Read while nothing holds it back: a full queue, a client not reading our answers, a stop."""
        transport = self._transport
        if transport is None or self._closed:
            return
        paused = self._stopped or self._write_paused or len(self._queue) > MAX_PIPELINED
        if paused and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not paused and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _stop_reading(self) -> None:
        self._stopped = True
        self._update_reading()
        self._parser = httptools.HttpRequestParser(_Discard())

    def _close(self) -> None:
        self.deadline = 0.0
        if self._transport is not None and not self._closed:
            self._transport.close()
        self._closed = True
