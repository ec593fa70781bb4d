"""The embedded store: process memory. Exact for one process; it cannot be shared, so a gateway with
several workers refuses it whenever it would hold shared state (keys or limits).

A limit bucket whose TAT has passed is full again, and GCRA gives a full bucket exactly the answers it
gives one never seen, so such buckets are dropped: every `client:{address}` of a flood would otherwise
stay forever. The sweep runs when the buckets have doubled since the last one, so it costs O(1) per
check amortized and memory stays within twice the buckets that are not full (plus `MIN_SWEEP`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from gateway.store.base import HISTORY_LIMIT, KeyRecord, Published, Revoked, coalesced
from gateway.store.gcra import Answer, Bucket, Verdict, check_all, summarize

MIN_SWEEP: Final = 1024  # below this many buckets a sweep would cost more than it saves


class MemoryStore:
    def __init__(self, url: str = "memory://", clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._sweep_at = MIN_SWEEP
        self._keys: dict[str, KeyRecord] = {}  # by name
        self._watchers: list[Revoked] = []
        self._stats: dict[str, tuple[float, dict[str, Any]]] = {}
        self._leases: dict[str, tuple[str, int, float]] = {}  # name -> (holder, fencing token, expiry)
        self._lease_tokens: dict[str, int] = {}  # name -> the last token handed out
        self._states: dict[str, str] = {}

    def admit_now(self, limits: Sequence[Bucket]) -> Answer:
        """Always decided at once: the embedded store has no round trip to wait for.

        `gcra.check_all` inlined for the common case, every limit admitting (no Verdict objects, one
        pass to check and one to charge); a refusal takes `check_all` itself, for its exact verdicts.
        """
        now = self._clock()
        if len(self._tats) >= self._sweep_at:
            self._sweep(now)
        tats = self._tats
        starts = []
        for limit in limits:
            tat = tats.get(limit.bucket, 0.0)
            start = tat if tat > now else now
            if not start - now <= (limit.burst - 1) * (
                1.0 / limit.rate
            ):  # gcra's test, operation for operation
                _, _, verdicts = check_all([tats.get(x.bucket, 0.0) for x in limits], now, limits)
                return summarize(False, verdicts)
            starts.append(start)
        tightest, remaining, reset = 0, 0, 0.0
        for i, limit in enumerate(limits):
            interval = 1.0 / limit.rate
            start = starts[i]
            tats[limit.bucket] = start + interval
            left = int((now + (limit.burst - 1) * interval - start) / interval + 1e-9)
            if i == 0 or left < remaining:
                tightest, remaining, reset = i, left, start + interval - now
        return Answer(True, tightest, remaining, reset, 0.0)

    async def admit(self, limits: Sequence[Bucket]) -> Answer:
        return self.admit_now(limits)

    async def check_limits(self, requests: Sequence[Sequence[Bucket]]) -> list[tuple[bool, list[Verdict]]]:
        now = self._clock()
        if len(self._tats) >= self._sweep_at:
            self._sweep(now)
        decisions = []
        for limits in requests:
            tats = [self._tats.get(limit.bucket, 0.0) for limit in limits]
            admitted, new_tats, verdicts = check_all(tats, now, limits)
            if admitted:
                for limit, tat in zip(limits, new_tats, strict=True):
                    self._tats[limit.bucket] = tat
            decisions.append((admitted, verdicts))
        return decisions

    def _sweep(self, now: float) -> None:
        self._tats = {bucket: tat for bucket, tat in self._tats.items() if tat > now}
        self._sweep_at = max(MIN_SWEEP, 2 * len(self._tats))

    def bucket_count(self) -> int:
        """Limit buckets held, full ones not yet swept included."""
        return len(self._tats)

    async def get_key(self, secret_hash: str) -> KeyRecord | None:
        return next((k for k in self._keys.values() if k.secret_hash == secret_hash), None)

    async def put_key(self, record: KeyRecord) -> None:
        old = self._keys.get(record.name)
        self._keys[record.name] = record
        if old is not None:
            self._notify(old.secret_hash)

    async def list_keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda k: k.name)

    async def delete_key(self, name: str) -> KeyRecord | None:
        old = self._keys.pop(name, None)
        if old is not None:
            self._notify(old.secret_hash)
        return old

    async def watch_keys(self, on_change: Revoked) -> Callable[[], Awaitable[None]]:
        self._watchers.append(on_change)

        async def stop() -> None:
            self._watchers.remove(on_change)

        return stop

    async def heartbeat(self, process_id: str, ttl: float) -> int:
        return 1

    async def put_stats(self, process_id: str, stats: dict[str, Any], ttl: float) -> None:
        self._stats[process_id] = (self._clock() + ttl, json.loads(json.dumps(stats)))

    async def get_stats(self) -> Published:
        now = self._clock()
        return Published(now, [stats for expires, stats in self._stats.values() if expires > now])

    async def time(self) -> float:
        return self._clock()

    async def lease(self, name: str, holder: str, ttl: float) -> int:
        now = self._clock()
        current = self._leases.get(name)
        if current is not None and current[0] == holder and current[2] > now:
            self._leases[name] = (holder, current[1], now + ttl)
            return current[1]
        if current is None or current[2] <= now:
            token = self._lease_tokens.get(name, 0) + 1
            self._lease_tokens[name] = token
            self._leases[name] = (holder, token, now + ttl)
            return token
        return 0

    async def put_state_fenced(self, name: str, value: dict[str, Any], lease: str, token: int) -> bool:
        current = self._leases.get(lease)
        if current is None or current[1] != token or current[2] <= self._clock():
            return False
        await self.put_state(name, value)
        return True

    async def get_state(self, name: str) -> dict[str, Any] | None:
        value = self._states.get(name)
        return json.loads(value) if value is not None else None

    async def put_state(self, name: str, value: dict[str, Any]) -> None:
        self._states[name] = json.dumps(value)  # a copy, as a real store would keep

    # The version registry lives among the JSON documents, under names no other caller uses.

    async def register_version(
        self, model: str, version: str, record: dict[str, Any]
    ) -> dict[str, Any] | None:
        versions = await self.get_versions(model)
        if version in versions:
            return versions[version]
        await self.put_state(f"registry\0{model}", {**versions, version: record})
        return None

    async def get_versions(self, model: str) -> dict[str, dict[str, Any]]:
        return await self.get_state(f"registry\0{model}") or {}

    async def add_version_event(
        self, model: str, version: str, event: dict[str, Any], coalesce: bool = False
    ) -> None:
        name = f"registry-history\0{model}\0{version}"
        events = json.loads(self._states.get(name, "[]"))
        if coalesce and events and events[-1].get("kind") == event.get("kind"):
            events[-1] = coalesced(events[-1], event)
        else:
            events = [*events, event][-HISTORY_LIMIT:]
        self._states[name] = json.dumps(events)

    async def get_version_events(self, model: str, version: str) -> list[dict[str, Any]]:
        name = f"registry-history\0{model}\0{version}"
        events: list[dict[str, Any]] = json.loads(self._states.get(name, "[]"))
        return events

    async def ping(self) -> float:
        return 0.0

    async def close(self) -> None:
        pass

    def _notify(self, secret_hash: str) -> None:
        for watcher in list(self._watchers):
            watcher(secret_hash)
