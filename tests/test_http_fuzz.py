"""Property-based fuzzing of the client-facing HTTP/1.1 server.

Each example opens a fresh connection to a gateway subprocess and sends random bytes, a valid request with
random byte insertions, deletions and replacements, a request with random header names and values, or a
chunked request with random (sometimes wrong) chunk sizes, split into random TCP sends. Whatever arrives,
the gateway must answer with well-formed HTTP/1.1 responses or close the connection, within a bounded time,
and stay alive; a valid request on a new connection must then still work. Requests whose framing is known
to be valid must be relayed byte for byte to the FAKE echo backend in `fault_backend.py`.

Examples are derandomized so every run (and CI) tries the same inputs.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httptools
import pytest
from fault_backend import FaultBackend, fault_backend
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from support import GatewayProcess, RawClient, gateway, request

TIMEOUT = 0.4  # header, body and keep-alive timeouts of the gateway under test
ANSWER_WITHIN = 8.0  # seconds from the last byte sent to the connection closing, with a wide margin

ROUTES = """
backends:
  fb: {{url: "http://127.0.0.1:{port}", timeout: 2s}}
models:
  echo: {{versions: {{"1": {{backend: fb, target: echo/1}}}}}}
  chunked: {{versions: {{"1": {{backend: fb, target: chunked/1}}}}}}
keys: {{required: false}}
server:
  header_timeout: 400ms
  body_timeout: 400ms
  keepalive_timeout: 400ms
  max_body_size: 64KiB
  max_header_size: 4KiB
  max_headers: 30
"""


@pytest.fixture(scope="module")
def backend() -> Iterator[FaultBackend]:
    with fault_backend() as fb:
        yield fb


@pytest.fixture(scope="module")
def gw(backend: FaultBackend) -> Iterator[GatewayProcess]:
    with gateway(ROUTES.format(port=backend.port)) as process:
        yield process


# -- what the gateway sent back ---------------------------------------------------------------------------


@dataclass
class Parsed:
    """Responses parsed from one connection's byte stream by llhttp (httptools)."""

    complete: int = 0
    statuses: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    headers: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    in_message: bool = False
    close_delimited: bool = False  # the last response has neither length nor chunking: it ends at EOF


class _ResponseCallbacks:
    def __init__(self, parsed: Parsed) -> None:
        self.parsed = parsed
        self.parser: httptools.HttpResponseParser | None = None

    def on_message_begin(self) -> None:
        self.parsed.in_message = True
        self.parsed.headers.append([])
        self.parsed.bodies.append(b"")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.parsed.headers[-1].append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        self.parsed.statuses.append(status)
        self.parsed.versions.append(self.parser.get_http_version())
        names = {name for name, _ in self.parsed.headers[-1]}
        framed = b"content-length" in names or b"transfer-encoding" in names
        self.parsed.close_delimited = not framed and status >= 200 and status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        self.parsed.bodies[-1] += body

    def on_message_complete(self) -> None:
        self.parsed.in_message = False
        self.parsed.complete += 1


def parse_responses(data: bytes) -> Parsed:
    parsed = Parsed()
    callbacks = _ResponseCallbacks(parsed)
    parser = httptools.HttpResponseParser(callbacks)
    callbacks.parser = parser
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as exc:
        raise AssertionError(f"the gateway sent malformed HTTP ({exc}): {data[:600]!r}") from None
    return parsed


def exchange(port: int, segments: list[bytes], half_close: bool) -> tuple[bytes, bool, float]:
    """Send the segments, then read until the gateway closes; (bytes, closed, seconds after the last send)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    received = b""
    try:
        try:
            for index, segment in enumerate(segments):
                if index:
                    time.sleep(0.001)  # let each segment arrive on its own
                sock.sendall(segment)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway refused the request and closed while we were still sending
        sent = time.monotonic()
        deadline = sent + ANSWER_WITHIN
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return received, False, time.monotonic() - sent
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False, time.monotonic() - sent
            except ConnectionResetError:
                return received, True, time.monotonic() - sent
            if not chunk:
                return received, True, time.monotonic() - sent
            received += chunk
    finally:
        sock.close()


def check_gateway_still_serves(gw: GatewayProcess) -> None:
    assert gw.process is not None
    assert gw.process.poll() is None, f"the gateway died:\n{gw.log()[-4000:]}"
    with RawClient(gw.port, timeout=10) as client:
        client.send(request("POST", "/predict/echo", b"still-alive"))
        response = client.read_response()
    assert response.status == 200, (response.status, response.body)
    assert json.loads(response.body)["body"] == "still-alive"


def check_answer(gw: GatewayProcess, segments: list[bytes], half_close: bool) -> Parsed:
    data, closed, elapsed = exchange(gw.port, segments, half_close)
    assert closed, f"neither answered and closed within {ANSWER_WITHIN}s; got {data[:600]!r}"
    parsed = parse_responses(data)
    assert all(version == "1.1" for version in parsed.versions), parsed.versions
    assert all(100 <= status <= 599 for status in parsed.statuses), parsed.statuses
    if parsed.in_message:
        assert parsed.close_delimited, f"a response was cut short: {data[-600:]!r}"
    event(f"statuses {sorted(set(parsed.statuses))}" if parsed.statuses else "closed without an answer")
    event(f"answered and closed in {'under' if elapsed < TIMEOUT / 2 else 'over'} {TIMEOUT / 2:g}s")
    check_gateway_still_serves(gw)
    return parsed


# -- inputs -----------------------------------------------------------------------------------------------

BODY = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]}]}'
VALID = [
    request("POST", "/predict/echo", BODY, {"Content-Type": "application/json"}),
    request("POST", "/v2/models/echo/infer", BODY, {"X-Request-Id": "fuzz-1"}),
    request("POST", "/predict/chunked", BODY, version="1.0"),
    request("POST", "/predict/echo", BODY, {"Connection": "close"}),
    request("POST", "/predict/echo", BODY, {"Expect": "100-continue"}),
    request("GET", "/v2/health/live"),
    b"POST /predict/echo HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
    request("POST", "/predict/echo", b"first") + request("POST", "/predict/echo", b"second"),
]

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


# Bytes that matter to a parser, so that mutations reach past the first syntax check more often.
pieces = st.one_of(
    st.binary(min_size=1, max_size=8),
    st.sampled_from(
        [
            b"\r\n",
            b"\n",
            b"\r",
            b" ",
            b"\t",
            b":",
            b",",
            b";",
            b"0",
            b"9",
            b"f",
            b"\r\n\r\n",
            b"chunked",
            b"Content-Length: 5\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Connection: close\r\n",
            b"Expect: 100-continue\r\n",
            b"X-A: b\r\n",
            b"POST /predict/echo HTTP/1.1\r\nContent-Length: 1\r\n\r\nZ",
        ]
    ),
)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        position = draw(st.integers(0, max(len(wire) - 1, 0)))
        if kind == "insert":
            wire[position:position] = draw(pieces)
        elif kind == "delete":
            del wire[position : position + draw(st.integers(1, 8))]
        else:
            piece = draw(pieces)
            wire[position : position + len(piece)] = piece
    return bytes(wire)


header_names = st.one_of(
    st.text(TOKEN_CHARS, min_size=1, max_size=30).map(str.encode),
    st.binary(min_size=0, max_size=30),
    st.sampled_from(
        [
            b"Content-Length",
            b"Transfer-Encoding",
            b"Connection",
            b"Expect",
            b"Host",
            b"X-Model-Version",
            b"Upgrade",
        ]
    ),
)
header_values = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=40).map(lambda text: text.encode("utf-8")),
    st.sampled_from(
        [b"chunked", b"close", b"keep-alive", b"100-continue", b"0", b"99999999999", b"-1", b" 5 "]
    ),
)


@st.composite
def requests_with_random_headers(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    body = draw(st.sampled_from([b"", b"abc", BODY]))
    head = b"POST /predict/echo HTTP/1.1\r\nHost: gateway\r\n"
    return head + lines + b"Content-Length: %d\r\n\r\n" % len(body) + body


@st.composite
def chunked_requests(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """A chunked request, and the body the backend must get when the framing is valid (else None)."""
    body = draw(st.binary(max_size=600))
    sizes = draw(st.lists(st.integers(1, 300), max_size=12))
    pieces, rest = [], body
    for size in sizes:
        if rest:
            pieces.append(rest[:size])
            rest = rest[size:]
    if rest:
        pieces.append(rest)
    valid = True
    wire = b"POST /predict/echo HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n"
    for piece in pieces:
        declared = len(piece)
        if draw(st.integers(0, 9)) == 0:  # now and then, lie about the size
            declared = max(0, declared + draw(st.integers(-3, 3)))
            valid = valid and declared == len(piece)
        size_field = draw(st.sampled_from(["%x", "%X", "%04x"])) % declared
        extension = draw(st.sampled_from([b"", b";a=b", b";x"]))
        wire += size_field.encode() + extension + b"\r\n" + piece + b"\r\n"
    wire += b"0\r\n\r\n"
    return wire, (body if valid else None)


def split_into_segments(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a] or [b""]


COMMON = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


# -- properties -------------------------------------------------------------------------------------------


@COMMON
@given(
    wire=st.one_of(
        st.binary(min_size=1, max_size=2048),
        mutated_requests(),
        mutated_requests(),
        requests_with_random_headers(),
    ),
    cuts=st.lists(st.integers(0, 4096), max_size=6),
    half_close=st.booleans(),
)
def test_arbitrary_input_gets_valid_http_or_a_close(
    gw: GatewayProcess, wire: bytes, cuts: list[int], half_close: bool
) -> None:
    assume(b"HEAD" not in wire.upper())  # responses to HEAD have no body; a plain response parser cannot tell
    check_answer(gw, split_into_segments(wire, cuts), half_close)


@settings(COMMON, max_examples=60)
@given(chunked=chunked_requests(), cuts=st.lists(st.integers(0, 4096), max_size=8))
def test_random_chunk_sizes(gw: GatewayProcess, chunked: tuple[bytes, bytes | None], cuts: list[int]) -> None:
    wire, expected = chunked
    parsed = check_answer(gw, split_into_segments(wire, cuts), half_close=True)
    assert parsed.complete >= 1 or expected is None, "a valid chunked request got no answer"
    if expected is not None:
        assert parsed.statuses[0] == 200, (parsed.statuses, parsed.bodies[:1])
        echoed = json.loads(parsed.bodies[0])
        assert echoed["body"].encode("latin-1") == expected
        assert echoed["headers"]["content-length"] == str(len(expected))
