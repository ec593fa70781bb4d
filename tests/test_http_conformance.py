"""HTTP/1.1 conformance of the client-facing server, asserted the way a client on a raw socket sees it.

A real gateway subprocess forwards to the FAKE backend in `fault_backend.py`, which misbehaves on demand
(echo, chunked, cut, drop, garbage, hang, hop, big). A recorder wrapped around the fake backend's request
reader lists every request the backend received, so the smuggling tests can prove that nothing the gateway
refused ever reached it.

Timing assertions use wide margins: the machine these run on is small and shared.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import fault_backend as fault_module
import pytest
from fault_backend import FaultBackend, fault_backend
from support import GatewayProcess, RawClient, Response, free_port, gateway, request

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 2.0
BACKEND_TIMEOUT = 1.0
MAX_BODY = 1024 * 1024
MAX_HEADER = 8 * 1024
MAX_HEADERS = 50

ROUTES = """
backends:
  fb: {{url: "http://127.0.0.1:{port}", timeout: 1s}}
  fb-patient: {{url: "http://127.0.0.1:{port}", timeout: 60s}}
  dead: {{url: "http://127.0.0.1:{dead_port}", timeout: 1s, connect_timeout: 1s}}
models:
  echo: {{versions: {{"1": {{backend: fb, target: echo/1}}}}}}
  chunked: {{versions: {{"1": {{backend: fb, target: chunked/1}}}}}}
  cut: {{versions: {{"1": {{backend: fb, target: cut/1}}}}}}
  drop: {{versions: {{"1": {{backend: fb, target: drop/1}}}}}}
  garbage: {{versions: {{"1": {{backend: fb, target: garbage/1}}}}}}
  hang: {{versions: {{"1": {{backend: fb, target: hang/1}}}}}}
  hop: {{versions: {{"1": {{backend: fb, target: hop/1}}}}}}
  big: {{versions: {{"7": {{backend: fb-patient, target: big/1}}}}}}
  nowhere: {{versions: {{"1": {{backend: dead, target: echo/1}}}}}}
keys: {{required: false}}
server:
  header_timeout: 1s
  body_timeout: 1s
  keepalive_timeout: 2s
  max_body_size: 1MiB
  max_header_size: 8KiB
  max_headers: 50
"""


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend_seen() -> Iterator[list[tuple[str, dict[str, str]]]]:
    """Every (path, headers) the fake backend has read, in order."""
    seen: list[tuple[str, dict[str, str]]] = []
    original = fault_module._read_request

    async def recording(reader: Any) -> tuple[str, dict[str, str], bytes]:
        path, headers, body = await original(reader)
        seen.append((path, headers))
        return path, headers, body

    fault_module._read_request = recording
    try:
        yield seen
    finally:
        fault_module._read_request = original


@pytest.fixture(scope="module")
def backend(backend_seen: list[tuple[str, dict[str, str]]]) -> Iterator[FaultBackend]:
    with fault_backend() as fb:
        yield fb


@pytest.fixture(scope="module")
def gw(backend: FaultBackend) -> Iterator[GatewayProcess]:
    with gateway(ROUTES.format(port=backend.port, dead_port=free_port())) as process:
        yield process


@pytest.fixture(autouse=True)
def _gateway_survives(gw: GatewayProcess) -> Iterator[None]:
    yield
    assert gw.process is not None
    assert gw.process.poll() is None, f"the gateway died:\n{gw.log()[-4000:]}"


# -- helpers ----------------------------------------------------------------------------------------------


def connect(gw: GatewayProcess, timeout: float = 10.0) -> RawClient:
    client = RawClient(gw.port, timeout=timeout)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def post(model: str, body: bytes = b"", headers: dict[str, str] | None = None, version: str = "1.1") -> bytes:
    return request("POST", f"/predict/{model}", body, headers, version)


def echoed(response: Response) -> dict[str, Any]:
    """What the echo backend says it received."""
    assert response.status == 200, (response.status, response.body[:300])
    result: dict[str, Any] = json.loads(response.body)
    return result


def error_of(response: Response) -> str:
    assert (response.header("content-type") or "").startswith("application/json")
    payload = json.loads(response.body)
    assert isinstance(payload, dict) and isinstance(payload.get("error"), str) and payload["error"]
    return payload["error"]


def chunked(*pieces: bytes) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces if piece)
    return out + b"0\r\n\r\n"


def chunked_head(model: str, headers: str = "") -> bytes:
    head = f"POST /predict/{model} HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n{headers}\r\n"
    return head.encode()


def wait_closed(client: RawClient, within: float) -> tuple[bool, bytes]:
    """Read until the server closes (True) or `within` seconds pass (False); also returns what arrived
    (including anything the client had already buffered)."""
    deadline = time.monotonic() + within
    data, client._buffer = client._buffer, b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, data
        client.sock.settimeout(left)
        try:
            chunk = client.sock.recv(65536)
        except TimeoutError:
            return False, data
        except ConnectionResetError:
            return True, data
        if not chunk:
            return True, data
        data += chunk


def assert_closes(client: RawClient, within: float = 3.0) -> None:
    closed, extra = wait_closed(client, within)
    assert closed, f"the connection was still open after {within}s"
    assert extra == b"", f"unexpected bytes after the response: {extra[:200]!r}"


def paths_seen(seen: list[tuple[str, dict[str, str]]]) -> list[str]:
    """Inference paths the backend saw; the gateway's periodic readiness probes are left out."""
    return [path for path, _ in seen if not (path.startswith("/v2/health/") or path.endswith("/ready"))]


def backend_round_trip(gw: GatewayProcess) -> None:
    """One echo through a fresh connection: anything forwarded before it has reached the backend by now."""
    with connect(gw) as client:
        client.send(post("echo", b"probe"))
        assert client.read_response().status == 200


# -- chunked request bodies -------------------------------------------------------------------------------


def test_chunked_request_body_reaches_backend_dechunked(gw: GatewayProcess) -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]}]}'
    with connect(gw) as client:
        client.send(chunked_head("echo") + chunked(body[:10], body[10:50], body[50:]))
        got = echoed(client.read_response())
    assert got["body"].encode("latin-1") == body
    assert got["headers"]["content-length"] == str(len(body))
    assert "transfer-encoding" not in got["headers"]


def test_chunk_extensions_are_ignored(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(chunked_head("echo") + b'5;name=value\r\nhello\r\n6;x;y="q"\r\n world\r\n0;last\r\n\r\n')
        got = echoed(client.read_response())
    assert got["body"] == "hello world"
    assert got["headers"]["content-length"] == "11"


def test_chunked_body_split_across_many_small_sends(gw: GatewayProcess) -> None:
    body = bytes(range(32, 127)) * 3
    wire = chunked_head("echo") + chunked(*(body[i : i + 7] for i in range(0, len(body), 7)))
    with connect(gw) as client:
        for i in range(0, len(wire), 5):  # splits sizes, CRLFs and data at every possible place
            client.send(wire[i : i + 5])
            if i % 50 == 0:
                time.sleep(0.002)
        got = echoed(client.read_response())
    assert got["body"].encode("latin-1") == body
    assert got["headers"]["content-length"] == str(len(body))


def test_chunked_request_trailers_are_not_merged_into_forwarded_headers(gw: GatewayProcess) -> None:
    # RFC 9110 section 6.5.1: a trailer field must not be merged into the header section. The gateway
    # de-chunks the body, so it must discard trailers, not forward them upstream as headers (nor route
    # on them: here a trailer X-Model-Version would pin a version that does not exist).
    with connect(gw) as client:
        client.send(
            chunked_head("echo") + b"3\r\nabc\r\n0\r\nX-Trailer-Field: sneaky\r\nX-Model-Version: 9\r\n\r\n"
        )
        response = client.read_response()
    assert response.status == 200, (response.status, response.body)
    got = echoed(response)
    assert got["body"] == "abc"
    assert "x-trailer-field" not in got["headers"]


# -- chunked responses from upstream ----------------------------------------------------------------------


def test_chunked_upstream_response_to_http11_client_stays_chunked(gw: GatewayProcess) -> None:
    body = bytes(range(256)) * 4
    with connect(gw) as client:
        client.send(post("chunked", body))
        response = client.read_response()
        assert response.status == 200
        assert response.chunked
        assert response.header("content-length") is None
        assert response.body == body
        client.send(post("echo", b"after"))  # the connection is still usable
        assert echoed(client.read_response())["body"] == "after"


def test_chunked_upstream_response_to_http10_client_is_delimited_by_close(gw: GatewayProcess) -> None:
    body = bytes(range(256)) * 4
    with connect(gw) as client:
        client.send(post("chunked", body, version="1.0"))
        response = client.read_response()  # no length, not chunked: reads to EOF
    assert response.status == 200
    assert not response.chunked
    assert response.header("transfer-encoding") is None
    assert response.header("content-length") is None
    assert (response.header("connection") or "").lower() == "close"
    assert response.body == body


# -- pipelining ------------------------------------------------------------------------------------------


def test_pipelined_requests_answered_complete_and_in_order(gw: GatewayProcess) -> None:
    wire = (
        post("echo", b"first")
        + post("echo", b"second")
        + post("unknown-model", b"x")
        + post("echo", b"third")
    )
    with connect(gw) as client:
        client.send(wire)
        responses = [client.read_response() for _ in range(4)]
    assert [r.status for r in responses] == [200, 200, 404, 200]
    assert [echoed(r)["body"] for r in (responses[0], responses[1], responses[3])] == [
        "first",
        "second",
        "third",
    ]
    assert "unknown-model" in error_of(responses[2])


def test_many_pipelined_requests_in_one_send(gw: GatewayProcess) -> None:
    count = 60  # more than the gateway queues before it stops reading
    with connect(gw) as client:
        client.send(b"".join(post("echo", b"n%d" % i) for i in range(count)))
        bodies = [echoed(client.read_response())["body"] for _ in range(count)]
    assert bodies == [f"n{i}" for i in range(count)]


def test_pipelined_request_behind_a_slow_one_still_answered(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("hang", b"slow") + post("echo", b"behind"))
        slow = client.read_response()
        fast = client.read_response()
    assert slow.status == 504
    assert echoed(fast)["body"] == "behind"


# -- keep-alive -------------------------------------------------------------------------------------------


def test_sequential_requests_share_one_connection(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        for i in range(5):
            client.send(post("echo", b"req%d" % i))
            response = client.read_response()
            assert echoed(response)["body"] == f"req{i}"
            assert response.header("connection") is None
        assert not client.is_closed(wait=0.2)


def test_connection_close_is_honoured(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("echo", b"bye", {"Connection": "close"}))
        response = client.read_response()
        assert echoed(response)["body"] == "bye"
        assert (response.header("connection") or "").lower() == "close"
        assert_closes(client)


def test_http10_without_keep_alive_closes(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("echo", b"old", version="1.0"))
        response = client.read_response()
        assert echoed(response)["body"] == "old"
        assert (response.header("connection") or "").lower() == "close"
        assert_closes(client)


def test_http10_with_keep_alive_stays_open(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        for i in range(3):
            client.send(post("echo", b"ka%d" % i, {"Connection": "keep-alive"}, version="1.0"))
            response = client.read_response()
            assert echoed(response)["body"] == f"ka{i}"
            assert (response.header("connection") or "").lower() == "keep-alive"
            assert response.header("content-length") is not None
        assert not client.is_closed(wait=0.2)


def test_half_close_after_a_request_still_gets_the_answer(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("echo", b"last-words"))
        client.sock.shutdown(socket.SHUT_WR)
        assert echoed(client.read_response())["body"] == "last-words"
        assert_closes(client)


def test_half_close_after_pipelined_requests_answers_all_of_them(gw: GatewayProcess) -> None:
    # A client may send its requests and shut down its side at once; every request already received
    # must be answered before the gateway closes (it may say connection: close on the last one only).
    # The first request is slow (504 after the backend timeout), so the end of input surely arrives while
    # it is in flight and the other two wait in the queue.
    with connect(gw) as client:
        client.send(post("hang", b"one") + post("echo", b"two") + post("echo", b"three"))
        client.sock.shutdown(socket.SHUT_WR)
        statuses = []
        for _ in range(3):
            try:
                statuses.append(client.read_response().status)
            except ConnectionError:
                break
        assert_closes(client)
    assert statuses == [504, 200, 200]


# -- Expect: 100-continue ---------------------------------------------------------------------------------


def test_expect_100_continue_before_body(gw: GatewayProcess) -> None:
    body = b'{"inputs": []}'
    head = post("echo", b"", {"Content-Length": str(len(body)), "Expect": "100-continue"})
    with connect(gw) as client:
        client.send(head)
        interim = client.read_interim()
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        client.send(body)
        got = echoed(client.read_response())
    assert got["body"].encode() == body
    assert "expect" not in got["headers"]


def test_expect_100_continue_with_oversized_length_gets_413_without_100(gw: GatewayProcess) -> None:
    head = post("echo", b"", {"Content-Length": str(MAX_BODY + 1), "Expect": "100-continue"})
    with connect(gw) as client:
        client.send(head)
        response = client.read_response()  # the first thing to arrive is the final response
        assert response.status == 413
        error_of(response)
        assert_closes(client)


# -- limits -----------------------------------------------------------------------------------------------


def test_headers_over_max_header_size_get_431(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("echo", b"x", {"X-Big": "a" * (MAX_HEADER + 100)}))
        response = client.read_response()
        assert response.status == 431
        error_of(response)
        assert_closes(client)


def test_too_many_headers_get_431(gw: GatewayProcess) -> None:
    headers = {f"X-H{i}": str(i) for i in range(MAX_HEADERS + 10)}
    with connect(gw) as client:
        client.send(post("echo", b"x", headers))
        response = client.read_response()
        assert response.status == 431
        error_of(response)
        assert_closes(client)


def test_headers_at_the_limit_are_accepted(gw: GatewayProcess) -> None:
    headers = {f"X-H{i}": str(i) for i in range(MAX_HEADERS - 2)}  # + Host + Content-Length
    with connect(gw) as client:
        client.send(post("echo", b"ok", headers))
        got = echoed(client.read_response())
    assert got["headers"]["x-h0"] == "0"


def test_content_length_over_limit_gets_413_and_close(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("echo", b"", {"Content-Length": str(MAX_BODY + 1)}) + b"x" * 1000)
        response = client.read_response()
        assert response.status == 413
        assert (response.header("connection") or "").lower() == "close"
        error_of(response)
        assert_closes(client)


def test_chunked_body_growing_over_limit_gets_413(gw: GatewayProcess, backend_seen: list) -> None:
    before = len(backend_seen)
    piece = b"y" * 65536
    wire = chunked_head("echo", "X-Marker: grows\r\n") + b"".join(
        b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(MAX_BODY // len(piece) + 2)
    )
    with connect(gw) as client:
        # The gateway may close before it has read everything; its answer is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.send(wire)
        response = client.read_response()
        assert response.status == 413
        error_of(response)
        assert wait_closed(client, 3.0)[0]
    backend_round_trip(gw)
    assert not any(headers.get("x-marker") == "grows" for _, headers in backend_seen[before:])


# -- request smuggling and malformed heads ----------------------------------------------------------------

SMUGGLED = b"POST /predict/echo?smuggled=1 HTTP/1.1\r\nHost: gateway\r\nContent-Length: 0\r\n\r\n"
ECHO = b"POST /predict/echo HTTP/1.1\r\nHost: gateway\r\n"  # request line and Host; the rest varies

SMUGGLING_ATTEMPTS = {
    "cl-then-te": ECHO
    + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % (5 + len(SMUGGLED))
    + b"0\r\n\r\n"
    + SMUGGLED,
    "te-then-cl": ECHO
    + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
    + b"%x\r\n" % len(SMUGGLED)
    + SMUGGLED
    + b"\r\n0\r\n\r\n",
    "two-content-lengths": ECHO
    + b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
    + SMUGGLED,
    "te-gzip": ECHO + b"Transfer-Encoding: gzip\r\nContent-Length: 0\r\n\r\n" + SMUGGLED,
    "te-not-final-chunked": ECHO + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-xchunked": ECHO + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-twice": ECHO
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "space-before-colon": ECHO + b"Transfer-Encoding : chunked\r\nContent-Length: 0\r\n\r\n" + SMUGGLED,
    "bare-lf-line-endings": b"POST /predict/echo HTTP/1.1\nHost: gateway\nContent-Length: 0\n\n" + SMUGGLED,
    "bare-lf-in-headers": ECHO + b"X-A: b\nContent-Length: 0\r\n\r\n" + SMUGGLED,
    "obs-fold": ECHO + b"X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n" + SMUGGLED,
    "bare-cr-in-value": ECHO + b"X-A: a\rb\r\nContent-Length: 0\r\n\r\n" + SMUGGLED,
    "nul-in-value": ECHO + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n" + SMUGGLED,
    "bare-lf-after-chunk-size": ECHO + b"Transfer-Encoding: chunked\r\n\r\n0\n\r\n" + SMUGGLED,
    "content-length-with-sign": ECHO + b"Content-Length: +0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("wire", list(SMUGGLING_ATTEMPTS.values()), ids=list(SMUGGLING_ATTEMPTS))
def test_ambiguous_or_malformed_framing_is_refused(
    gw: GatewayProcess, backend_seen: list[tuple[str, dict[str, str]]], wire: bytes
) -> None:
    before = len(backend_seen)
    with connect(gw) as client:
        client.send(wire)
        response = client.read_response()
        assert response.status == 400, (response.status, response.body)
        assert (response.header("connection") or "").lower() == "close"
        error_of(response)
        assert_closes(client)
    backend_round_trip(gw)
    after = paths_seen(backend_seen[before:])
    assert not any("smuggled" in path for path in after), after
    assert after == ["/v2/models/echo/versions/1/infer"], "only the probe may reach the backend"


def test_smuggling_attempt_behind_a_valid_request_answers_the_valid_one_first(
    gw: GatewayProcess, backend_seen: list[tuple[str, dict[str, str]]]
) -> None:
    before = len(backend_seen)
    with connect(gw) as client:
        client.send(post("echo", b"legit") + SMUGGLING_ATTEMPTS["cl-then-te"])
        assert echoed(client.read_response())["body"] == "legit"
        refused = client.read_response()
        assert refused.status == 400
        assert_closes(client)
    backend_round_trip(gw)
    assert not any("smuggled" in path for path in paths_seen(backend_seen[before:]))


# -- slow clients -----------------------------------------------------------------------------------------


def test_half_a_head_then_silence_gets_408_and_close(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        started = time.monotonic()
        client.send(b"POST /predict/echo HTTP/1.1\r\nHost: gateway\r\nContent-Le")
        response = client.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 408
        assert 0.5 <= elapsed <= 5.0, elapsed
        error_of(response)
        assert_closes(client)


def test_head_and_half_a_body_then_silence_gets_408_and_close(
    gw: GatewayProcess, backend_seen: list[tuple[str, dict[str, str]]]
) -> None:
    before = len(backend_seen)
    with connect(gw) as client:
        started = time.monotonic()
        client.send(post("echo", b"", {"Content-Length": "100", "X-Marker": "half-body"}) + b"x" * 50)
        response = client.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 408
        assert 0.5 <= elapsed <= 5.0, elapsed
        assert_closes(client)
    assert not any(headers.get("x-marker") == "half-body" for _, headers in backend_seen[before:])


def trickle(client: RawClient, data: bytes, interval: float = 0.15, limit: float = 10.0) -> float:
    """Send `data` a byte at a time until the gateway answers or closes; seconds until then."""
    started = time.monotonic()
    for byte in data:
        readable, _, _ = select.select([client.sock], [], [], interval)
        if readable or time.monotonic() - started > limit:
            break
        try:
            client.send(bytes([byte]))
        except OSError:
            break
    select.select([client.sock], [], [], max(0.0, limit - (time.monotonic() - started)))
    return time.monotonic() - started


def test_head_trickled_a_byte_at_a_time_still_times_out(gw: GatewayProcess) -> None:
    # header_timeout bounds the whole head, not the silence between bytes (slowloris).
    head = b"POST /predict/echo HTTP/1.1\r\nHost: gateway\r\nX-Padding: " + b"a" * 200
    with connect(gw) as client:
        elapsed = trickle(client, head)
        response = client.read_response()
    assert response.status == 408
    assert 0.5 <= elapsed <= 5.0, elapsed


def test_body_trickled_a_byte_at_a_time_still_times_out(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("echo", b"", {"Content-Length": "1000"}))
        elapsed = trickle(client, b"x" * 1000)
        response = client.read_response()
    assert response.status == 408
    assert 0.5 <= elapsed <= 5.0, elapsed


def test_idle_keep_alive_connection_is_closed(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("echo", b"once"))
        assert echoed(client.read_response())["body"] == "once"
        started = time.monotonic()
        closed, extra = wait_closed(client, KEEPALIVE_TIMEOUT + 8)
        elapsed = time.monotonic() - started
    assert closed and extra == b"", extra
    assert KEEPALIVE_TIMEOUT / 2 <= elapsed <= KEEPALIVE_TIMEOUT + 8, elapsed


def test_connection_that_sends_nothing_is_closed(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        closed, extra = wait_closed(client, HEADER_TIMEOUT + 8)
    assert closed
    assert extra == b"" or extra.startswith(b"HTTP/1.1 408 ")


def test_other_clients_are_served_while_one_stalls(gw: GatewayProcess) -> None:
    with connect(gw) as staller_head, connect(gw) as staller_body:
        staller_head.send(b"POST /predict/echo HTTP/1.1\r\nHo")
        staller_body.send(post("echo", b"", {"Content-Length": "10"}) + b"12345")
        for i in range(3):
            with connect(gw) as other:
                other.send(post("echo", b"meanwhile%d" % i))
                assert echoed(other.read_response())["body"] == f"meanwhile{i}"
        assert staller_head.read_response().status == 408
        assert staller_body.read_response().status == 408


# -- upstream faults --------------------------------------------------------------------------------------


def test_backend_cut_mid_response_closes_client_connection_early(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("cut", b"x"))
        head = client._read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"content-length: 1000" in head.lower()
        closed, body = wait_closed(client, 5.0)
    assert closed, "the connection must be closed, not left hanging"
    assert len(body) < 1000, "the client must not get a fake complete response"
    with connect(gw) as client:
        client.send(post("echo", b"next"))
        assert echoed(client.read_response())["body"] == "next"


def test_backend_drop_without_answer_gets_502(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("drop", b"x"))
        response = client.read_response()
    assert response.status == 502
    assert response.header("x-model-version") == "1"
    error_of(response)


def test_backend_garbage_gets_502(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("garbage", b"x"))
        response = client.read_response()
        assert response.status == 502
        error_of(response)
        client.send(post("echo", b"still-usable"))
        assert echoed(client.read_response())["body"] == "still-usable"


def test_backend_hang_gets_504_after_timeout(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        started = time.monotonic()
        client.send(post("hang", b"x"))
        response = client.read_response()
        elapsed = time.monotonic() - started
    assert response.status == 504
    assert BACKEND_TIMEOUT / 2 <= elapsed <= BACKEND_TIMEOUT + 5, elapsed
    assert response.header("x-model-version") == "1"
    error_of(response)


def test_unknown_model_gets_404_json(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("no-such-model", b"x"))
        response = client.read_response()
    assert response.status == 404
    assert "no-such-model" in error_of(response)


def test_backend_where_nothing_listens_gets_503_json(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("nowhere", b"x"))
        response = client.read_response()
    assert response.status == 503
    error_of(response)


# -- headers ----------------------------------------------------------------------------------------------


def test_hop_by_hop_and_credentials_not_forwarded_end_to_end_are(gw: GatewayProcess) -> None:
    headers = {
        "Connection": "keep-alive, X-Named-Hop",
        "X-Named-Hop": "secret",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic cHJveHk6cGFzcw==",
        "Proxy-Connection": "keep-alive",
        "Authorization": "Bearer caller-token",
        "X-API-Key": "caller-key",
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": "2",
        "X-Custom-Thing": "kept",
    }
    with connect(gw) as client:
        client.send(post("echo", b"{}", headers))
        got = echoed(client.read_response())["headers"]
    for name in (
        "connection",
        "x-named-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "authorization",
        "x-api-key",
    ):
        assert name not in got, f"{name} reached the backend"
    assert got["content-type"] == "application/octet-stream"
    assert got["inference-header-content-length"] == "2"
    assert got["x-custom-thing"] == "kept"
    assert got["content-length"] == "2"


def test_headers_named_in_any_connection_line_are_not_forwarded(gw: GatewayProcess) -> None:
    # Two Connection field lines mean the same as one with both values (RFC 9110 section 5.3).
    wire = (
        ECHO + b"Connection: keep-alive\r\nConnection: X-Second-Hop\r\nX-Second-Hop: secret\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    with connect(gw) as client:
        client.send(wire)
        got = echoed(client.read_response())["headers"]
    assert "x-second-hop" not in got


def test_x_forwarded_for_is_appended_to(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("echo", b"", {"X-Forwarded-For": "203.0.113.7, 198.51.100.2"}))
        got = echoed(client.read_response())["headers"]
        client.send(post("echo", b""))
        fresh = echoed(client.read_response())["headers"]
    assert got["x-forwarded-for"] == "203.0.113.7, 198.51.100.2, 127.0.0.1"
    assert fresh["x-forwarded-for"] == "127.0.0.1"


def test_x_forwarded_for_over_several_lines_keeps_every_hop(gw: GatewayProcess) -> None:
    wire = (
        b"POST /predict/echo HTTP/1.1\r\nHost: gateway\r\nX-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-For: 198.51.100.2\r\nContent-Length: 0\r\n\r\n"
    )
    with connect(gw) as client:
        client.send(wire)
        got = echoed(client.read_response())["headers"]
    assert got["x-forwarded-for"] == "203.0.113.7, 198.51.100.2, 127.0.0.1"


def test_x_request_id_echoed_when_given(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("echo", b"", {"X-Request-Id": "req-abc-123"}))
        response = client.read_response()
    assert response.header("x-request-id") == "req-abc-123"
    assert echoed(response)["headers"]["x-request-id"] == "req-abc-123"


def test_x_request_id_generated_when_absent(gw: GatewayProcess) -> None:
    ids = set()
    with connect(gw) as client:
        for _ in range(2):
            client.send(post("echo", b""))
            response = client.read_response()
            generated = response.header("x-request-id")
            assert generated
            assert echoed(response)["headers"]["x-request-id"] == generated
            ids.add(generated)
    assert len(ids) == 2, "each request gets its own id"


def test_hop_by_hop_response_headers_not_passed_to_client(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(post("hop", b""))
        response = client.read_response()
    assert response.status == 200
    names = response.header_names()
    for name in ("keep-alive", "x-hop-secret", "proxy-authenticate", "upgrade", "connection"):
        assert name not in names, f"{name} reached the client"
    assert response.header("x-end-to-end") == "kept"
    assert response.header("content-type") == "application/json"
    assert response.header("x-model-version") == "1"
    assert response.body == b"{}"


@pytest.mark.parametrize("model", ["echo", "chunked", "hop", "big"])
def test_every_proxied_response_carries_model_version(gw: GatewayProcess, model: str) -> None:
    with connect(gw) as client:
        client.send(post(model, b"10"))
        response = client.read_response()
    assert response.status == 200
    assert response.header("x-model-version") == ("7" if model == "big" else "1")


# -- large bodies and flow control ------------------------------------------------------------------------


def test_big_response_through_a_slow_reader_arrives_intact(gw: GatewayProcess) -> None:
    size = 5_000_000
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # small window: the gateway must wait for us
    sock.settimeout(20)
    sock.connect(("127.0.0.1", gw.port))
    try:
        sock.sendall(post("big", str(size).encode()))
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"content-length: %d" % size in head.lower()
        time.sleep(0.5)  # stall completely for a while, then trickle
        deadline = time.monotonic() + 60
        received = [body]
        total = len(body)
        while total < size and time.monotonic() < deadline:
            chunk = sock.recv(16384)
            if not chunk:
                break
            received.append(chunk)
            total += len(chunk)
            time.sleep(0.0005)
        payload = b"".join(received)
    finally:
        sock.close()
    assert len(payload) == size
    assert payload == b"x" * size


def test_large_request_body_arrives_intact(gw: GatewayProcess) -> None:
    body = bytes(range(65, 91)) * (900_000 // 26)
    with connect(gw) as client:
        client.send(post("echo", body))
        got = echoed(client.read_response())
    assert got["headers"]["content-length"] == str(len(body))
    assert got["body"].encode("latin-1") == body


# -- methods and paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/predict/echo", "/v2/models/echo/infer", "/v2/models/echo/versions/1/infer"]
)
def test_get_on_an_infer_path_gets_405_json(gw: GatewayProcess, path: str) -> None:
    with connect(gw) as client:
        client.send(request("GET", path))
        response = client.read_response()
    assert response.status == 405
    error_of(response)


def test_v2_infer_path_is_proxied(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(request("POST", "/v2/models/echo/infer", b"v2"))
        got = echoed(client.read_response())
    assert got["path"] == "/v2/models/echo/versions/1/infer"
    assert got["body"] == "v2"


def test_query_string_is_forwarded(gw: GatewayProcess) -> None:
    with connect(gw) as client:
        client.send(request("POST", "/predict/echo?a=1&b=%20", b"q"))
        got = echoed(client.read_response())
    assert got["path"] == "/v2/models/echo/versions/1/infer?a=1&b=%20"


def test_absolute_form_request_target_is_accepted(gw: GatewayProcess) -> None:
    # RFC 9112 section 3.2.2: a server MUST accept the absolute-form of the request target.
    with connect(gw) as client:
        client.send(request("POST", "http://gateway/predict/echo", b"absolute"))
        response = client.read_response()
    assert response.status == 200, (response.status, response.body)
    assert echoed(response)["body"] == "absolute"


@pytest.mark.parametrize("path", ["/", "/nope", "/v2/models", "/predict", "/v3/models/echo/infer"])
def test_unknown_path_gets_404_json(gw: GatewayProcess, path: str) -> None:
    with connect(gw) as client:
        client.send(request("POST", path, b"x"))
        response = client.read_response()
    assert response.status == 404
    error_of(response)


@pytest.mark.parametrize("path", ["/nope", "/predict/echo"])
def test_head_response_has_no_body(gw: GatewayProcess, path: str) -> None:
    # RFC 9110 section 9.3.2: a response to HEAD carries no content. A body here would be read by the
    # client as the start of the next response on the connection.
    with connect(gw) as client:
        client.send(request("HEAD", path) + request("GET", "/nope-after-head"))
        head = client.read_response(head_request=True)
        assert head.status in (404, 405)
        following = client._read_until(b"\r\n\r\n")
    assert following.startswith(b"HTTP/1.1 404 "), f"bytes after the HEAD response: {following[:120]!r}"


def test_upgrade_request_answered_by_gateway_leaves_a_usable_or_closed_connection(gw: GatewayProcess) -> None:
    # The gateway does not switch protocols. Whatever it answers, the client must then either see the
    # connection close (announced with connection: close) or be able to send its next request.
    upgrade = post("no-such-model", b"", {"Upgrade": "websocket", "Connection": "Upgrade"})
    with connect(gw, timeout=KEEPALIVE_TIMEOUT + 8) as client:
        client.send(upgrade)
        response = client.read_response()
        assert response.status == 404
        if (response.header("connection") or "").lower() == "close":
            assert_closes(client)
        else:
            client.send(post("echo", b"after-upgrade"))
            try:
                following = client.read_response()
            except ConnectionError as exc:
                pytest.fail(
                    "the 404 did not say connection: close, yet the next request on the connection "
                    f"got no answer ({exc!r})"
                )
            assert echoed(following)["body"] == "after-upgrade"
