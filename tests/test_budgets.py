"""Per-worker budgets, end to end: open connections and request bytes held in memory.

Over a budget, new work gets 503 with Retry-After and the work already admitted is not disturbed. The
backend is the fake one (`fault_backend`, named as such); its `echo` model returns the body it got.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
from fault_backend import FaultBackend, fault_backend

from tests.support import GatewayProcess, gateway
from tests.test_hostile_clients import connect, read_response

ROUTES = """
backends:
  fake: {{url: "http://127.0.0.1:{port}", timeout: 5s}}
models:
  echo:
    versions:
      "1": {{backend: fake, target: echo/1}}
  big:
    versions:
      "1": {{backend: fake, target: big/1}}
keys: {{required: false}}
server: {{max_connections: 20, max_buffered_bytes: 1MiB, max_body_size: 4MiB}}
"""


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayProcess]:
    backend: FaultBackend
    with fault_backend() as backend, gateway(ROUTES.format(port=backend.port)) as process:
        yield process


def post_head(size: int) -> bytes:
    return b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n\r\n" % size


def test_connections_over_the_cap_get_503_and_the_others_keep_working(gw: GatewayProcess) -> None:
    held = [connect(gw) for _ in range(20)]
    time.sleep(0.2)
    try:
        with connect(gw) as extra:
            status, headers, body = read_response(extra)
            assert status == 503 and headers["retry-after"] == "1"
            assert "too many open connections" in json.loads(body)["error"]
        held[0].sendall(post_head(2) + b"{}")  # an admitted connection is served as before
        status, _, body = read_response(held[0])
        assert status == 200 and json.loads(body)["body"] == "{}"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    with connect(gw) as again:  # and capacity comes back when they close
        again.sendall(post_head(2) + b"{}")
        assert read_response(again)[0] == 200


def test_a_body_over_the_worker_budget_gets_503_and_the_one_in_flight_finishes(gw: GatewayProcess) -> None:
    size = 700 * 1024
    with connect(gw) as first, connect(gw) as second:
        first.sendall(post_head(size) + b"a" * 1000)  # reserves 700 KiB of the 1 MiB, still uploading
        time.sleep(0.2)
        second.sendall(post_head(size))
        status, headers, body = read_response(second)
        assert status == 503 and headers["retry-after"] == "1"
        assert "too many request bodies" in json.loads(body)["error"]
        first.sendall(b"a" * (size - 1000))
        status, _, body = read_response(first, limit=10)
        assert status == 200 and len(json.loads(body)["body"]) == size
    with connect(gw) as later:  # the budget was given back
        later.sendall(post_head(size) + b"b" * size)
        status, _, body = read_response(later, limit=10)
        assert status == 200


def test_a_declared_length_over_the_limit_is_413_before_the_body(gw: GatewayProcess) -> None:
    with connect(gw) as sock:
        sock.sendall(post_head(5 * 1024 * 1024))
        status, _, body = read_response(sock)
    assert status == 413 and "larger than the limit" in json.loads(body)["error"]


def test_chunked_framing_without_end_gets_431(gw: GatewayProcess) -> None:
    head = b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n"
    with connect(gw) as sock:
        sock.sendall(head + b"1;" + b"e" * 4096)
        try:
            for _ in range(20):
                sock.sendall(b"e" * 4096)  # a chunk extension that never ends
        except OSError:
            pass
        sock.settimeout(5)
        answer = sock.recv(200)
    assert answer.startswith(b"HTTP/1.1 431"), answer


def test_a_client_stalled_past_the_write_timeout_is_cut_off() -> None:
    routes = ROUTES.replace("max_connections: 20,", "max_connections: 20, write_timeout: 500ms,")
    with fault_backend() as backend, gateway(routes.format(port=backend.port)) as process:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect(("127.0.0.1", process.port))
        body = b"4000000"  # the fake backend's `big` answers this many bytes
        request = post_head(len(body)).replace(b"/echo/", b"/big/") + body
        sock.sendall(request * 10)  # ten big answers it never reads
        time.sleep(2.5)
        sock.settimeout(1)
        received = 0
        closed = False
        try:
            while True:
                piece = sock.recv(1 << 20)
                if not piece:
                    closed = True
                    break
                received += len(piece)
        except ConnectionResetError:
            closed = True  # aborted: the reset can overtake the bytes still buffered
        except TimeoutError:
            pass  # still open and silent
        sock.close()
        assert closed, "the stalled client was never cut off"
