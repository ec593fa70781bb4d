"""Admission: who is calling (API key), may they call this model, and are they within their limits.

It runs between "which model" and "which version": 401 no or bad key, 403 key not allowed for this
model, 429 over a limit (with Retry-After), 503 when the store cannot answer and `store.on_error` is
fail_closed. With fail_open, limits are enforced in this process alone, each at its share of the rate
(the rate divided by the number of live gateway processes, known from heartbeats while the store was up).

A request that needs no key and meets no limit is admitted synchronously, at no cost. Otherwise the
decision takes at most one store round trip, shared with the other requests of the same moment.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from gateway import keys
from gateway.http_server import Headers, Request
from gateway.ratelimit import Limit, Verdict
from gateway.store.base import KeyRecord, Store, StoreUnavailable, redacted
from gateway.store.memory import MemoryStore
from gateway.table import Model, RouteTable

log = logging.getLogger("gateway.admission")

HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TTL = 3.0


@dataclass(frozen=True, slots=True)
class Decision:
    status: int  # 0 when admitted
    message: str = ""
    headers: Headers = field(default_factory=list)  # rate-limit headers, on admitted and refused answers
    key_name: str = ""  # the caller, for metrics and logs ("" anonymous)


ADMITTED = Decision(0)
Continue = Callable[[Decision], None]


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


def rate_limit_headers(limits: list[Limit], verdicts: list[Verdict]) -> Headers:
    """RateLimit-Policy and RateLimit (IETF httpapi draft): every policy, and the tightest one's state."""
    policies = []
    for limit in limits:
        window = max(1, math.ceil(limit.burst / limit.rate))
        policies.append(f'"{_policy_name(limit.bucket)}";q={limit.burst};w={window}')
    tightest = min(range(len(limits)), key=lambda i: verdicts[i].remaining)
    verdict = verdicts[tightest]
    state = (
        f'"{_policy_name(limits[tightest].bucket)}";r={verdict.remaining};t={math.ceil(verdict.reset_after)}'
    )
    return [(b"ratelimit-policy", ", ".join(policies).encode()), (b"ratelimit", state.encode())]


def _policy_name(bucket: str) -> str:
    return bucket.split(":", 1)[0]  # "key", "keymodel", "model", "client"


def limits_for(table: RouteTable, model: Model, record: KeyRecord | None, client: str) -> list[Limit]:
    """Every limit that applies to one request, in a fixed order."""
    limits = []
    default = table.keys.default_limit
    if record is not None:
        if record.rate is not None:
            limits.append(
                Limit(f"key:{record.name}", record.rate, record.burst or max(1, math.ceil(record.rate)))
            )
        elif default is not None:
            limits.append(Limit(f"key:{record.name}", default.rate, default.burst))
        per_model = record.extra.get("model_limits", {}).get(model.name)
        if isinstance(per_model, dict) and "rate" in per_model:
            rate = float(per_model["rate"])
            burst = int(per_model.get("burst") or max(1, math.ceil(rate)))
            limits.append(Limit(f"keymodel:{record.name}:{model.name}", rate, burst))
    elif default is not None:
        limits.append(Limit(f"client:{client}", default.rate, default.burst))
    if model.limit is not None:
        limits.append(Limit(f"model:{model.name}", model.limit.rate, model.limit.burst))
    return limits


class Admission:
    def __init__(self, store: Store, on_error: str) -> None:
        self.store = store
        self.on_error = on_error
        self.cache = keys.KeyCache(store)
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

    def needed(self, table: RouteTable, model: Model) -> bool:
        return table.keys.required or table.keys.default_limit is not None or model.limit is not None

    def admit(self, table: RouteTable, model: Model, request: Request, then: Continue) -> None:
        """Decide, then call `then(decision)`: now if no store is needed, else after one round trip."""
        secret = keys.secret_from_headers(request.header(b"authorization"), request.header(b"x-api-key"))
        if secret is None:
            if table.keys.required:
                self.stats.count("", model.name, "no_key")
                then(Decision(401, keys.KEY_REQUIRED.message))
                return
            self._limit(table, model, None, request.client, then)
            return
        secret_hash = keys.hash_secret(secret)
        cached = self.cache.peek(secret_hash)
        if cached is not keys.MISSING:
            self._authorized(table, model, cached, request.client, then)
            return
        self._spawn(self._lookup_then(table, model, secret_hash, request.client, then))

    async def _lookup_then(
        self, table: RouteTable, model: Model, secret_hash: str, client: str, then: Continue
    ) -> None:
        try:
            record = await self.cache.lookup(secret_hash)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            self.stats.count("", model.name, "store_unavailable")
            then(Decision(503, "cannot check the API key now: the key store is unavailable"))
            return
        self._authorized(table, model, record, client, then)

    def _authorized(
        self, table: RouteTable, model: Model, record: KeyRecord | None, client: str, then: Continue
    ) -> None:
        denial = keys.authorize(record, model.name, time.time())
        if denial is not None:
            name = record.name if record is not None else ""
            self.stats.count(name, model.name, f"denied_{denial.reason}")
            then(Decision(denial.status, denial.message, key_name=name))
            return
        self._limit(table, model, record, client, then)

    def _limit(
        self, table: RouteTable, model: Model, record: KeyRecord | None, client: str, then: Continue
    ) -> None:
        name = record.name if record is not None else ""
        limits = limits_for(table, model, record, client)
        if not limits:
            self.stats.count(name, model.name, "admitted")
            then(Decision(0, key_name=name))
            return
        self._spawn(self._check(limits, name, model.name, then))

    async def _check(self, limits: list[Limit], name: str, model: str, then: Continue) -> None:
        try:
            [(admitted, verdicts)] = await self.store.check_limits([limits])
            self.store_up = True
        except StoreUnavailable as exc:
            self._store_failed(exc)
            if self.on_error != "fail_open":
                self.stats.fail_closed += 1
                self.stats.count(name, model, "store_unavailable")
                then(Decision(503, "rate limits cannot be checked now: the store is unavailable"))
                return
            self.stats.fail_open += 1
            share = max(1, self.live_processes)
            local = [Limit(lim.bucket, lim.rate / share, max(1, lim.burst // share)) for lim in limits]
            [(admitted, verdicts)] = await self._local.check_limits([local])
            limits = local
        headers = rate_limit_headers(limits, verdicts)
        if admitted:
            self.stats.count(name, model, "admitted")
            then(Decision(0, headers=headers, key_name=name))
            return
        retry = max(1, math.ceil(max(v.retry_after for v in verdicts)))
        headers.append((b"retry-after", str(retry).encode()))
        self.stats.count(name, model, "limited")
        then(Decision(429, f"rate limited; retry after {retry}s", headers, name))

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

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
