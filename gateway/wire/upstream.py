"""Pooled keep-alive HTTP/1.1 connections to backends, with responses parsed by httptools.

The pool hands out connections through callbacks rather than awaitables: when an idle connection is
there (the common case under load) the request is written in the same call, with no task or future.
Only opening a new connection needs a task. A connection that fails, times out or is abandoned midway
is closed, never returned to the pool. A connection goes back to the pool only after the exchange that
used it has been told its response is done, and never if that exchange raised: a waiter that gets the
connection must not receive anything meant for the one before it.

There is deliberately no retry: a request may have reached the model before its connection failed,
and inference is not always idempotent. Idle connections are evicted before a typical server's
keep-alive timeout so that a request rarely meets a connection the server is about to close.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Protocol, cast

import httptools

from gateway.routing.table import Backend
from gateway.wire.deadlines import Deadlines, resolution_for
from gateway.wire.headers import Headers

log = logging.getLogger("gateway.upstream")

IDLE_TIMEOUT = 30.0  # seconds an idle pooled connection is kept
SMALL_WRITE = 16384  # bodies up to this size are copied into the head's buffer rather than sent apart


class Failure(Enum):
    CONNECT = "connect"  # nothing reached the backend
    TIMEOUT = "timeout"
    CLOSED = "closed"  # the backend closed the connection before the response was complete
    PROTOCOL = "protocol"  # the backend sent something that is not HTTP/1.1


class UpstreamListener(Protocol):
    """Receives one upstream response."""

    def upstream_headers(self, status: int, headers: Headers, content_length: int | None) -> None: ...

    def upstream_body(self, data: bytes) -> None: ...

    def upstream_done(self) -> None: ...

    def upstream_failed(self, failure: Failure, detail: str) -> None: ...

    def upstream_crashed(self, exc: BaseException) -> None:
        """One of the listener's own callbacks raised: its bug, which it reports (the wire does not)."""


Acquired = Callable[["UpstreamConnection | None", str], None]


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._listener: UpstreamListener | None = None
        self._headers: Headers = []
        self._content_length: int | None = None
        self._chunked = False
        self._headers_done = False
        self._interim = False  # a 1xx response: skipped, the final one follows on the same exchange
        self._closed = False
        self.deadline = 0.0  # busy: the response's timeout; idle: when to close it (see Deadlines)
        self._paused_left: float | None = None  # reading paused for the client: the backend's time left

    # -- use by the proxy --------------------------------------------------------------------------

    def send(self, data: list[bytes], listener: UpstreamListener) -> None:
        """Write one request and deliver its response to `listener`."""
        assert self._transport is not None and self._listener is None
        self._listener = listener
        self._headers = []
        self._content_length = None
        self._chunked = False
        self._headers_done = False
        self._paused_left = None
        self.deadline = self._pool.now() + self._pool.backend.timeout
        if len(data) <= 2 and len(data[-1]) <= SMALL_WRITE:
            self._transport.write(b"".join(data))  # one buffer is one send(); cheaper than writelines
        else:
            self._transport.writelines(data)

    def abandon(self) -> None:
        """The caller no longer wants the response in flight; the connection cannot be reused."""
        self._listener = None
        self._close()

    def pause_reading(self) -> None:
        """Stop reading while the client does not read (backpressure).

        The backend's timeout stops too: its answer waiting on the client is not the backend being
        slow. How long a client may read nothing is the client connection's `write_timeout`.
        """
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()
            if self._listener is not None and self._paused_left is None:
                self._paused_left = max(0.0, self.deadline - self._pool.now())
                self.deadline = 0.0

    def resume_reading(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()
            if self._paused_left is not None:
                self.deadline = self._pool.now() + self._paused_left
                self._paused_left = None

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        if self._listener is None:
            # Bytes on an idle connection belong to no exchange (a confused or hostile backend): drop it.
            log.warning("backend %s sent data on an idle connection; closed it", self._pool.backend.name)
            self._close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Failure.PROTOCOL, "the backend answered with a protocol upgrade")
        except httptools.HttpParserError as exc:
            if exc.__context__ is not None and not isinstance(exc.__context__, httptools.HttpParserError):
                self._listener_raised(exc.__context__)
                return
            self._fail(Failure.PROTOCOL, f"invalid HTTP response: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.deadline = 0.0
        self._pool.discard(self)
        if self._listener is None:
            return
        if self._headers_done and self._content_length is None and not self._chunked:
            # A response without length or chunking ends when the connection does.
            self._finish(reusable=False)
        else:
            self._fail(Failure.CLOSED, "the backend closed the connection before the response was complete")

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101:  # Switching Protocols: not an answer to an inference request
            self._fail(Failure.PROTOCOL, "the backend answered 101 Switching Protocols")
            return
        if 100 <= status < 200:
            self._interim = True
            self._headers = []
            return
        self._headers_done = True
        for name, value in self._headers:
            if name == b"content-length":
                self._content_length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
        if self._listener is not None:
            self._listener.upstream_headers(status, self._headers, self._content_length)

    def on_body(self, body: bytes) -> None:
        if self._listener is not None:
            self._listener.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._finish(reusable=self._parser.should_keep_alive())

    # -- internals ---------------------------------------------------------------------------------

    def _finish(self, reusable: bool) -> None:
        if self._paused_left is not None:  # ended while paused: the next exchange must be read
            self.resume_reading()
        self.deadline = 0.0
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.upstream_done()  # first: release may hand this connection to a waiter at once
            except Exception as exc:
                self._listener = listener
                self._listener_raised(exc)
                return
        if reusable and not self._closed:
            self._pool.release(self)
        else:
            self._close()

    def _listener_raised(self, exc: BaseException) -> None:
        """A listener's callback raised (its bug): drop the connection, deliver nothing more to anyone.

        The listener is told once, so that its client is not left waiting; it reports the error.
        """
        listener, self._listener = self._listener, None
        self._close()
        if listener is None:
            log.error("error in an upstream response handler; connection closed", exc_info=exc)
            return
        try:
            listener.upstream_crashed(exc)
        except Exception:
            log.exception("error reporting an error in an upstream response handler")

    def _fail(self, failure: Failure, detail: str) -> None:
        listener, self._listener = self._listener, None
        self._close()
        if listener is not None:
            try:
                listener.upstream_failed(failure, detail)
            except Exception:
                log.exception("error in an upstream response handler")

    def expired(self) -> None:
        if self._listener is None:  # idle too long: close before the server does it under a request
            self._close()
            return
        timeout = self._pool.backend.timeout
        self._fail(Failure.TIMEOUT, f"backend {self._pool.backend.name} did not answer within {timeout:g}s")

    def _close(self) -> None:
        self.deadline = 0.0
        if not self._closed:
            self._closed = True
            if self._transport is not None:
                self._transport.close()
            self._pool.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed


class _Waiter:
    """A request waiting for a pooled connection, until its queue deadline."""

    __slots__ = ("callback", "deadline", "pool")

    def __init__(self, pool: Pool, callback: Acquired, deadline: float) -> None:
        self.pool = pool
        self.callback: Acquired | None = callback
        self.deadline = deadline

    def expired(self) -> None:
        self.pool._waiter_expired(self)


class Pool:
    """Keep-alive connections to one backend, at most `backend.max_connections` at a time.

    When all are busy a request waits in a FIFO queue, at most `backend.max_queue` of them and each at
    most `backend.queue_timeout` (as httpcore's pool timeout): a backend that stops answering fills its
    connections, and the requests behind them get a 503 instead of waiting for ever.
    """

    def __init__(self, backend: Backend, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.loop = loop
        self._idle: list[UpstreamConnection] = []
        self._all: Deadlines[UpstreamConnection] = Deadlines(loop, resolution_for(backend.timeout))
        self._opening = 0
        self._waiters: deque[_Waiter] = deque()
        self._waiting: Deadlines[_Waiter] = Deadlines(loop, resolution_for(backend.queue_timeout))
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def now(self) -> float:
        return self._all.now()

    @property
    def size(self) -> int:
        return len(self._all) + self._opening

    def acquire(self, callback: Acquired) -> None:
        """Call `callback(connection, "")` with a ready connection, or `callback(None, why)`."""
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                callback(connection, "")
                return
        backend = self.backend
        if self.size < backend.max_connections:
            self._open(callback)
        elif len(self._waiting) >= backend.max_queue:
            callback(
                None, f"backend {backend.name} is busy: {backend.max_queue} requests are waiting already"
            )
        else:
            waiter = _Waiter(self, callback, self.now() + backend.queue_timeout)
            self._waiters.append(waiter)
            self._waiting.add(waiter)

    def acquire_if_free(self, callback: Acquired) -> bool:
        """Acquire only if no request would wait for it (shadow copies never take a real request's turn)."""
        free = any(not c.closed for c in self._idle) or (
            self.size < self.backend.max_connections and not self._waiting
        )
        if free:
            self.acquire(callback)
        return free

    def release(self, connection: UpstreamConnection) -> None:
        if self._closed:
            connection.abandon()
            return
        waiter = self._next_waiter()
        if waiter is not None:
            waiter(connection, "")
            return
        connection.deadline = self.now() + IDLE_TIMEOUT
        self._idle.append(connection)

    def discard(self, connection: UpstreamConnection) -> None:
        self._all.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        self._open_for_waiter()

    def close(self) -> None:
        """Close idle connections now; busy ones close when their response ends."""
        self._closed = True
        for connection in list(self._idle):
            connection.abandon()
        self._idle.clear()
        if not self._all:
            self._all.close()
        while (waiter := self._next_waiter()) is not None:
            waiter(None, f"backend {self.backend.name} pool is closed")
        self._waiting.close()

    def _next_waiter(self) -> Acquired | None:
        while self._waiters:
            waiter = self._waiters.popleft()
            callback, waiter.callback = waiter.callback, None
            if callback is not None:
                self._waiting.discard(waiter)
                return callback
        return None

    def _waiter_expired(self, waiter: _Waiter) -> None:
        callback, waiter.callback = waiter.callback, None
        self._waiting.discard(waiter)
        if callback is not None:
            backend = self.backend
            callback(
                None, f"no connection to backend {backend.name} was free within {backend.queue_timeout:g}s"
            )

    def _open_for_waiter(self) -> None:
        if self.size < self.backend.max_connections and not self._closed:
            waiter = self._next_waiter()
            if waiter is not None:
                self._open(waiter)

    def _open(self, callback: Acquired) -> None:
        self._opening += 1
        task = self.loop.create_task(self._connect(callback))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, callback: Acquired) -> None:
        backend = self.backend
        try:
            _, protocol = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), backend.host, backend.port),
                backend.connect_timeout,
            )
        except Exception as exc:  # whatever it was, the opening slot is given back
            self._opening -= 1
            if isinstance(exc, TimeoutError):
                reason = "timed out"
            elif isinstance(exc, OSError):
                # From the errno: asyncio's strerror names the address ("Connect call failed (...)").
                reason = os.strerror(exc.errno).lower() if exc.errno else "connection failed"
            else:
                log.error("error connecting to backend %s", backend.name, exc_info=exc)
                reason = "internal error"
            # The address goes to the log only: clients learn nothing about where backends live.
            log.debug(
                "cannot connect to backend %s at %s:%d: %s", backend.name, backend.host, backend.port, reason
            )
            callback(None, f"cannot connect to backend {backend.name}: {reason}")
            self._open_for_waiter()
            return
        except BaseException:  # cancelled (shutting down)
            self._opening -= 1
            raise
        self._opening -= 1
        self._all.add(protocol)
        callback(protocol, "")
