"""The embedded store: process memory. Exact for one process; it cannot be shared, so a gateway with
several workers refuses it whenever it would hold shared state (keys or limits)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.store.base import KeyRecord, Revoked
from gateway.store.gcra import Bucket, Verdict, check_all


class MemoryStore:
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._tats: dict[str, float] = {}
        self._keys: dict[str, KeyRecord] = {}  # by name
        self._watchers: list[Revoked] = []
        self._stats: dict[str, tuple[float, dict[str, Any]]] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # name -> (holder, expiry)
        self._states: dict[str, str] = {}

    async def check_limits(self, requests: Sequence[Sequence[Bucket]]) -> list[tuple[bool, list[Verdict]]]:
        now = time.time()
        decisions = []
        for limits in requests:
            tats = [self._tats.get(limit.bucket, 0.0) for limit in limits]
            admitted, new_tats, verdicts = check_all(tats, now, limits)
            if admitted:
                for limit, tat in zip(limits, new_tats, strict=True):
                    self._tats[limit.bucket] = tat
            decisions.append((admitted, verdicts))
        return decisions

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
        self._stats[process_id] = (time.time() + ttl, stats)

    async def get_stats(self) -> list[dict[str, Any]]:
        now = time.time()
        return [stats for expires, stats in self._stats.values() if expires > now]

    async def lease(self, name: str, holder: str, ttl: float) -> bool:
        now = time.time()
        current = self._leases.get(name)
        if current is None or current[1] <= now or current[0] == holder:
            self._leases[name] = (holder, now + ttl)
            return True
        return False

    async def get_state(self, name: str) -> dict[str, Any] | None:
        value = self._states.get(name)
        return json.loads(value) if value is not None else None

    async def put_state(self, name: str, value: dict[str, Any]) -> None:
        self._states[name] = json.dumps(value)  # a copy, as a real store would keep

    async def ping(self) -> float:
        return 0.0

    async def close(self) -> None:
        pass

    def _notify(self, secret_hash: str) -> None:
        for watcher in list(self._watchers):
            watcher(secret_hash)
