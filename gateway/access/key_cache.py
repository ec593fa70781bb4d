"""The per-process cache of key records, and the budget of store lookups for keys it does not know.

Hot path: `KeyCache.peek` (a dict lookup, no await) answers almost every request. Only a hash the cache
cannot answer costs a store lookup, and those are what a client sending random keys would multiply, so
each one is charged to a budget first (`LookupBudget`): per client address, and for the whole process.
A hash that was a key when this process last asked, or whose lookup is already on its way, is not
charged: a real key's refresh never competes with a flood.

Found keys and unknown hashes are kept apart, each with its own bound, so that unknown hashes (which
anyone can make up) can never push a real key out.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Final, Literal

from gateway.store.base import KeyRecord, Store, StoreUnavailable

ALL_KEYS: Final = "*"  # the hash an invalidation carries when every cached entry may be stale

# Store lookups for hashes the cache does not know. Per client address (an IPv6 client by its /64,
# which one host usually has whole): enough for a client starting up with a handful of keys, far too
# few to be worth guessing with. Per process: what the store can take from every worker at once.
CLIENT_LOOKUP_RATE: Final = 10.0  # per second
CLIENT_LOOKUP_BURST: Final = 20
PROCESS_LOOKUP_RATE: Final = 500.0
PROCESS_LOOKUP_BURST: Final = 1000
MAX_CLIENTS: Final = 10_000  # addresses with a budget remembered; about 1 MB
MAX_UNKNOWN: Final = 4096  # unknown hashes remembered (a second each): more than the budget lets in

Exhausted = Literal["client", "process"]


def client_scope(client: str) -> str:
    """Whose budget a lookup is charged to: the IPv4 address, or an IPv6 address's /64."""
    if ":" not in client:
        return client
    try:
        address = ipaddress.IPv6Address(client)
    except ValueError:
        return client
    if address.ipv4_mapped is not None:  # a dual-stack socket's IPv4 client
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False).network_address) + "/64"


class LookupBudget:
    """GCRA buckets (one number each) for store lookups: one per client scope, one for the process.

    Buckets are kept in the order they were last charged. A bucket whose TAT has passed is full, which
    is what a bucket never seen is, so it can be dropped: each charge drops the full ones at the front,
    and past `max_clients` the oldest goes anyway (the process bucket still bounds the total).
    """

    def __init__(
        self,
        client_rate: float = CLIENT_LOOKUP_RATE,
        client_burst: int = CLIENT_LOOKUP_BURST,
        process_rate: float = PROCESS_LOOKUP_RATE,
        process_burst: int = PROCESS_LOOKUP_BURST,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self._client_interval = 1.0 / client_rate
        # A hair over burst intervals, so that rounding cannot refuse the last of a full burst.
        self._client_tolerance = client_burst * self._client_interval + 1e-9
        self._process_interval = 1.0 / process_rate
        self._process_tolerance = process_burst * self._process_interval + 1e-9
        self.max_clients = max_clients
        self._clients: dict[str, float] = {}  # scope -> TAT (monotonic seconds)
        self._process = 0.0

    def take(self, client: str, now: float) -> Exhausted | None:
        """Charge one lookup to `client` and to the process; None if both allow it (nothing is charged
        otherwise), else the budget that is spent."""
        scope = client_scope(client)
        clients = self._clients
        tat = max(clients.get(scope, 0.0), now) + self._client_interval
        if tat - now > self._client_tolerance:
            return "client"
        process = max(self._process, now) + self._process_interval
        if process - now > self._process_tolerance:
            return "process"
        self._process = process
        clients.pop(scope, None)  # re-inserted at the end: the dict stays in order of last charge
        while clients:
            oldest = next(iter(clients))
            if clients[oldest] > now and len(clients) < self.max_clients:
                break
            del clients[oldest]
        clients[scope] = tat
        return None

    def addresses(self) -> int:
        """Client scopes whose bucket is remembered."""
        return len(self._clients)


class _Missing(enum.Enum):
    MISSING = "MISSING"


MISSING: Final = _Missing.MISSING  # what `peek` says when the cache knows nothing about a hash
Cached = KeyRecord | None | Literal[_Missing.MISSING]


class KeyCache:
    """Key records by secret hash, in front of a store, so most requests never wait for the store.

    Found keys are kept `ttl` seconds, unknown hashes `negative_ttl` seconds: short, so that a key
    created a moment ago works within that time, yet long enough that a client retrying a bad key in
    a loop costs the store one lookup per `negative_ttl`, not one per request. Changes do not wait for
    the TTL: `start()` subscribes to the store's key changes, and each change drops that hash here (the
    store sends "*" when it may have missed changes, e.g. after a reconnect, and everything is dropped).
    The TTL is the backstop if a change notice is lost anyway.

    Lookups of one hash that overlap share one store call. If an invalidation arrives while a store call
    is in flight, its answer is handed to the waiting requests (it was current when they arrived) but
    not cached, because it may predate the change.
    """

    def __init__(
        self,
        store: Store,
        ttl: float = 30.0,
        negative_ttl: float = 1.0,
        max_entries: int = 100_000,
        max_unknown: int = MAX_UNKNOWN,
        clock: Callable[[], float] = time.monotonic,
        budget: LookupBudget | None = None,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.max_unknown = max_unknown
        self.budget = budget if budget is not None else LookupBudget()
        self._clock = clock
        # hash -> (record, monotonic time it goes stale); insertion order is age order.
        self._entries: dict[str, tuple[KeyRecord, float]] = {}
        self._unknown: dict[str, float] = {}  # hash -> when it goes stale; same TTL, so in that order
        self._stale: dict[str, KeyRecord] = {}  # expired records, for when the store is unreachable
        self._inflight: dict[str, asyncio.Task[KeyRecord | None]] = {}
        self._generation = 0  # bumped by every invalidation, to spot answers that may predate one
        self._stop_watch: Callable[[], Awaitable[None]] | None = None
        self.store_lookups = 0  # how often the store was asked: for metrics and tests

    async def start(self) -> None:
        """Follow the store's key changes (call once, from the event loop that serves requests)."""
        if self._stop_watch is None:
            self._stop_watch = await self.store.watch_keys(self.invalidate)
            # Anything cached before the subscription may have changed unseen.
            self.invalidate(ALL_KEYS)

    async def stop(self) -> None:
        if self._stop_watch is not None:
            stop, self._stop_watch = self._stop_watch, None
            await stop()

    def peek(self, secret_hash: str) -> Cached:
        """The cached answer without waiting: a record, None (known not to exist), or MISSING."""
        entry = self._entries.get(secret_hash)
        if entry is not None:
            if self._clock() < entry[1]:
                return entry[0]
            del self._entries[secret_hash]
            self._stale[secret_hash] = entry[0]
            while len(self._stale) > self.max_entries:
                del self._stale[next(iter(self._stale))]
            return MISSING
        stale_at = self._unknown.get(secret_hash)
        if stale_at is None:
            return MISSING
        if self._clock() < stale_at:
            return None
        del self._unknown[secret_hash]
        return MISSING

    def over_budget(self, secret_hash: str, client: str) -> Exhausted | None:
        """Before `lookup` of a hash `peek` says is MISSING: None if the store may be asked (charged to
        `client`'s budget unless the hash was a key lately or is being looked up), else the budget
        that is spent, and the caller answers without the store."""
        if secret_hash in self._inflight or secret_hash in self._stale:
            return None
        return self.budget.take(client, self._clock())

    async def lookup(self, secret_hash: str) -> KeyRecord | None:
        """The record for a hash, from the cache or else from the store (StoreUnavailable propagates,
        to every request waiting on the same call, and nothing is cached)."""
        cached = self.peek(secret_hash)
        if cached is not MISSING:
            return cached
        task = self._inflight.get(secret_hash)
        if task is None:
            # A task of its own, so one cancelled request cannot cancel the lookup the others share;
            # the dict holds it (asyncio keeps only weak references to tasks) until it is done.
            task = asyncio.get_running_loop().create_task(self._fetch(secret_hash))
            self._inflight[secret_hash] = task
        # shield: a waiter cancelled (client gone) leaves the shared lookup running for the others.
        return await asyncio.shield(task)

    async def _fetch(self, secret_hash: str) -> KeyRecord | None:
        generation = self._generation
        self.store_lookups += 1
        try:
            record = await self.store.get_key(secret_hash)
        except StoreUnavailable:
            # While the store is down, a key that was valid a moment ago stays valid: serving it is
            # what fail_open means for keys. It is not cached again, so the store is asked next time.
            stale = self._stale.get(secret_hash)
            if stale is not None:
                return stale
            raise
        finally:
            del self._inflight[secret_hash]
        self._stale.pop(secret_hash, None)
        if generation == self._generation:
            self._remember(secret_hash, record)
        return record

    def _remember(self, secret_hash: str, record: KeyRecord | None) -> None:
        now = self._clock()
        if record is None:
            unknown = self._unknown
            unknown.pop(secret_hash, None)
            while unknown and (len(unknown) >= self.max_unknown or unknown[next(iter(unknown))] <= now):
                del unknown[next(iter(unknown))]
            unknown[secret_hash] = now + self.negative_ttl
            return
        self._entries.pop(secret_hash, None)  # re-inserted at the end: the dict stays in age order
        while len(self._entries) >= self.max_entries:
            # Only keys that exist get here, so this is a deployment with more keys than entries: drop
            # the oldest in O(1) rather than scan for the stale; a dropped key is just looked up again.
            del self._entries[next(iter(self._entries))]
        self._entries[secret_hash] = (record, now + self.ttl)

    def invalidate(self, secret_hash: str) -> None:
        """Forget one hash, or everything for "*"; what the store's change notices call."""
        self._generation += 1
        if secret_hash == ALL_KEYS:
            # Stale entries survive a blanket flush (sent after a reconnect, when notices may be lost):
            # they are only ever used while the store cannot be asked.
            self._entries.clear()
            self._unknown.clear()
        else:
            self._entries.pop(secret_hash, None)
            self._unknown.pop(secret_hash, None)
            self._stale.pop(secret_hash, None)  # a revocation notice: never serve this one again

    def __len__(self) -> int:
        return len(self._entries) + len(self._unknown)
