"""Hostile clients against keys and limits: a flood of made-up keys costs the store a bounded number of
lookups and cannot push a real key out of the cache; a flood of client addresses leaves no buckets behind.

The budget and the memory store are checked in process, with a hand-driven clock; the bound that matters
is then measured on a real gateway process in front of a real redis-server, counting the store's key
lookups (HGET) in Redis's own `INFO commandstats`. The backend is the FAKE echo backend
(`tests/fault_backend.py`): what it answers does not matter here, only that a real key gets through.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from gateway.access import key_cache, keys
from gateway.access.admission import Admission, AdmissionDecision, access_policy
from gateway.access.key_cache import KeyCache, LookupBudget, client_scope
from gateway.routing.config import parse_table
from gateway.store.base import KeyRecord
from gateway.store.gcra import Bucket
from gateway.store.memory import MIN_SWEEP, MemoryStore
from tests.fault_backend import FaultBackend, fault_backend
from tests.redis_servers import RedisServer, cli
from tests.support import GatewayProcess, RawClient, gateway, request
from tests.test_limits_e2e import create_key

ROUTES = """
backends:
  a: {url: "http://127.0.0.1:9", timeout: 1s}
models:
  m:
    versions:
      "1": {backend: a, target: m/1}
keys: {required: true}
"""


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.get_key_calls = 0

    async def get_key(self, secret_hash: str) -> KeyRecord | None:
        self.get_key_calls += 1
        return await super().get_key(secret_hash)


class Caller:
    def __init__(self, client: str, secret: str) -> None:
        self.client = client
        self._authorization = f"Bearer {secret}".encode()

    def header(self, name: bytes) -> bytes | None:
        return self._authorization if name == b"authorization" else None


TABLE = parse_table(ROUTES)
POLICY = access_policy(TABLE, TABLE.models["m"])


async def admit(admission: Admission, client: str, secret: str) -> AdmissionDecision:
    done: asyncio.Future[AdmissionDecision] = asyncio.get_running_loop().create_future()
    admission.admit(POLICY, Caller(client, secret), done.set_result, done.set_exception)
    return await asyncio.wait_for(done, 2)


def random_key() -> str:
    return keys.SECRET_PREFIX + secrets.token_urlsafe(32)


# -- in process ----------------------------------------------------------------------------------


def test_the_budget_is_per_client_and_per_process_and_a_refusal_charges_nothing() -> None:
    budget = LookupBudget(client_rate=10, client_burst=20, process_rate=50, process_burst=30)
    assert [budget.take("10.0.0.1", 0.0) for _ in range(21)] == [None] * 20 + ["client"]
    # Another address has its own budget, until the process's is spent (30 at once).
    assert [budget.take("10.0.0.2", 0.0) for _ in range(11)] == [None] * 10 + ["process"]
    assert budget.take("10.0.0.3", 0.0) == "process"
    assert budget.take("10.0.0.3", 0.02) is None  # one process interval later: refusals took nothing
    assert budget.take("10.0.0.1", 0.1) is None  # one client interval later
    assert budget.take("10.0.0.1", 0.1) == "client"


def test_an_ipv6_client_is_budgeted_by_its_64_and_mapped_ipv4_by_its_address() -> None:
    assert client_scope("2001:db8:1:2::1") == client_scope("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert client_scope("2001:db8:1:2::1") != client_scope("2001:db8:1:3::1")
    assert client_scope("::ffff:10.0.0.7") == "10.0.0.7" == client_scope("10.0.0.7")
    budget = LookupBudget(client_rate=1, client_burst=2)
    assert [budget.take(f"2001:db8::{i:x}", 0.0) for i in range(3)] == [None, None, "client"]


def test_the_budget_remembers_a_bounded_number_of_addresses() -> None:
    budget = LookupBudget(process_rate=1e9, process_burst=10**9, max_clients=100)
    for i in range(10_000):
        assert budget.take(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 0.0) is None
        assert budget.addresses() <= 100
    # Once their buckets are full again, addresses cost nothing: the next charge drops them all.
    assert budget.take("10.9.9.9", 60.0) is None and budget.addresses() == 1


async def test_a_flood_of_random_keys_costs_a_bounded_number_of_store_lookups() -> None:
    store = CountingStore()
    real = random_key()
    await store.put_key(KeyRecord("team-a", keys.hash_secret(real)))
    admission = Admission(store, "fail_closed")
    assert (await admit(admission, "10.0.0.1", real)).status == 0
    assert store.get_key_calls == 1
    started = time.monotonic()
    statuses = Counter([(await admit(admission, "10.6.6.6", random_key())).status for _ in range(10_000)])
    elapsed = time.monotonic() - started
    assert statuses == {401: 10_000}
    bound = key_cache.CLIENT_LOOKUP_BURST + key_cache.CLIENT_LOOKUP_RATE * elapsed
    assert store.get_key_calls - 1 <= bound, (store.get_key_calls, elapsed)
    outcomes = admission.stats.outcomes
    assert outcomes[("", "m", "lookup_throttled_client")] >= 10_000 - bound
    # The real key was not pushed out, and a real key first seen from another address still works.
    calls = store.get_key_calls
    assert [(await admit(admission, "10.0.0.1", real)).status for _ in range(100)] == [0] * 100
    other = random_key()
    await store.put_key(KeyRecord("team-b", keys.hash_secret(other)))
    assert (await admit(admission, "10.0.0.2", other)).status == 0
    assert store.get_key_calls == calls + 1
    await admission.cache.stop()


async def test_past_the_process_budget_a_key_gets_503_with_retry_after() -> None:
    admission = Admission(CountingStore(), "fail_closed")
    admission.cache.budget = LookupBudget(process_rate=0.001, process_burst=2)
    decisions = [await admit(admission, f"10.0.0.{i}", random_key()) for i in range(4)]
    assert [d.status for d in decisions] == [401, 401, 503, 503]
    assert dict(decisions[2].headers)[b"retry-after"] == b"1" and "retry" in decisions[2].message
    await admission.cache.stop()


async def test_a_known_key_is_looked_up_again_even_when_its_address_is_over_budget() -> None:
    now = [1000.0]
    store = CountingStore()
    real = KeyRecord("team-a", keys.hash_secret(random_key()))
    await store.put_key(real)
    cache = KeyCache(store, clock=lambda: now[0], budget=LookupBudget(client_rate=0.001, client_burst=1))
    assert cache.over_budget(real.secret_hash, "10.0.0.1") is None
    assert await cache.lookup(real.secret_hash) == real
    assert cache.over_budget(keys.hash_secret(random_key()), "10.0.0.1") == "client"
    now[0] += 31.0  # its entry went stale: refreshing it is not a guess, so it is not charged
    assert cache.peek(real.secret_hash) is key_cache.MISSING
    assert cache.over_budget(real.secret_hash, "10.0.0.1") is None
    assert await cache.lookup(real.secret_hash) == real and store.get_key_calls == 2


async def test_a_flood_of_distinct_client_buckets_does_not_stay_in_memory() -> None:
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    batch, peak = 5_000, 0
    for round_ in range(50):  # 250,000 distinct buckets
        requests = [[Bucket(f"client:10.{round_}.{i >> 8}.{i & 255}", 100.0, 5)] for i in range(batch)]
        assert all(admitted for admitted, _ in await store.check_limits(requests))
        peak = max(peak, store.bucket_count())
        now[0] += 0.1  # each bucket is full again 10 ms after its one request
    assert peak <= 2 * batch + MIN_SWEEP, peak
    # A bucket that is not full survives a sweep, and keeps limiting.
    hot = [Bucket("client:10.200.0.1", 1.0, 2)]
    assert [admitted for admitted, _ in await store.check_limits([hot, hot, hot])] == [True, True, False]
    await store.check_limits([[Bucket(f"client:x{i}", 100.0, 5)] for i in range(3 * MIN_SWEEP)])
    now[0] += 0.5
    await store.check_limits([[Bucket("client:10.200.0.2", 100.0, 5)]])
    assert store.bucket_count() <= 3
    assert [admitted for admitted, _ in await store.check_limits([hot])] == [False]


# -- a real gateway, a real Redis ----------------------------------------------------------------

E2E_ROUTES = """
backends:
  fake: {{url: "http://127.0.0.1:{port}", timeout: 5s}}
models:
  echo:
    versions:
      "1": {{backend: fake, target: echo/1}}
keys: {{required: true}}
store: {{url: "{store}", on_error: fail_closed, timeout: 500ms}}
"""
INFER = "/v2/models/echo/infer"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def backend() -> Iterator[FaultBackend]:
    with fault_backend() as fb:
        yield fb


def key_lookups(redis: RedisServer) -> int:
    """HGETs Redis has served: the store's only use of HGET is looking a key up by its hash."""
    for line in cli(redis.port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_hget:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def send_all(
    process: GatewayProcess, secrets_: list[str], statuses: Counter[int], lock: threading.Lock
) -> None:
    """One keep-alive connection, one request after another (a new connection if the gateway closes it)."""
    client = RawClient(process.port)
    try:
        for secret in secrets_:
            client.send(request("POST", INFER, b"", {"Authorization": f"Bearer {secret}"}))
            response = client.read_response()
            with lock:
                statuses[response.status] += 1
            if (response.header("connection") or "").lower() == "close":
                client.close()
                client = RawClient(process.port)
    finally:
        client.close()


def test_ten_thousand_random_keys_cost_a_bounded_number_of_lookups_and_a_real_key_none(
    redis: RedisServer, backend: FaultBackend
) -> None:
    with gateway(E2E_ROUTES.format(port=backend.port, store=redis.url)) as process:
        real = create_key(process, "team-real")
        real_statuses: Counter[int] = Counter()
        lock = threading.Lock()
        send_all(process, [real], real_statuses, lock)  # its one lookup, before counting
        assert real_statuses == {200: 1}
        before = key_lookups(redis)

        flood: Counter[int] = Counter()
        stop = threading.Event()

        def real_traffic() -> None:
            while not stop.is_set():
                send_all(process, [real] * 20, real_statuses, lock)
                time.sleep(0.01)

        started = time.monotonic()
        workers = [
            threading.Thread(
                target=send_all, args=(process, [random_key() for _ in range(2500)], flood, lock)
            )
            for _ in range(4)
        ]
        steady = threading.Thread(target=real_traffic)
        for thread in [*workers, steady]:
            thread.start()
        for thread in workers:
            thread.join(120)
        elapsed = time.monotonic() - started
        stop.set()
        steady.join(30)
        flood_lookups = key_lookups(redis) - before

        assert flood == {401: 10_000}
        bound = key_cache.CLIENT_LOOKUP_BURST + key_cache.CLIENT_LOOKUP_RATE * elapsed
        assert flood_lookups <= bound, f"{flood_lookups} lookups in {elapsed:.1f}s (bound {bound:.0f})"
        assert set(real_statuses) == {200} and real_statuses[200] > 20  # admitted all along

        # After the flood: the real key is still cached, so its requests cost the store nothing.
        before = key_lookups(redis)
        send_all(process, [real] * 200, real_statuses, lock)
        assert key_lookups(redis) == before and set(real_statuses) == {200}
        print(f"flood: 10000 random keys in {elapsed:.1f}s cost {flood_lookups} store lookups")
