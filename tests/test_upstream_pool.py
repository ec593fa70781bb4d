"""The upstream pool's bounds, in process against the fake backend (`fault_backend`, named as such).

A request waits for a pooled connection at most `queue_timeout`, at most `max_queue` of them wait, a
shadow copy never waits, and a failure while connecting always gives its slot back.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from fault_backend import FaultBackend, fault_backend

from gateway.routing.table import Backend
from gateway.wire.headers import Headers
from gateway.wire.upstream import Failure, Pool, UpstreamConnection


@pytest.fixture(scope="module")
def backend() -> Iterator[FaultBackend]:
    with fault_backend() as fb:
        yield fb


class Listener:
    def __init__(self) -> None:
        self.done: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        self.status = 0

    def upstream_headers(self, status: int, headers: Headers, content_length: int | None) -> None:
        self.status = status

    def upstream_body(self, data: bytes) -> None:
        pass

    def upstream_done(self) -> None:
        self.done.set_result(("done", self.status))

    def upstream_failed(self, failure: Failure, detail: str) -> None:
        self.done.set_result(("failed", detail))

    def upstream_crashed(self, exc: BaseException) -> None:
        self.done.set_result(("crashed", exc))


def request(model: str) -> list[bytes]:
    return [
        b"POST /v2/models/%s/versions/1/infer HTTP/1.1\r\nhost: b\r\ncontent-length: 2\r\n\r\n{}"
        % model.encode()
    ]


async def acquired(pool: Pool) -> tuple[UpstreamConnection | None, str]:
    future: asyncio.Future[tuple[UpstreamConnection | None, str]] = asyncio.get_running_loop().create_future()
    pool.acquire(lambda conn, why: future.set_result((conn, why)))
    return await asyncio.wait_for(future, 5)


def pool_for(port: int, **settings: Any) -> Pool:
    backend = Backend("fake", "127.0.0.1", port, **{"timeout": 5.0, "max_connections": 1, **settings})
    return Pool(backend, asyncio.get_running_loop())


async def test_a_waiting_request_gives_up_after_the_queue_timeout(backend: FaultBackend) -> None:
    pool = pool_for(backend.port, queue_timeout=0.3, max_queue=1)
    busy, _ = await acquired(pool)
    assert busy is not None
    busy.send(request("hang"), Listener())  # the only connection is taken
    started = asyncio.get_running_loop().time()
    waiting = asyncio.ensure_future(acquired(pool))
    await asyncio.sleep(0.05)
    over, why = await acquired(pool)  # the queue (max 1) is full: refused at once
    assert over is None and "1 requests are waiting already" in why
    connection, why = await waiting
    assert connection is None and "no connection to backend fake was free within 0.3s" in why
    assert 0.25 <= asyncio.get_running_loop().time() - started < 2.0
    assert "127.0.0.1" not in why
    pool.close()


async def test_a_shadow_copy_never_waits_for_a_connection(backend: FaultBackend) -> None:
    pool = pool_for(backend.port)
    busy, _ = await acquired(pool)
    assert busy is not None
    busy.send(request("hang"), Listener())
    assert pool.acquire_if_free(lambda conn, why: None) is False  # would have to queue: skipped
    pool.close()
    idle = pool_for(backend.port)
    got: list[Any] = []
    assert idle.acquire_if_free(lambda conn, why: got.append(conn)) is True
    await asyncio.sleep(0.2)
    assert got and got[0] is not None
    idle.close()


async def test_any_failure_while_connecting_gives_the_slot_back(
    backend: FaultBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = pool_for(backend.port)
    loop = asyncio.get_running_loop()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug below us")

    monkeypatch.setattr(loop, "create_connection", broken)
    connection, why = await acquired(pool)
    assert connection is None and "internal error" in why
    assert pool.size == 0
    monkeypatch.undo()
    connection, why = await acquired(pool)  # the slot came back: a real connection opens
    assert connection is not None, why
    pool.close()


async def test_a_refused_connection_names_no_address() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = pool_for(port)
    connection, why = await acquired(pool)
    assert connection is None
    assert why == "cannot connect to backend fake: connection refused"
    pool.close()


async def test_bytes_on_an_idle_connection_close_it_and_101_is_a_failure(backend: FaultBackend) -> None:
    pool = pool_for(backend.port)
    connection, _ = await acquired(pool)
    assert connection is not None
    listener = Listener()
    connection.send(request("afterbytes"), listener)
    assert await asyncio.wait_for(listener.done, 5) == ("done", 200)
    await asyncio.sleep(0.5)  # the stray answer arrives while the connection is idle in the pool
    assert connection.closed and pool.size == 0
    upgraded, _ = await acquired(pool)
    assert upgraded is not None
    listener = Listener()
    upgraded.send(request("upgrade"), listener)
    outcome, detail = await asyncio.wait_for(listener.done, 5)
    assert outcome == "failed" and "101" in detail
    pool.close()
