"""Hostile and broken clients against the real gateway process: one bad client costs others nothing.

Loopback only; every probe is bounded in time. The backend is the fake one (`fault_backend`, named as
such): its `echo` model answers what it received, `upgrade` answers 101, `afterbytes` sends stray bytes
on an idle connection. Memory is the gateway process's resident set (`VmRSS`), read before and after.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fault_backend import FaultBackend, fault_backend

from tests.support import GatewayProcess, free_port, gateway
from tests.test_limits_e2e import create_key

ROUTES = """
backends:
  fake: {{url: "http://127.0.0.1:{port}", timeout: 5s}}
  dead: {{url: "http://127.0.0.1:{dead}", timeout: 1s, connect_timeout: 500ms}}
models:
  echo:
    versions:
      "1": {{backend: fake, target: echo/1}}
  upgrade:
    versions:
      "1": {{backend: fake, target: upgrade/1}}
  afterbytes:
    versions:
      "1": {{backend: fake, target: afterbytes/1}}
  gone:
    versions:
      "1": {{backend: dead, target: gone/1}}
keys: {{required: true}}
"""
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def backend() -> Iterator[FaultBackend]:
    with fault_backend() as fb:
        yield fb


@pytest.fixture(scope="module")
def gw(backend: FaultBackend) -> Iterator[GatewayProcess]:
    with gateway(ROUTES.format(port=backend.port, dead=free_port())) as process:
        yield process


@pytest.fixture(scope="module")
def secret(gw: GatewayProcess) -> str:
    return create_key(gw, "hostile-suite")


def rss(process: GatewayProcess) -> int:
    assert process.process is not None
    with open(f"/proc/{process.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(process: GatewayProcess, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", process.port), timeout=timeout)


def read_head(sock: socket.socket, limit: float = 5.0) -> bytes:
    """The response head (status line and headers), or whatever came before the connection closed."""
    sock.settimeout(limit)
    data = b""
    with contextlib.suppress(ConnectionError):
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    return data


def read_response(sock: socket.socket, limit: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    data = read_head(sock, limit)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        rest += piece
    return int(lines[0].split(" ")[1]), headers, rest[:length]


def probe(process: GatewayProcess) -> float:
    """Seconds a fresh connection takes to get /v2/health/live answered."""
    started = time.monotonic()
    with connect(process, timeout=5) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: gw\r\n\r\n")
        status, _, _ = read_response(sock)
    assert status == 200
    return time.monotonic() - started


def closed_soon(sock: socket.socket, limit: float = 2.0) -> bool:
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def test_an_endless_header_gets_431_within_a_second_and_costs_no_memory(gw: GatewayProcess) -> None:
    before = rss(gw)
    with connect(gw) as sock:
        sock.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\nx-endless: ")
        started = time.monotonic()
        sent = 0
        answer = b""
        sock.setblocking(False)
        while time.monotonic() - started < 1.0 and sent < 3 * MiB:
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(b"a" * 65536)
            with contextlib.suppress(BlockingIOError):
                answer += sock.recv(65536)
            if answer:
                break
        sock.setblocking(True)
        answer += read_head(sock, 1.0)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert elapsed < 1.0
    assert rss(gw) - before < 4 * MiB


def test_unauthenticated_uploads_get_401_without_their_bodies_being_read(gw: GatewayProcess) -> None:
    before = rss(gw)
    head = b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n\r\n" % (32 * MiB)
    socks = [connect(gw) for _ in range(10)]
    try:
        for sock in socks:
            sock.sendall(head + b"x" * 65536)  # a little of the body; the rest never needs to go
        for sock in socks:
            status, headers, body = read_response(sock)
            assert status == 401, body
            assert headers.get("connection") == "close"  # 32 MiB is too much to read and drop
            assert closed_soon(sock)
    finally:
        for sock in socks:
            sock.close()
    assert rss(gw) - before < 64 * MiB
    # With Expect: 100-continue the client hears the 401 instead of "go ahead".
    with connect(gw) as sock:
        sock.sendall(head.replace(b"\r\n\r\n", b"\r\nexpect: 100-continue\r\n\r\n"))
        answer = read_head(sock)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
    assert b"100 Continue" not in answer


def test_a_refused_request_with_a_small_body_keeps_its_connection(gw: GatewayProcess, secret: str) -> None:
    with connect(gw) as sock:
        sock.sendall(b"POST /v2/models/nope/infer HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\n\r\nhello")
        status, headers, body = read_response(sock)
        assert status == 401 and headers.get("connection") != "close"
        sock.sendall(
            b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer %s\r\n"
            b"content-length: 2\r\n\r\n{}" % secret.encode()
        )
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["body"] == "{}"


def test_expect_100_continue_is_sent_only_after_the_checks_pass(gw: GatewayProcess, secret: str) -> None:
    with connect(gw) as sock:
        sock.sendall(
            b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer %s\r\n"
            b"content-length: 2\r\nexpect: 100-continue\r\n\r\n" % secret.encode()
        )
        assert read_head(sock).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"{}")
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["body"] == "{}"


def test_a_client_that_never_reads_is_paused_and_others_are_served(gw: GatewayProcess, secret: str) -> None:
    before = rss(gw)
    request = (
        b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer %s\r\n"
        b"content-length: 1024\r\n\r\n%s" % (secret.encode(), b"z" * 1024)
    )
    stop = threading.Event()
    written = [0]

    def flood() -> None:
        with connect(gw) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(0.5)
            while not stop.is_set():
                try:
                    written[0] += sock.send(request * 64)
                except TimeoutError:
                    continue  # the gateway stopped reading from us: backpressure
                except OSError:
                    return

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    latencies = []
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            latencies.append(probe(gw))
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(5)
    assert written[0] > 0
    assert max(latencies) < 0.5, latencies
    assert rss(gw) - before < 64 * MiB


def test_a_thousand_slow_connections_do_not_stop_other_clients(gw: GatewayProcess, secret: str) -> None:
    slow = []
    try:
        for _ in range(1000):
            sock = connect(gw)
            sock.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\n")  # ... and then nothing
            slow.append(sock)
        for _ in range(5):
            assert probe(gw) < 0.5
            with connect(gw) as sock:
                sock.sendall(
                    b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer %s\r\n"
                    b"content-length: 2\r\n\r\n{}" % secret.encode()
                )
                assert read_response(sock)[0] == 200
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize(
    "path", ["/v2/models/echo", "/v2/models/echo/ready", "/v2/models/echo/versions/1/config", "/v2/models/x"]
)
def test_anonymous_metadata_requests_get_401(gw: GatewayProcess, path: str) -> None:
    with connect(gw) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nhost: gw\r\n\r\n" % path.encode())
        status, _, body = read_response(sock)
    assert status == 401, body
    assert b"fake" not in body and b"echo/1" not in body  # no backend name, no Triton target


def test_no_error_text_names_a_backend_address(
    gw: GatewayProcess, backend: FaultBackend, secret: str
) -> None:
    auth = b"authorization: Bearer %s\r\n" % secret.encode()
    probes = [
        b"POST /v2/models/gone/infer HTTP/1.1\r\nhost: gw\r\n%scontent-length: 2\r\n\r\n{}" % auth,
        b"POST /v2/models/nope/infer HTTP/1.1\r\nhost: gw\r\n%scontent-length: 2\r\n\r\n{}" % auth,
        b"GET /v2/models/gone HTTP/1.1\r\nhost: gw\r\n%s\r\n" % auth,
        b"GET /v2/models/gone/ready HTTP/1.1\r\nhost: gw\r\n%s\r\n" % auth,
        b"GET /v2/health/ready HTTP/1.1\r\nhost: gw\r\n\r\n",
    ]
    answers = []
    for request in probes:
        with connect(gw) as sock:
            sock.sendall(request)
            answers.append(read_response(sock))
    assert [status for status, _, _ in answers][:2] == [503, 404]
    for status, _, body in answers:
        assert b"127.0.0.1" not in body and str(backend.port).encode() not in body, body
        if status >= 400:
            assert "error" in json.loads(body)
    assert b"models served here" not in answers[1][2]


def test_an_upgrading_or_chatty_backend_costs_one_502_and_nothing_else(
    gw: GatewayProcess, secret: str
) -> None:
    auth = b"authorization: Bearer %s\r\n" % secret.encode()

    def infer(sock: socket.socket, model: bytes) -> int:
        sock.sendall(
            b"POST /v2/models/%s/infer HTTP/1.1\r\nhost: gw\r\n%scontent-length: 2\r\n\r\n{}" % (model, auth)
        )
        return read_response(sock)[0]

    with connect(gw) as sock:
        assert infer(sock, b"upgrade") == 502
        assert infer(sock, b"echo") == 200  # the same client connection goes on
        statuses = [infer(sock, b"afterbytes")]
        time.sleep(0.5)  # the stray bytes arrive on the idle upstream connection, which is dropped
        statuses += [infer(sock, b"afterbytes") for _ in range(3)]
        assert statuses.count(502) <= 1 and all(s in (200, 502) for s in statuses), statuses
        assert infer(sock, b"echo") == 200
    assert gw.process is not None and gw.process.poll() is None
