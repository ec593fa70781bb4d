"""Admission in process: which limits apply to a request, all-or-nothing, and the headers it answers with."""

from __future__ import annotations

import asyncio
import random

from gateway.access import keys
from gateway.access.admission import Admission, AdmissionDecision, access_policy, limits_for
from gateway.routing.config import parse_table
from gateway.routing.table import Limit
from gateway.store.base import KeyRecord
from gateway.store.gcra import Bucket, summarize
from gateway.store.memory import MemoryStore

ROUTES = """
backends:
  a: {url: "http://127.0.0.1:9", timeout: 1s}
models:
  fraud:
    versions:
      "1": {backend: a, target: fraud/1}
    limit: {rate: 1000/s, burst: 1000}
  churn:
    versions:
      "1": {backend: a, target: churn/1}
keys:
  required: true
  default_limit: {rate: 100/s, burst: 50}
"""
SECRET = "gwk_" + "s" * 43


class Head:
    def __init__(self, **headers: bytes) -> None:
        self.client = "10.1.2.3"
        self._headers = {name.replace("_", "-").encode(): value for name, value in headers.items()}

    def header(self, name: bytes) -> bytes | None:
        return self._headers.get(name)


def record() -> KeyRecord:
    return KeyRecord("team-a", keys.hash_secret(SECRET), model_limits={"fraud": Limit(1.0, 2)})


def test_every_scope_in_a_fixed_order() -> None:
    table = parse_table(ROUTES)
    fraud = access_policy(table, table.models["fraud"])
    churn = access_policy(table, table.models["churn"])
    names = [b.bucket for b in limits_for(fraud, record(), "10.1.2.3")]
    assert names == ["key:team-a", "key:team-a:model:fraud", "model:fraud"]
    assert [b.bucket for b in limits_for(churn, record(), "10.1.2.3")] == ["key:team-a"]
    assert [b.bucket for b in limits_for(churn, None, "10.1.2.3")] == ["client:10.1.2.3"]


async def admit_many(admission: Admission, model: str, n: int) -> list[AdmissionDecision]:
    table = parse_table(ROUTES)
    policy = access_policy(table, table.models[model])
    decisions: list[AdmissionDecision] = []
    for _ in range(n):
        done: asyncio.Future[AdmissionDecision] = asyncio.get_running_loop().create_future()
        admission.admit(
            policy, Head(authorization=b"Bearer " + SECRET.encode()), done.set_result, done.set_exception
        )
        decisions.append(await asyncio.wait_for(done, 2))
    return decisions


async def test_per_key_per_model_limit_is_enforced_and_named_in_the_policy() -> None:
    store = MemoryStore()
    await store.put_key(record())
    admission = Admission(store, "fail_closed")
    decisions = await admit_many(admission, "fraud", 3)
    assert [d.status for d in decisions] == [0, 0, 429]  # burst 2 on fraud for this key
    policy = dict(decisions[0].headers)[b"ratelimit-policy"].decode()
    assert policy == '"key";q=50;w=1, "keymodel";q=2;w=2, "model";q=1000;w=1'
    assert dict(decisions[2].headers)[b"retry-after"] == b"1"
    # The same key on another model is not held back by that limit.
    assert [d.status for d in await admit_many(admission, "churn", 3)] == [0, 0, 0]
    await admission.cache.stop()


async def test_a_raising_store_reaches_the_failure_callback_instead_of_hanging() -> None:
    store = MemoryStore()
    await store.put_key(record())
    admission = Admission(store, "fail_closed")

    async def broken(limits: object) -> object:
        raise ZeroDivisionError("a bug in the store")

    # The memory store decides at once; this one has to wait for the store, which then raises.
    store.admit_now = lambda limits: None  # type: ignore[method-assign,assignment,return-value]
    store.admit = broken  # type: ignore[method-assign,assignment]
    table = parse_table(ROUTES)
    policy = access_policy(table, table.models["fraud"])
    failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    admission.admit(policy, Head(x_api_key=SECRET.encode()), lambda d: None, failed.set_result)
    assert isinstance(await asyncio.wait_for(failed, 2), ZeroDivisionError)
    await admission.cache.stop()


async def test_the_memory_stores_fast_path_decides_as_its_checks_do() -> None:
    """`admit_now` (inlined GCRA) against `check_limits` (gcra.check_all) on the same clock and requests."""
    clock = [1000.0]
    fast, checked = MemoryStore(clock=lambda: clock[0]), MemoryStore(clock=lambda: clock[0])
    limits = [Bucket("key:a", 10.0, 3), Bucket("key:a:model:m", 4.0, 2), Bucket("model:m", 50.0, 5)]
    rng = random.Random(7)
    for _ in range(400):
        clock[0] += rng.choice([0.0, 0.001, 0.02, 0.1, 0.3])
        request = rng.sample(limits, rng.randint(1, 3))
        answer = fast.admit_now(request)
        [(admitted, verdicts)] = await checked.check_limits([request])
        assert answer == summarize(admitted, verdicts)
