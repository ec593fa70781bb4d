"""The store suite: the same behaviours against MemoryStore and RedisStore on real Redis servers that these
tests start themselves (one server, a 3-node cluster, a master behind a sentinel)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from gateway.routing.table import Limit
from gateway.store import KeyRecord, Store, StoreUnavailable, open_store
from gateway.store.gcra import Bucket
from gateway.store.redis import RedisStore
from gateway.store.redis_layout import HEARTBEATS, KEYS_BY_HASH, KEYS_BY_NAME, bucket_key
from tests.redis_servers import RedisClusterNodes, RedisServer, SentinelSetup

ALL = ["memory", "redis", "cluster", "sentinel"]
REDIS = ["redis", "cluster", "sentinel"]
# For the stores these tests open themselves: longer than the 80 ms default, since a first connection
# (a TLS handshake, say) on a busy test machine can take longer, and the tests here are not about that.
PATIENT = 0.25


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    cluster = RedisClusterNodes().start()  # raises with the nodes' logs if it cannot start
    yield cluster
    cluster.cleanup()


@pytest.fixture(scope="module")
def redis_sentinel() -> Iterator[SentinelSetup]:
    setup = SentinelSetup().start()
    yield setup
    setup.cleanup()


def url_for(request: pytest.FixtureRequest, kind: str) -> str:
    """The store URL of a kind; starts that kind's servers on first use."""
    if kind == "memory":
        return "memory://"
    fixture = {"redis": "redis_server", "cluster": "redis_cluster", "sentinel": "redis_sentinel"}[kind]
    url: str = request.getfixturevalue(fixture).url
    return url


@pytest.fixture
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    opened = open_store(url_for(request, request.param), PATIENT)
    yield opened
    await opened.close()


@pytest.fixture
async def two_stores(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Store, Store]]:
    """Two handles on one store, as two gateway processes have (memory: the same object)."""
    url = url_for(request, request.param)
    first = open_store(url, PATIENT)
    second = first if request.param == "memory" else open_store(url, PATIENT)
    yield first, second
    await first.close()
    if second is not first:
        await second.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def eventually(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition()` held; fails if it did not within `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


# ---- rate limits, every store ----


@pytest.mark.parametrize("store", ALL, indirect=True)
async def test_gcra_burst_then_one_per_interval(store: Store) -> None:
    limit = Bucket(unique("model:m"), rate=10.0, burst=5)
    decisions = await store.check_limits([[limit]] * 8)  # one call: one clock reading, exact values
    assert [ok for ok, _ in decisions] == [True] * 5 + [False] * 3
    verdicts = [v for _, (v,) in decisions]
    assert [v.remaining for v in verdicts] == [4, 3, 2, 1, 0, 0, 0, 0]
    assert [v.retry_after for v in verdicts[:5]] == [0.0] * 5
    assert [v.reset_after for v in verdicts[:5]] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5], abs=0.02)
    for v in verdicts[5:]:
        assert not v.allowed
        assert v.retry_after == pytest.approx(0.1, abs=0.02)
        assert v.reset_after == pytest.approx(0.5, abs=0.02)

    # Then exactly one per 100 ms: wake half-way through each interval, so 50 ms of jitter is harmless.
    retry = verdicts[-1].retry_after
    for _ in range(3):
        await asyncio.sleep(retry + 0.05)
        decisions = await store.check_limits([[limit]] * 4)
        assert [ok for ok, _ in decisions] == [True, False, False, False]
        assert decisions[0][1][0].remaining == 0
        retry = decisions[1][1][0].retry_after
        assert 0.0 < retry <= 0.1


@pytest.mark.parametrize("store", ALL, indirect=True)
async def test_denied_request_charges_nothing(store: Store) -> None:
    key, model = unique("alice"), unique("m")
    per_key = Bucket(f"key:{key}", rate=0.01, burst=10)  # slow refill: nothing comes back during the test
    per_key_model = Bucket(f"key:{key}:model:{model}", rate=0.01, burst=2)
    per_model = Bucket(f"model:{model}", rate=0.01, burst=10)
    decisions = await store.check_limits([[per_key, per_key_model, per_model]] * 4)
    assert [ok for ok, _ in decisions] == [True, True, False, False]
    assert [v.allowed for v in decisions[2][1]] == [True, False, True]
    assert decisions[2][1][1].retry_after == pytest.approx(100.0, abs=0.1)
    # Only the two admitted requests were charged: one more now leaves 10 - 3 in each wide bucket.
    (ok1, (v1,)), (ok2, (v2,)) = await store.check_limits([[per_key], [per_model]])
    assert ok1 and ok2 and v1.remaining == 7 and v2.remaining == 7


@pytest.mark.parametrize("store", ALL, indirect=True)
async def test_denial_in_a_later_slot_refunds_the_earlier(store: Store) -> None:
    """In a cluster the key's and the model's buckets live in different slots: the key group is charged first,
    then the model group denies, and the key's charge must be given back."""
    key, model = unique("bob"), unique("m")
    per_key = Bucket(f"key:{key}", rate=0.01, burst=10)
    per_model = Bucket(f"model:{model}", rate=0.01, burst=2)
    if isinstance(store, RedisStore) and "cluster" in store.url:
        assert redis.crc.key_slot(bucket_key(per_key.bucket).encode()) != redis.crc.key_slot(
            bucket_key(per_model.bucket).encode()
        )
    decisions = await store.check_limits([[per_key, per_model]] * 5)
    assert [ok for ok, _ in decisions] == [True, True, False, False, False]
    assert [v.allowed for v in decisions[4][1]] == [True, False]
    ((ok, (v,)),) = await store.check_limits([[per_key]])
    assert ok and v.remaining == 10 - 3
    # And the other way round: the model admits, a later key bucket denies.
    tight_key = Bucket(f"key:{unique('carol')}", rate=0.01, burst=1)
    wide_model = Bucket(f"model:{unique('m')}", rate=0.01, burst=10)
    decisions = await store.check_limits([[wide_model, tight_key]] * 3)
    assert [ok for ok, _ in decisions] == [True, False, False]
    ((ok, (v,)),) = await store.check_limits([[wide_model]])
    assert ok and v.remaining == 10 - 2


@pytest.mark.parametrize("store", ALL, indirect=True)
async def test_concurrent_callers_share_one_bucket_exactly(store: Store) -> None:
    limit = Bucket(unique("model:shared"), rate=0.01, burst=20)
    results = await asyncio.gather(*(store.check_limits([[limit]] * 3) for _ in range(10)))
    admitted = [ok for decisions in results for ok, _ in decisions]
    assert admitted.count(True) == 20 and len(admitted) == 30


# ---- keys, every store ----


def a_key(name: str, secret_hash: str) -> KeyRecord:
    return KeyRecord(
        name=name,
        secret_hash=secret_hash,
        models=("fraud-detector", "ranker"),
        rate=5.0,
        burst=10,
        expires_at=1.9e9,
        created_at=1.7e9,
        created_by="admin",
        extra={"team": "risk", "tags": ["a", "b"]},
    )


@pytest.mark.parametrize("store", ALL, indirect=True)
async def test_keys_crud(store: Store) -> None:
    name, first, second = unique("alice"), uuid.uuid4().hex, uuid.uuid4().hex
    record = a_key(name, first)
    assert await store.get_key(first) is None
    await store.put_key(record)
    assert await store.get_key(first) == record
    assert record in await store.list_keys()

    replaced = dataclasses.replace(record, secret_hash=second, models=(), rate=None, disabled=True)
    await store.put_key(replaced)
    assert await store.get_key(first) is None, "replacing a key invalidates its old secret"
    assert await store.get_key(second) == replaced
    assert [k for k in await store.list_keys() if k.name == name] == [replaced]

    assert await store.delete_key(name) == replaced
    assert await store.get_key(second) is None
    assert await store.delete_key(name) is None
    assert all(k.name != name for k in await store.list_keys())
    names = [k.name for k in await store.list_keys()]
    assert names == sorted(names)


@pytest.mark.parametrize("store", ALL, indirect=True)
async def test_model_limits_round_trip(store: Store) -> None:
    limits = {"fraud-detector": Limit(2.5, 3), "ranker": Limit(1 / 60, 1)}
    record = dataclasses.replace(a_key(unique("heidi"), uuid.uuid4().hex), model_limits=limits)
    await store.put_key(record)
    found = await store.get_key(record.secret_hash)
    assert found == record and found.model_limits == limits
    assert all(isinstance(limit, Limit) for limit in found.model_limits.values())
    assert record in await store.list_keys()
    cleared = dataclasses.replace(record, model_limits={})
    await store.put_key(cleared)
    assert await store.get_key(record.secret_hash) == cleared
    assert await store.delete_key(record.name) == cleared


@pytest.mark.parametrize("two_stores", ALL, indirect=True)
async def test_watch_keys_hears_replace_and_delete_from_another_process(
    two_stores: tuple[Store, Store],
) -> None:
    watcher, writer = two_stores
    changes: list[str] = []
    stop = await watcher.watch_keys(changes.append)
    name, first, second = unique("dave"), uuid.uuid4().hex, uuid.uuid4().hex
    await writer.put_key(a_key(name, first))  # a new key: nobody can have cached it
    await writer.put_key(a_key(name, second))
    await writer.delete_key(name)
    await eventually(lambda: [h for h in changes if h in (first, second)] == [first, second], 2.0)
    await stop()
    await writer.put_key(a_key(unique("eve"), uuid.uuid4().hex))
    await writer.delete_key(name)
    await asyncio.sleep(0.1)
    assert [h for h in changes if h in (first, second)] == [first, second], "nothing after stop"


# ---- Redis only ----


@pytest.mark.parametrize("two_stores", REDIS, indirect=True)
async def test_heartbeat_counts_live_processes(two_stores: tuple[Store, Store]) -> None:
    one, other = two_stores
    assert await one.heartbeat("process-a", 0.3) == 1
    assert await other.heartbeat("process-b", 10.0) == 2
    assert await other.heartbeat("process-b", 10.0) == 2, "a repeated heartbeat is the same process"
    await asyncio.sleep(0.4)
    assert await other.heartbeat("process-b", 10.0) == 1, "process-a stopped beating and expired"


async def test_memory_store_is_one_process() -> None:
    assert await open_store("memory://").heartbeat("any", 1.0) == 1


def evalsha_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_calls_of_one_tick_share_one_evalsha(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout=PATIENT)
    counter = redis.Redis(port=redis_server.port)
    try:
        await store.check_limits([[Bucket("model:warm-up", 100.0, 10)]])  # script cached, connection open
        before = evalsha_calls(counter)
        limits = [Bucket(unique("model:batch"), 100.0, 10) for _ in range(50)]
        results = await asyncio.gather(*(store.check_limits([[limit]]) for limit in limits))
        assert evalsha_calls(counter) - before == 1
        assert all(ok for ((ok, _),) in results)

        # Sustained: 32 callers in a loop, as 32 client connections would be.
        before, rounds = evalsha_calls(counter), 50
        many = Bucket(unique("model:load"), 1e6, 10**6)

        async def caller() -> None:
            for _ in range(rounds):
                await store.check_limits([[many]])

        await asyncio.gather(*(caller() for _ in range(32)))
        per_request = (evalsha_calls(counter) - before) / (32 * rounds)
        print(f"EVALSHA per request with 32 concurrent callers: {per_request:.3f}")
        assert per_request < 0.1
    finally:
        await store.close()
        counter.close()


async def test_redis_layout_prefix_and_expiry(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout=PATIENT)
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        model = unique("m")
        await store.check_limits([[Bucket(f"model:{model}", rate=10.0, burst=5)]] * 5)
        await store.put_key(a_key(unique("frank"), uuid.uuid4().hex))
        await store.heartbeat("layout", 1.0)
        assert all(key.startswith("gw:") for key in client.keys("*"))
        key = bucket_key(f"model:{model}")
        assert key.startswith(f"gw:{{m:{model}}}:")
        assert 400 < client.pttl(key) <= 502, "a bucket expires when it is full again"
        assert 0 < client.pttl(HEARTBEATS) <= 10_001, "expires with the longest-lived heartbeat (10 s)"
    finally:
        await store.close()
        client.close()


async def test_key_records_on_redis_old_and_new(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout=PATIENT)
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        # Written by a gateway from before per-model limits: no "model_limits" field.
        name, secret_hash = unique("ivan"), uuid.uuid4().hex
        old = {"name": name, "secret_hash": secret_hash, "models": ["m"], "rate": 5.0, "burst": None}
        old |= {
            "expires_at": None,
            "disabled": False,
            "created_at": 1.7e9,
            "created_by": "admin",
            "extra": {},
        }
        client.hset(KEYS_BY_NAME, name, json.dumps(old))
        client.hset(KEYS_BY_HASH, secret_hash, json.dumps(old))
        found = await store.get_key(secret_hash)
        assert found == KeyRecord(
            name, secret_hash, models=("m",), rate=5.0, created_at=1.7e9, created_by="admin"
        )
        assert found.model_limits == {}

        # What every gateway sharing the store reads: model -> {"rate": per second, "burst"}.
        await store.put_key(dataclasses.replace(found, model_limits={"m": Limit(0.5, 2)}))
        written = json.loads(client.hget(KEYS_BY_HASH, secret_hash) or "{}")
        assert written["model_limits"] == {"m": {"rate": 0.5, "burst": 2}}
        assert {k: v for k, v in written.items() if k != "model_limits"} == old
        await store.delete_key(name)
    finally:
        await store.close()
        client.close()


@pytest.mark.parametrize("kind", ["password", "tls"])
async def test_password_and_tls_urls(kind: str) -> None:
    server = RedisServer(password="s3cret/+@" if kind == "password" else None, tls=kind == "tls").start()
    try:
        url = server.url.replace("s3cret/+@", "s3cret%2F%2B%40")  # URL-quoted, as in a config file
        store = RedisStore(url, timeout=PATIENT)
        limit = Bucket(unique("model:m"), rate=10.0, burst=2)
        assert [ok for ok, _ in await store.check_limits([[limit]] * 3)] == [True, True, False]
        await store.close()
        # A wrong password; or no CA given, so the self-signed certificate is not trusted.
        wrong = url.replace("s3cret", "wrong") if kind == "password" else url.split("?")[0]
        store = RedisStore(wrong, timeout=PATIENT)
        with pytest.raises(StoreUnavailable, match=r"password|AUTH|certificate"):
            await store.ping()
        await store.close()
    finally:
        server.cleanup()


async def test_outage_fails_fast_and_recovers() -> None:
    server = RedisServer().start()  # its own server: this test stops it
    store, other = RedisStore(server.url, timeout=PATIENT), RedisStore(server.url, timeout=PATIENT)
    changes: list[str] = []
    stop = await store.watch_keys(changes.append)
    limit = Bucket(unique("model:m"), rate=1000.0, burst=1000)
    record = a_key(unique("grace"), uuid.uuid4().hex)
    operations: dict[str, Callable[[], Awaitable[object]]] = {
        "check_limits": lambda: store.check_limits([[limit]]),
        "get_key": lambda: store.get_key(record.secret_hash),
        "put_key": lambda: store.put_key(record),
        "list_keys": store.list_keys,
        "delete_key": lambda: store.delete_key("nobody"),
        "heartbeat": lambda: store.heartbeat("p", 5.0),
        "ping": store.ping,
    }

    async def all_fail_fast(how: str) -> None:
        for what, operation in operations.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                await operation()
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, f"{what} took {elapsed:.2f}s with Redis {how}"
            assert server.url.split("/")[2] in str(raised.value), "the reason names the server"

    async def all_work(when: str, copies: int = 1) -> None:
        """Every operation succeeds (`copies` of each at once); a failure says when and which."""

        async def attempt(what: str, operation: Callable[[], Awaitable[object]]) -> None:
            started = time.monotonic()
            try:
                await operation()
            except StoreUnavailable as exc:
                pytest.fail(f"{when}: {what} failed after {time.monotonic() - started:.3f}s: {exc}")

        await asyncio.gather(*(attempt(w, op) for _ in range(copies) for w, op in operations.items()))

    try:
        await all_work("at first")
        server.freeze()  # hung: connections stay open, nothing answers
        await all_fail_fast("hung")
        server.thaw()
        await all_work("after thaw")

        server.stop()  # down: connections refused
        await all_fail_fast("down")
        started = time.monotonic()
        late: list[str] = []
        stop_late = await store.watch_keys(late.append)  # subscribing while down neither hangs nor raises
        assert time.monotonic() - started < 1.5

        server.start()  # same port, empty: the same store objects work again
        await all_work("after restart")
        assert await store.get_key(record.secret_hash) == record
        await eventually(lambda: "*" in changes and "*" in late, 3.0)
        await other.delete_key(record.name)  # and notifications flow again
        await eventually(lambda: record.secret_hash in changes, 2.0)
        await stop_late()

        # A restart between two commands: the pooled connections the server closed are not handed out.
        await all_work("before a quick restart", copies=5)
        server.stop()
        await asyncio.sleep(0.1)
        server.start()
        await all_work("after a quick restart", copies=5)
    finally:
        await stop()
        await store.close()
        await other.close()
        server.cleanup()


# ---- leases, fenced state, statistics on the store's clock (the rollout controller's) ----


@pytest.mark.parametrize("two_stores", ALL, indirect=True)
async def test_lease_fencing_token_refuses_a_stale_holders_write(two_stores: tuple[Store, Store]) -> None:
    one, other = two_stores
    lease, name = unique("lease"), unique("rollout:fenced")
    first = await one.lease(lease, "a", 0.3)
    assert first > 0 and await other.lease(lease, "b", 0.3) == 0
    assert await one.lease(lease, "a", 0.3) == first, "a renewal keeps the token"
    assert await one.put_state_fenced(name, {"by": "a"}, lease, first)
    await asyncio.sleep(0.45)  # "a" stalls past its lease
    second = await other.lease(lease, "b", 5.0)
    assert second > first
    assert not await one.put_state_fenced(name, {"by": "a, stale"}, lease, first)
    assert await one.get_state(name) == {"by": "a"}
    assert await one.lease(lease, "a", 0.3) == 0
    assert await other.put_state_fenced(name, {"by": "b"}, lease, second)
    assert await one.get_state(name) == {"by": "b"}
    assert not await one.put_state_fenced(name, {"by": "nobody"}, unique("never-held"), second)


@pytest.mark.parametrize("store", ALL, indirect=True)
async def test_stats_expire_on_the_store_clock(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    process = unique("process")
    if store.url != "memory://":  # a writer whose clock is an hour ahead changes nothing: Redis's TIME rules
        skewed = time.time() + 3600.0
        monkeypatch.setattr(time, "time", lambda: skewed)
    await store.put_stats(process, {"process": process, "n": 1}, 0.3)
    monkeypatch.undo()
    published = await store.get_stats()
    assert {"process": process, "n": 1} in published.stats
    assert abs(published.now - await store.time()) < 1.0
    await asyncio.sleep(0.45)
    assert {"process": process, "n": 1} not in (await store.get_stats()).stats
