"""One client request as the HTTP server parses it, and the per-worker budget its body is held under."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from gateway.wire.headers import Headers

_STATUS_LINES = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode()) for status in HTTPStatus
}
# Captured for every request, whatever the handler asks for: the connection itself needs them.
FRAMING_HEADERS = frozenset((b"host", b"content-length", b"transfer-encoding", b"expect", b"connection"))


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status


class Request:
    """One parsed request. Header names are lower-cased; values are raw bytes.

    `fields` holds the first value of each captured header (`Connection` values joined, as RFC 9110
    section 5.3 allows), filled in while the head is parsed. A request is handed to the handler when its
    head is complete; `complete` says whether its body has arrived too.
    """

    __slots__ = (
        "body",
        "body_size",
        "captured",
        "client",
        "complete",
        "declared",
        "discard",
        "dispatched",
        "expect_continue",
        "fields",
        "headers",
        "hosts",
        "http_version",
        "keep_alive",
        "method",
        "on_complete",
        "path",
        "query",
        "reserved",
        "target",
    )

    def __init__(self, client: str, captured: frozenset[bytes] = FRAMING_HEADERS) -> None:
        self.client = client
        self.captured = captured
        self.fields: dict[bytes, bytes] = {}
        self.hosts = 0
        self.target = b""
        self.method = ""  # set when the head is complete
        self.path = ""
        self.query = ""
        self.http_version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.headers: Headers = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.declared: int | None = None  # Content-Length; None for a chunked body
        self.reserved = 0  # bytes of the worker's body budget this request holds
        self.complete = False  # the whole body has arrived
        self.dispatched = False  # handed to the handler
        self.discard = False  # answered on its head: the rest of its body is read and dropped
        self.on_complete: Callable[[], None] | None = None  # the handler waits for the body

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case)."""
        if name in self.captured:
            return self.fields.get(name)
        for key, value in self.headers:
            if key == name:
                return value
        return None


class BodyBudget:
    """Request body bytes held in memory by one worker, all its connections together.

    A request reserves its declared length when its head is in (a chunked one, as its pieces arrive),
    and gives it back when its answer ends; over the limit, new requests get 503 and nothing already
    admitted is disturbed.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, request: Request, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        request.reserved += size
        return True

    def release(self, request: Request) -> None:
        self.used -= request.reserved
        request.reserved = 0
