"""Token leases on a real redis-server (and a 3-node cluster): exact across processes, and cheap.

Two `RedisStore`s with their own connections stand for two gateway processes. Each request records when
it was asked and when it was answered; a request admitted inside a window [a, b] is one asked at or
after a and answered by b, and no such window may hold more than GCRA allows,
floor((b - a) x rate) + burst, for any a and b (tests/windows.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.store.gcra import Answer, Bucket
from gateway.store.leases import LEASE_LIFETIME, Lease, lease_size
from gateway.store.redis import RedisStore
from tests.redis_servers import RedisClusterNodes, RedisServer, SentinelSetup
from tests.windows import over_admission

PATIENT = 5.0  # store timeout: the machine is shared, a slow answer must not read as an outage


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
async def two(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    stores = RedisStore(redis_server.url, PATIENT), RedisStore(redis_server.url, PATIENT)
    for store in stores:
        store.leases.processes = 2
    yield stores
    for store in stores:
        await store.close()


def bucket(rate: float, burst: int, scope: str = "key") -> Bucket:
    return Bucket(f"{scope}:{uuid.uuid4().hex[:8]}", rate, burst)


async def one(store: RedisStore, limits: list[Bucket]) -> Answer:
    answer = store.admit_now(limits)
    return answer if answer is not None else await store.admit(limits)


async def hammer(
    store: RedisStore, limits: list[Bucket], until: float, log: list[tuple[float, float]], clients: int
) -> int:
    """`clients` callers in a loop until `until`; admitted ones go to `log` as (asked, answered)."""

    async def caller() -> int:
        sent = 0
        while (asked := time.monotonic()) < until:
            sent += 1
            if (await one(store, limits)).admitted:
                log.append((asked, time.monotonic()))
            await asyncio.sleep(0)  # others' turn, as between requests of a real front door
        return sent

    return sum(await asyncio.gather(*(caller() for _ in range(clients))))


async def test_two_processes_with_leases_never_admit_more_than_the_limit(
    two: tuple[RedisStore, RedisStore],
) -> None:
    limit = bucket(2000.0, 400)
    assert lease_size(limit.rate, limit.burst, 5000.0, 2) >= 2  # leases are taken, not per request
    log: list[tuple[float, float]] = []
    started = time.monotonic()
    until = started + 1.5
    offered = sum(await asyncio.gather(*(hammer(s, [limit], until, log, 8) for s in two)))
    elapsed = time.monotonic() - started
    assert offered > 1.5 * limit.rate * elapsed  # hammered well above the limit
    assert over_admission(log, limit.rate, limit.burst) == 0
    # Close to the limit, not far under it: a lease passing unused is the only loss.
    assert len(log) >= 0.9 * (limit.rate * elapsed + limit.burst), (len(log), elapsed)
    calls = sum(s.leases.calls for s in two)
    assert calls * 2 < len(log), (calls, len(log))  # leases: fewer script calls than admissions, saturated


async def test_a_process_that_stops_holding_a_lease_leaves_nothing_extra_to_the_other(
    redis_server: RedisServer,
) -> None:
    limit = bucket(2000.0, 400)
    first, second = RedisStore(redis_server.url, PATIENT), RedisStore(redis_server.url, PATIENT)
    first.leases.processes = second.leases.processes = 2
    log: list[tuple[float, float]] = []
    try:
        until = time.monotonic() + 0.6
        await asyncio.gather(hammer(first, [limit], until, log, 8), hammer(second, [limit], until, log, 8))
        held = first.leases._holdings[limit.bucket]
        for _ in range(2000):  # on until it holds a lease with slots ahead (it is refused meanwhile)
            if held.current is not None and held.current.left(time.monotonic()) > 1:
                break
            asked = time.monotonic()
            if (await one(first, [limit])).admitted:
                log.append((asked, time.monotonic()))
            await asyncio.sleep(0.0005)
        assert held.current is not None and held.current.left(time.monotonic()) > 1
        # It dies: no give-back, its connection just goes. The other goes on alone.
        first.leases._holdings.clear()
        await first._client.aclose()
        until = time.monotonic() + 0.6
        await hammer(second, [limit], until, log, 8)
    finally:
        await second.close()
    assert over_admission(log, limit.rate, limit.burst) == 0


async def test_all_or_nothing_a_refused_request_takes_no_slot_of_its_other_limits(
    two: tuple[RedisStore, RedisStore],
) -> None:
    store, _ = two
    wide, tight = bucket(1000.0, 1000, "model"), bucket(1.0, 2)
    answers = [await one(store, [wide, tight]) for _ in range(5)]
    assert [a.admitted for a in answers] == [True, True, False, False, False]
    assert answers[2].tightest == 1 and answers[2].retry_after > 0.5  # the key's limit said no
    assert all(a.tightest == 1 for a in answers[2:])


async def test_give_back_returns_the_unused_tail(two: tuple[RedisStore, RedisStore]) -> None:
    store, other = two
    limit = bucket(100.0, 100)
    store.leases.processes = 1
    admitted = 0
    for _ in range(200):  # enough demand for a lease, then on until one has slots ahead
        admitted += (await one(store, [limit])).admitted
        held = store.leases._holdings[limit.bucket].current
        if admitted > 20 and held is not None and held.left(time.monotonic()) > 2:
            break
        await asyncio.sleep(0.001)
    assert held is not None and held.left(time.monotonic()) > 2
    await store.leases.give_back()
    ((_, (after,)),) = await other.check_limits([[limit]])
    # Only those admitted are gone (the check itself takes one): the rest of the lease came back.
    assert after.remaining >= limit.burst - admitted - 1


def test_a_slot_is_never_used_before_the_request_arrived_nor_after_it_was_given_back() -> None:
    lease = Lease(start=100.0, count=10, interval=0.01, offset=50.0, tat=100.1, tat_text="")
    assert lease.first_free(49.0) == 0  # arrived (store time 99) before the first slot
    assert lease.first_free(50.025) == 3  # store time 100.025: slots 100.00..100.02 have passed
    assert lease.left(50.0) == 10
    lease.retire(50.025)
    assert lease.given_back == pytest.approx(100.03) and lease.left(49.0) == 0


async def test_no_lease_is_used_once_the_store_has_been_silent_for_its_lifetime(
    two: tuple[RedisStore, RedisStore],
) -> None:
    store, _ = two
    limit = bucket(1e6, 10**6)
    store.leases.processes = 1
    for _ in range(300):  # enough demand for a lease
        await one(store, [limit])
        await asyncio.sleep(0.0005)
    assert store.admit_now([limit]) is not None  # from a lease
    # The store's last answer, LEASE_LIFETIME ago: the lease it holds is not used any more.
    store.leases._answered = time.monotonic() - LEASE_LIFETIME
    assert store.admit_now([limit]) is None
    assert (await store.admit([limit])).admitted  # a call: the store answers, the lease serves again
    assert store.admit_now([limit]) is not None
    assert 0 < LEASE_LIFETIME <= 0.05


def test_lease_size_follows_demand_and_stays_a_small_share() -> None:
    assert lease_size(200.0, 20, 10_000.0, 2) == 0  # burst too small to share: checked per request
    assert lease_size(1e6, 10**6, 30.0, 1) == 0  # slow bucket: under 2 requests per lease span
    assert lease_size(1e6, 10**6, 30_000.0, 1) == 50_000  # spans LEASE_SPAN (50 ms) of the bucket's time
    assert lease_size(1e6, 10**6, 30_000.0, 16) == 3906  # 16 processes, 2 leases each: 1/8 of the burst


async def test_leases_on_a_cluster_are_exact_too() -> None:
    cluster = RedisClusterNodes().start()
    try:
        stores = RedisStore(cluster.url, PATIENT), RedisStore(cluster.url, PATIENT)
        key, model = bucket(1500.0, 300), bucket(3000.0, 600, "model")
        log: list[tuple[float, float]] = []
        for store in stores:
            store.leases.processes = 2
        until = time.monotonic() + 1.0
        await asyncio.gather(*(hammer(s, [key, model], until, log, 8) for s in stores))
        for store in stores:
            await store.close()
        assert over_admission(log, key.rate, key.burst) == 0
        assert len(log) > key.burst
    finally:
        cluster.cleanup()


async def test_leases_through_sentinel_are_exact_and_batched() -> None:
    setup = SentinelSetup().start()
    try:
        stores = RedisStore(setup.url, PATIENT), RedisStore(setup.url, PATIENT)
        limit = bucket(2000.0, 400)
        log: list[tuple[float, float]] = []
        for store in stores:
            store.leases.processes = 2
        until = time.monotonic() + 1.0
        await asyncio.gather(*(hammer(s, [limit], until, log, 8) for s in stores))
        calls = sum(s.leases.calls for s in stores)
        for store in stores:
            await store.close()
        assert over_admission(log, limit.rate, limit.burst) == 0
        assert len(log) > limit.burst and calls * 2 < len(log), (calls, len(log))
    finally:
        setup.cleanup()
