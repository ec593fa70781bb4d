"""The exception boundary: a bug in any step answers 500 (or aborts a started answer) within a second,
is counted and logged once, and leaves every other connection and exchange alone.

In process: the real HTTP server, pipeline and upstream pool on this test's event loop, against the fake
backend (`fault_backend`, named as such) whose `echo` model returns what it received. The faults are
injected by replacing one step at a time with a function that raises.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fault_backend import FaultBackend, fault_backend

from gateway.access.admission import Admission
from gateway.pipeline import forward, steps
from gateway.pipeline.flow import Pipeline
from gateway.pipeline.http import HttpFrontDoor
from gateway.pipeline.metadata import Metadata
from gateway.routing.config import parse_table
from gateway.stats.counters import Outcome, Stats
from gateway.store.memory import MemoryStore
from gateway.wire.deadlines import Deadlines
from gateway.wire.http_server import ClientConnection
from gateway.wire.request import BodyBudget

ROUTES = """
backends:
  fake: {{url: "http://127.0.0.1:{port}", timeout: 5s, max_connections: 1}}
models:
  echo:
    versions:
      "1": {{backend: fake, target: echo/1}}
keys:
  required: false
  default_limit: {{rate: 100000/s, burst: 100000}}   # so admission goes through the store
"""


class Injected(RuntimeError):
    """The fault this test injects."""


def boom(*args: Any, **kwargs: Any) -> Any:
    raise Injected("injected fault")


@dataclass
class Served:
    port: int
    front: HttpFrontDoor
    stats: Stats


@pytest.fixture(scope="module")
def backend() -> Iterator[FaultBackend]:
    with fault_backend() as fb:
        yield fb


@pytest.fixture
async def served(backend: FaultBackend) -> AsyncIterator[Served]:
    loop = asyncio.get_running_loop()
    table = parse_table(ROUTES.format(port=backend.port))
    stats = Stats()
    pipeline = Pipeline(table, loop, stats, Admission(MemoryStore(), "fail_closed"))

    async def settled(timeout: float) -> None:
        return None

    front = HttpFrontDoor(pipeline, Metadata(lambda: pipeline.snapshot, settled))
    connections: Deadlines[ClientConnection] = Deadlines(loop, 0.05)
    server = await loop.create_server(
        lambda: ClientConnection(front, table.server, connections, BodyBudget(2**20)), "127.0.0.1", 0
    )
    yield Served(server.sockets[0].getsockname()[1], front, stats)
    server.close()
    connections.close()
    await front.close()


def post(body: bytes, headers: str = "") -> bytes:
    return b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        headers.encode(),
        body,
    )


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes] | None:
    """One response, or None when the server closed the connection before a whole one."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    try:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return int(status_line.split(" ")[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read(1) == b""
    except ConnectionError:
        return True


async def exchange(port: int, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(post(body))
        return await read_answer(reader)
    finally:
        writer.close()


def patch_step(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """Make one step raise."""
    targets: dict[str, Callable[[], None]] = {
        "target": lambda: monkeypatch.setattr(steps, "resolve_target", boom),
        "authenticate": lambda: monkeypatch.setattr(steps, "require_key", boom),
        "model": lambda: monkeypatch.setattr(steps, "find_model", boom),
        # The memory store decides at once; made to wait, admission raises after an await.
        "admit": lambda: (
            monkeypatch.setattr(MemoryStore, "admit_now", lambda self, limits: None),
            monkeypatch.setattr(Admission, "_check", boom_async),
        ),
        "admit at once": lambda: monkeypatch.setattr(Admission, "_answer", boom),
        "choose": lambda: monkeypatch.setattr(steps, "choose_version", boom),
        "forward": lambda: monkeypatch.setattr(forward.ProxyExchange, "start", boom),
        "record": lambda: monkeypatch.setattr(steps, "record", boom),
        # The exchange's own guard bypassed: the upstream connection's boundary must catch it.
        "upstream callback": lambda: monkeypatch.setattr(forward.ProxyExchange, "upstream_headers", boom),
    }
    targets[step]()


async def boom_async(*args: Any, **kwargs: Any) -> None:
    raise Injected("injected fault after an await")


STEPS = [
    "target",
    "authenticate",
    "model",
    "admit",
    "admit at once",
    "choose",
    "forward",
    "record",
    "upstream callback",
]


@pytest.mark.parametrize("step", STEPS)
async def test_a_fault_in_any_step_answers_500_or_aborts_and_spares_other_connections(
    served: Served, step: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bystander_reader, bystander = await asyncio.open_connection("127.0.0.1", served.port)
    bystander.write(post(b"before"))
    answer = await asyncio.wait_for(read_answer(bystander_reader), 5)
    assert answer is not None and answer[0] == 200

    patch_step(monkeypatch, step)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    with caplog.at_level(logging.ERROR):
        writer.write(post(b"faulty", "x-request-id: req-under-test\r\n"))
        answer = await asyncio.wait_for(read_answer(reader), 1.0)  # never a hang
        if answer is None or answer[0] != 500:
            # The answer had started (the record step runs after the body went out): the connection ends.
            assert await asyncio.wait_for(closed_by_server(reader), 1.0)
        else:
            _, headers, body = answer
            assert json.loads(body) == {"error": "internal error in the gateway (logged with the request id)"}
            assert headers["content-type"] == "application/json"
            assert headers["connection"] == "close"
            assert await asyncio.wait_for(closed_by_server(reader), 1.0)
    writer.close()
    assert served.front.internal_errors == 1
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], Injected)]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    if step not in ("target",):
        assert "req-under-test" in logged[0].getMessage()
    # Never counted against the version: its failures stay at zero.
    counters = served.stats.versions[("echo", "1")]
    failures = (Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.UPSTREAM_ERROR)
    assert [counters.outcomes[outcome] for outcome in failures] == [0, 0, 0]
    assert counters.in_flight == 0

    monkeypatch.undo()
    bystander.write(post(b"after"))  # the other connection was not touched and still works
    answer = await asyncio.wait_for(read_answer(bystander_reader), 5)
    assert answer is not None and answer[0] == 200
    assert json.loads(answer[2])["body"] == "after"
    bystander.close()
    fresh = await asyncio.wait_for(exchange(served.port, b"fresh"), 5)
    assert fresh is not None and fresh[0] == 200 and json.loads(fresh[2])["body"] == "fresh"


async def test_a_fault_at_the_end_of_one_exchange_never_reaches_the_one_waiting_for_its_connection(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one pooled connection, B waits for A's. A's handler raises when its response ends: the
    connection must not be handed to B before A is done with it, and B gets B's own answer."""
    original = forward.ProxyExchange.upstream_done
    calls = 0

    def first_one_fails(self: forward.ProxyExchange) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Injected("end of A")
        original(self)

    monkeypatch.setattr(forward.ProxyExchange, "upstream_done", first_one_fails)
    a, b = await asyncio.wait_for(
        asyncio.gather(exchange(served.port, b"A" * 10), exchange(served.port, b"B" * 10)), 5
    )
    assert b is not None and b[0] == 200
    assert json.loads(b[2])["body"] == "B" * 10
    if a is not None:  # A's answer was complete before its end failed; it is A's, not B's
        assert json.loads(a[2])["body"] == "A" * 10
    assert served.front.internal_errors == 1
