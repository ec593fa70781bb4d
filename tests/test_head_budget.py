"""The head budget counts raw bytes as they arrive, in process with a recording transport.

However the bytes are cut into reads, a head within `max_header_size` is never refused (with pipelined
requests and large bodies before it in the same read), and a head over it always is, before it ends.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.routing.table import ServerSettings
from gateway.wire.deadlines import Deadlines
from gateway.wire.headers import Headers
from gateway.wire.http_server import ClientConnection, Request
from gateway.wire.request import FRAMING_HEADERS, BodyBudget

LIMIT = 4096
SETTINGS = ServerSettings(max_header_size=LIMIT)


class Recorder:
    """A handler that answers every request 200 once its body is in, and remembers refusals."""

    captured_headers = FRAMING_HEADERS

    def __init__(self) -> None:
        self.answered: list[int] = []

    def handle(self, request: Request, conn: ClientConnection) -> None:
        conn.read_body(request, lambda: self._answer(conn, 200))

    def _answer(self, conn: ClientConnection, status: int) -> None:
        self.answered.append(status)
        conn.respond(status, [], b"")

    def refuse(
        self, conn: ClientConnection, status: int, message: str, headers: Headers | None = None
    ) -> None:
        self._answer(conn, status)

    def crashed(self, conn: ClientConnection, request: Request | None, exc: BaseException) -> None:
        raise AssertionError(f"crashed: {exc!r}")


class Transport:
    def write(self, data: Any) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def feed(stream: bytes, cuts: list[int]) -> list[int]:
    loop = asyncio.new_event_loop()
    try:
        handler = Recorder()
        conn = ClientConnection(handler, SETTINGS, Deadlines(loop, 1.0), BodyBudget(1 << 30))
        conn.connection_made(Transport())  # type: ignore[arg-type]
        points = sorted({0, *(c % (len(stream) + 1) for c in cuts), len(stream)})
        for start, end in itertools.pairwise(points):
            conn.data_received(stream[start:end])
        return handler.answered
    finally:
        loop.close()


def request(head_size: int, body: bytes = b"", chunked: bool = False) -> bytes:
    start = b"POST /x HTTP/1.1\r\nhost: gw\r\n"
    framing = b"transfer-encoding: chunked\r\n" if chunked else b"content-length: %d\r\n" % len(body)
    padding = head_size - len(start) - len(framing) - len(b"x-pad: \r\n\r\n")
    head = start + framing + b"x-pad: " + b"p" * padding + b"\r\n\r\n"
    assert len(head) == head_size
    if chunked:
        return head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else head + b"0\r\n\r\n"
    return head + body


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=12), chunked=st.booleans())
def test_heads_within_the_budget_are_never_refused_however_they_are_cut(
    cuts: list[int], chunked: bool
) -> None:
    stream = (
        request(LIMIT - 64, b"b" * 100_000, chunked)  # a big body before the next head in the same read
        + request(LIMIT - 64)
        + request(200, b"{}", chunked)
        + request(LIMIT - 64, b"x" * 10)
    )
    assert feed(stream, cuts) == [200, 200, 200, 200]


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=12))
def test_a_head_over_the_budget_is_refused_before_it_ends(cuts: list[int]) -> None:
    endless = request(200, b"{}") + b"POST /x HTTP/1.1\r\nhost: gw\r\nx-endless: " + b"e" * (LIMIT + 200)
    assert feed(endless, cuts) == [200, 431]
