"""Admission: who is calling (API key), may they call this model, and are they within their limits.

It runs between "which model" and "which version": 401 no or bad key, 403 key not allowed for this
model, 429 over a limit (with Retry-After), 503 when the store cannot answer and `store.on_error` is
fail_closed. With fail_open, limits are enforced in this process alone, each at its share of the rate
(the rate divided by the number of live gateway processes, known from heartbeats while the store was up).

A request that needs no key and meets no limit is admitted synchronously, at no cost. Otherwise the
decision takes at most one store round trip, shared with the other requests of the same moment. A key
the cache does not know is looked up only within the lookup budget (`gateway.access.key_cache`), so
made-up keys are answered without the store once a client or the process has spent its budget.

What applies to a model (`AccessPolicy`) is built once per routing snapshot; per request only the key
record varies, and the `RateLimit-Policy` header of each distinct set of limits is built once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from gateway.access import keys
from gateway.access.key_cache import MISSING, KeyCache
from gateway.routing.table import Limit, Model, RouteTable
from gateway.store.base import KeyRecord, Store, StoreUnavailable, redacted
from gateway.store.gcra import Answer, Bucket
from gateway.store.memory import MemoryStore
from gateway.wire.headers import Headers

log = logging.getLogger("gateway.access.admission")

HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TTL = 3.0


NO_HEADERS: Headers = []  # shared by every decision without headers: never appended to


class AdmissionDecision(NamedTuple):
    """A NamedTuple rather than a frozen dataclass: one is made per request (see pipeline.flow.Plan)."""

    status: int  # 0 when admitted
    message: str = ""
    headers: Headers = NO_HEADERS  # rate-limit headers, on admitted and refused answers
    key_name: str = ""  # the caller, for metrics and logs ("" anonymous)


ADMITTED = AdmissionDecision(0)
_LOOKUPS_BUSY = "cannot check the API key now: too many unknown keys are being tried; retry in a second"
Continue = Callable[[AdmissionDecision], None]
Failed = Callable[[BaseException], None]  # a bug while deciding: the caller must still get an answer


class Caller(Protocol):
    """What admission reads of a request, whichever front door it came through."""

    @property
    def client(self) -> str: ...

    def header(self, name: bytes) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Which admission checks apply to one model; built once per routing snapshot."""

    model: str
    key_required: bool
    default_limit: Limit | None  # for keys without their own, and for anonymous callers
    model_bucket: Bucket | None  # the model's own limit, all callers together
    limited: bool = True  # False: who may call (key, model allowed), not how often (metadata reads)
    # Key name ("" anonymous) -> (the record it was built for, its plan): filled as keys are seen, so
    # each plan is built once per snapshot and key record. Not configuration: a cache, never compared.
    plans: dict[str, tuple[KeyRecord | None, LimitPlan | None]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @property
    def needed(self) -> bool:
        return self.key_required or self.default_limit is not None or self.model_bucket is not None


def access_policy(table: RouteTable, model: Model) -> AccessPolicy:
    limit = model.limit
    bucket = Bucket(f"model:{model.name}", limit.rate, limit.burst) if limit is not None else None
    return AccessPolicy(model.name, table.keys.required, table.keys.default_limit, bucket)


@dataclass
class AdmissionStats:
    """Outcomes by (key name, model, outcome); never the secret."""

    outcomes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    store_errors: int = 0
    fail_open: int = 0
    fail_closed: int = 0

    def count(self, key: str, model: str, outcome: str) -> None:
        slot = (key, model, outcome)
        self.outcomes[slot] = self.outcomes.get(slot, 0) + 1


MAX_PLANS = 4096  # plans remembered per policy (one per key); beyond that the cache starts again


@dataclass(frozen=True, slots=True)
class LimitPlan:
    """What admission needs of one key (or caller) on one model, built once per snapshot and key record."""

    buckets: tuple[Bucket, ...]
    names: tuple[bytes, ...]  # each limit's policy name ("key", "keymodel", "model", "client")
    policy: bytes  # the RateLimit-Policy value (IETF httpapi ratelimit-headers draft)


def limit_plan(limits: list[Bucket]) -> LimitPlan:
    limits = list(dict.fromkeys(limits))  # distinct: a bucket is charged once per request (Store.admit_now)
    names = tuple(_policy_name(limit.bucket).encode() for limit in limits)
    policies = [
        b'"%s";q=%d;w=%d' % (name, limit.burst, max(1, math.ceil(limit.burst / limit.rate)))
        for name, limit in zip(names, limits, strict=True)
    ]
    return LimitPlan(tuple(limits), names, b", ".join(policies))


def plan_for(policy: AccessPolicy, record: KeyRecord | None, client: str) -> LimitPlan | None:
    """The plan for one request; None when no limit applies. Cached on the policy (so per snapshot) by
    key name, and used while the cache holds that very record: a changed key gets a new plan."""
    if not policy.limited:
        return None
    cacheable = record is not None or policy.default_limit is None  # else it is per client address
    slot = record.name if record is not None else ""
    if cacheable:
        cached = policy.plans.get(slot)
        if cached is not None and cached[0] is record:
            return cached[1]
    limits = limits_for(policy, record, client)
    plan = limit_plan(limits) if limits else None
    if cacheable:
        if len(policy.plans) >= MAX_PLANS:
            policy.plans.clear()
        policy.plans[slot] = (record, plan)
    return plan


def answer_headers(plan: LimitPlan, answer: Answer) -> Headers:
    """RateLimit-Policy and RateLimit: every policy, and the tightest one's state."""
    state = b'"%s";r=%d;t=%d' % (plan.names[answer.tightest], answer.remaining, math.ceil(answer.reset_after))
    return [(b"ratelimit-policy", plan.policy), (b"ratelimit", state)]


def _policy_name(bucket: str) -> str:
    kind = bucket.split(":", 1)[0]  # "key", "model", "client"
    return "keymodel" if kind == "key" and ":model:" in bucket else kind


def limits_for(policy: AccessPolicy, record: KeyRecord | None, client: str) -> list[Bucket]:
    """Every limit that applies to one request, in a fixed order."""
    limits = []
    default = policy.default_limit
    model = policy.model
    if record is not None:
        if record.rate is not None:
            limits.append(
                Bucket(f"key:{record.name}", record.rate, record.burst or max(1, math.ceil(record.rate)))
            )
        elif default is not None:
            limits.append(Bucket(f"key:{record.name}", default.rate, default.burst))
        per_model = record.model_limits.get(model)
        if per_model is not None:
            # In the key's hash slot on Redis Cluster (see store.redis_layout.bucket_key).
            limits.append(Bucket(f"key:{record.name}:model:{model}", per_model.rate, per_model.burst))
    elif default is not None:
        limits.append(Bucket(f"client:{client}", default.rate, default.burst))
    if policy.model_bucket is not None:
        limits.append(policy.model_bucket)
    return limits


class Admission:
    def __init__(self, store: Store, on_error: str) -> None:
        self.store = store
        self.on_error = on_error
        self.cache = KeyCache(store)
        self.stats = AdmissionStats()
        self.store_up = True
        self.live_processes = 1
        self._local = MemoryStore()  # fail_open's per-process buckets
        self.process_id = f"{os.uname().nodename}:{os.getpid()}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.cache.start()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self.cache.stop()
        await self.store.close()

    def admit(self, policy: AccessPolicy, caller: Caller, then: Continue, failed: Failed) -> None:
        """Decide, then call `then(decision)`: now if no store is needed, else after one round trip.

        If deciding raises after the first await, `failed(exc)` is called instead, so that no request
        waits forever on a task that died.
        """
        secret = keys.secret_from_headers(caller.header(b"authorization"), caller.header(b"x-api-key"))
        if secret is None:
            if policy.key_required:
                self.stats.count("", policy.model, "no_key")
                then(AdmissionDecision(401, keys.KEY_REQUIRED.message))
                return
            self._limit(policy, None, caller.client, then, failed)
            return
        secret_hash = keys.hash_secret(secret)
        cached = self.cache.peek(secret_hash)
        if cached is not MISSING:
            self._authorized(policy, cached, caller.client, then, failed)
            return
        spent = self.cache.over_budget(secret_hash, caller.client)
        if spent is not None:
            # A flood of made-up keys: answered without the store, so it costs the store nothing more.
            self.stats.count("", policy.model, f"lookup_throttled_{spent}")
            if spent == "client":
                then(AdmissionDecision(401, keys.UNKNOWN_KEY.message))
            else:  # every client together: this one may well hold a real key, so it should retry
                then(AdmissionDecision(503, _LOOKUPS_BUSY, [(b"retry-after", b"1")]))
            return
        self._spawn(self._lookup_then(policy, secret_hash, caller.client, then, failed), failed)

    async def _lookup_then(
        self, policy: AccessPolicy, secret_hash: str, client: str, then: Continue, failed: Failed
    ) -> None:
        try:
            record = await self.cache.lookup(secret_hash)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            self.stats.count("", policy.model, "store_unavailable")
            then(AdmissionDecision(503, "cannot check the API key now: the key store is unavailable"))
            return
        self._authorized(policy, record, client, then, failed)

    def _authorized(
        self, policy: AccessPolicy, record: KeyRecord | None, client: str, then: Continue, failed: Failed
    ) -> None:
        denial = keys.authorize(record, policy.model, time.time())
        if denial is not None:
            name = record.name if record is not None else ""
            self.stats.count(name, policy.model, f"denied_{denial.reason}")
            then(AdmissionDecision(denial.status, denial.message, key_name=name))
            return
        self._limit(policy, record, client, then, failed)

    def _limit(
        self, policy: AccessPolicy, record: KeyRecord | None, client: str, then: Continue, failed: Failed
    ) -> None:
        name = record.name if record is not None else ""
        plan = plan_for(policy, record, client)
        if plan is None:
            self.stats.count(name, policy.model, "admitted")
            then(AdmissionDecision(0, key_name=name))
            return
        answer = self.store.admit_now(plan.buckets)  # the fast path: no await, no task, no future
        if answer is not None:
            self._answer(plan, answer, name, policy.model, then)
            return
        self._spawn(self._check(plan, name, policy.model, then), failed)

    async def _check(self, plan: LimitPlan, name: str, model: str, then: Continue) -> None:
        try:
            answer = await self.store.admit(plan.buckets)
            self.store_up = True
        except StoreUnavailable as exc:
            self._store_failed(exc)
            if self.on_error != "fail_open":
                self.stats.fail_closed += 1
                self.stats.count(name, model, "store_unavailable")
                then(AdmissionDecision(503, "rate limits cannot be checked now: the store is unavailable"))
                return
            self.stats.fail_open += 1
            share = max(1, self.live_processes)
            local = [Bucket(x.bucket, x.rate / share, max(1, x.burst // share)) for x in plan.buckets]
            plan = limit_plan(local)
            answer = self._local.admit_now(plan.buckets)
        self._answer(plan, answer, name, model, then)

    def _answer(self, plan: LimitPlan, answer: Answer, name: str, model: str, then: Continue) -> None:
        headers = answer_headers(plan, answer)
        if answer.admitted:
            self.stats.count(name, model, "admitted")
            then(AdmissionDecision(0, headers=headers, key_name=name))
            return
        retry = max(1, math.ceil(answer.retry_after))
        headers.append((b"retry-after", str(retry).encode()))
        self.stats.count(name, model, "limited")
        then(AdmissionDecision(429, f"rate limited; retry after {retry}s", headers, name))

    def _store_failed(self, exc: Exception) -> None:
        self.stats.store_errors += 1
        if self.store_up:
            log.error("store %s unavailable (%s); on_error=%s", redacted(self.store.url), exc, self.on_error)
        self.store_up = False

    async def _beat(self) -> None:
        while True:
            try:
                self.live_processes = await self.store.heartbeat(self.process_id, HEARTBEAT_TTL)
                if not self.store_up:
                    log.info("store %s is back", redacted(self.store.url))
                self.store_up = True
            except StoreUnavailable as exc:
                self._store_failed(exc)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    def _spawn(self, coroutine: Coroutine[Any, Any, None], failed: Failed) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failed(task.exception() or RuntimeError("admission failed"))

        task.add_done_callback(done)
