"""The client-facing HTTP/1.1 server: one asyncio Protocol per connection, parsed by httptools (llhttp).

A connection reads requests, buffers each body (up to the size limit), and hands complete requests,
one at a time and in order, to a handler; pipelined requests wait in a short queue. The handler answers
through `respond` or `start_response` / `write` / `end_response`, synchronously or later. Reading is
paused while the queue is full, and the handler is told when the client stops draining the response so
it can stop reading from its own source.

The headers a handler asks for (`RequestHandler.captured_headers`) are captured as the parser reports
them, so nothing rescans the header list. An exception the handler raises is its bug, not the client's:
the connection answers 500 if nothing was sent yet, else it closes (as uvicorn does), and never parks
the error behind a response that will not come.

Timeouts are one timer per connection, re-armed at each state change: the head of a request must arrive
within `header_timeout`, its body within `body_timeout`, and an idle keep-alive connection is closed after
`keepalive_timeout`.
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

log = logging.getLogger("gateway.http")

SMALL_WRITE = 16384  # bodies up to this size leave in the same send as the response head
MAX_PIPELINED = 16  # complete requests queued behind the active one before we stop reading

_STATUS_LINES = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode()) for status in HTTPStatus
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Captured for every request, whatever the handler asks for: the connection itself needs them.
FRAMING_HEADERS = frozenset((b"host", b"content-length", b"expect", b"connection"))
INTERNAL_ERROR = "internal error in the gateway (logged with the request id)"


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status


class Request:
    """One parsed request. Header names are lower-cased; values are raw bytes.

    `fields` holds the first value of each captured header (`Connection` values joined, as RFC 9110
    section 5.3 allows), filled in while the head is parsed.
    """

    __slots__ = (
        "body",
        "body_size",
        "captured",
        "client",
        "expect_continue",
        "fields",
        "headers",
        "hosts",
        "http_version",
        "keep_alive",
        "method",
        "path",
        "query",
        "target",
    )

    def __init__(self, client: str, captured: frozenset[bytes] = FRAMING_HEADERS) -> None:
        self.client = client
        self.captured = captured
        self.fields: dict[bytes, bytes] = {}
        self.hosts = 0
        self.target = b""
        self.method = ""
        self.path = ""
        self.query = ""
        self.http_version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.headers: Headers = []
        self.body: list[bytes] = []
        self.body_size = 0

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case)."""
        if name in self.captured:
            return self.fields.get(name)
        for key, value in self.headers:
            if key == name:
                return value
        return None


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
        """Answer the active request, now or later."""

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
    ) -> None:
        self._handler = handler
        self._settings = settings
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client = ""
        self._reading: Request | None = None  # the request being parsed
        self._head_size = 0
        self._queue: deque[Request] = deque()  # complete, waiting for the active one to finish
        self._active: Request | None = None  # handed to the handler, response not finished
        self._response_keep_alive = True
        self._response_chunked = False
        self._response_started = False
        self._head = b""
        self._continue_sent = False
        self._pending_error: tuple[int, str] | None = None  # answered once the queue ahead drains
        self._dispatching = False
        self._read_paused = False
        self._write_paused = False
        self._draining = False  # graceful shutdown: finish what is in flight, then close
        self._closed = False
        self.deadline = 0.0  # loop time when the current timeout fires; 0 for none (see Deadlines)
        self.flow: FlowListener | None = None  # set by the handler while it streams a response
        self.on_lost: Callable[[], None] | None = None  # set by the handler while a request is in flight

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) else ""
        self._connections.add(self)
        self._arm(self._settings.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._connections.discard(self)
        self.deadline = 0.0
        if self._active is not None and self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    def data_received(self, data: bytes) -> None:
        if self._pending_error is not None or self._closed:
            return
        try:
            self._parser.feed_data(data)
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
        if self.flow is not None:
            self.flow.pause_source()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.flow is not None:
            self.flow.resume_source()

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reading = Request(self._client, self._handler.captured_headers)
        self._head_size = 0
        self._continue_sent = False
        self._arm(self._settings.header_timeout)

    def on_url(self, url: bytes) -> None:
        assert self._reading is not None
        self._reading.target += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._reading
        assert request is not None
        self._count_head(len(name) + len(value) + 4)
        if request.method:  # a trailer field after a chunked body: never merged into the header section
            return
        if len(request.headers) >= self._settings.max_headers:
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
        length = request.header(b"content-length")
        if length is not None and int(length) > self._settings.max_body_size:
            self._reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
        expect = request.header(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and request.http_version == "1.1":
            request.expect_continue = True
            if self._active is None and not self._queue:
                self._send_continue()
            else:
                # The client waits for our 100 before sending the body; its clock starts when we send it.
                self._arm(self._settings.keepalive_timeout)
                return
        self._arm(self._settings.body_timeout)

    def on_body(self, body: bytes) -> None:
        request = self._reading
        assert request is not None
        request.body_size += len(body)
        if request.body_size > self._settings.max_body_size:
            self._reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
        request.body.append(body)

    def on_message_complete(self) -> None:
        request = self._reading
        assert request is not None
        self._reading = None
        self.deadline = 0.0  # in flight: the backend's timeout applies, not the client's
        self._queue.append(request)
        if len(self._queue) > MAX_PIPELINED:
            self._pause_reading()
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
        assert self._active is not None
        if not self._closed and self._transport is not None:
            tail = b"0\r\n\r\n" if self._response_chunked else b""
            if self._head or tail:
                self._transport.write(self._head + tail)
        self._head = b""
        self._active = None
        self._response_started = False
        self.flow = None
        self.on_lost = None
        if not self._response_keep_alive:
            self._close()
            return
        if not self._dispatching:
            self._dispatch()

    def abort(self) -> None:
        """Give up on the active response midway: the client sees the connection close."""
        self._active = None
        self.flow = None
        self.on_lost = None
        self._close()

    def error(self, status: int, message: str) -> None:
        """Answer the active request with a gateway error (the shape comes from the handler)."""
        self._handler.refuse(self, status, message)

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

    def _dispatch(self) -> None:
        self._dispatching = True
        try:
            while self._active is None and self._queue and not self._closed:
                request = self._queue.popleft()
                self._active = request
                if self._read_paused and len(self._queue) <= MAX_PIPELINED // 2:
                    self._resume_reading()
                try:
                    self._handler.handle(request, self)
                except Exception as exc:  # the exception boundary for the synchronous part
                    self._crash(request, exc)
                    self.fail_internal()
        finally:
            self._dispatching = False
        if self._active is not None or self._closed:
            return
        if self._pending_error is not None:
            status, message = self._pending_error
            self._pending_error = None
            self._send_error_and_close(status, message)
        elif self._draining:
            self._close()
        elif self._reading is None:
            self._arm(self._settings.keepalive_timeout)
        elif self._reading.expect_continue and not self._continue_sent:
            self._send_continue()

    def _reject(self, status: int, message: str) -> None:
        """Refuse the request being read; stop reading from this connection for good."""
        self._reading = None
        self._stop_reading()
        if self._active is None and not self._queue:
            self._send_error_and_close(status, message)
        else:
            self._pending_error = (status, message)
        raise _Rejected

    def _send_error_and_close(self, status: int, message: str) -> None:
        if self._closed:
            return
        request = Request(self._client)
        request.keep_alive = False
        self._active = request
        try:
            # Ends with end_response(), which closes (keep_alive is False).
            self._handler.refuse(self, status, message)
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

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._settings.max_header_size:
            self._reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request line and headers are too large")

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self._settings.max_body_size} bytes"

    def expired(self) -> None:
        if self._reading is not None:
            with contextlib.suppress(_Rejected):
                self._reject(HTTPStatus.REQUEST_TIMEOUT, "request was not received in time")
        elif self._active is None and not self._queue:
            self._close()

    def _arm(self, delay: float) -> None:
        self.deadline = self._connections.now() + delay

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self._transport is not None and not self._closed:
            self._read_paused = False
            self._transport.resume_reading()

    def _stop_reading(self) -> None:
        self._pause_reading()
        self._parser = httptools.HttpRequestParser(_Discard())

    def _close(self) -> None:
        self.deadline = 0.0
        if self._transport is not None and not self._closed:
            self._transport.close()
        self._closed = True
