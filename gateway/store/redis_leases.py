"""Rate limits on Redis through token leases (gateway.store.leases): most requests are decided from
what this process holds, with no await; the rest wait for one refill call shared by the moment.

`admit_now` is the fast path: every bucket of the request has a slot in a live lease, so the request
is admitted here and then, synchronously. When a quarter of a lease is spent a refill is sent ahead, so a
steady stream of requests seldom has to wait. `admit` is the slow path: it queues the request, and the
first of a loop tick schedules one flush that takes, for every bucket the queued requests need, what
they need plus a lease (`lease_size`; none for slow buckets, which are so checked per request) and
gives back what is to be given back (`give_back`, below); one script call per cluster slot,
all of them at once. The queued requests are then decided in order against what came back,
all-or-nothing over their buckets: a request refused by one bucket takes no slot of the others, and
what a slow bucket was granted for it goes back in the next call.

No lease is used once the store has not answered this process for `LEASE_LIFETIME`: the requests
then wait for a call, which fails if the store is gone (503 with fail_closed). While it answers, a call
goes out after half that silence, so that a steady stream never waits for that reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.store.base import StoreUnavailable
from gateway.store.gcra import Bucket
from gateway.store.leases import LEASE_LIFETIME, REFILL_AT, Answer, Holding, Lease, lease_size, take
from gateway.store.redis_layout import bucket_key

log = logging.getLogger(__name__)
Queued = tuple[Sequence[Bucket], float, "asyncio.Future[Answer]"]
MIN_SWEEP = 1024  # holdings kept before idle ones are dropped


class _Seen:
    """What the latest reply said of a bucket, for the Retry-After and reset of a refusal."""

    __slots__ = ("local", "now", "tat", "tolerance")

    def __init__(self, now: float, tat: float, tolerance: float, local: float) -> None:
        self.now, self.tat, self.tolerance, self.local = now, tat, tolerance, local


class LeasedLimits:
    def __init__(
        self,
        call: Callable[[list[str], list[str | int]], Awaitable[Any]],
        slot: Callable[[str], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._call = call  # one GCRA_LEASE call: (keys, args) -> reply; raises StoreUnavailable
        self._slot = slot
        self._clock = clock
        self._holdings: dict[str, Holding] = {}
        self._seen: dict[str, _Seen] = {}
        self._queued: list[Queued] = []
        self._prefetch: dict[str, Bucket] = {}
        self._returns: dict[str, Lease] = {}  # bucket -> a lease whose unused tail goes back
        self._flushing = False
        self._sweep_at = MIN_SWEEP
        self._tasks: set[asyncio.Task[None]] = set()
        self._answered = -LEASE_LIFETIME  # local time of the store's latest answer to a lease call
        self.processes = 1  # live gateway processes, from the heartbeats: all of them share LEASE_SHARE
        self.calls = 0  # script calls sent (for tests and the benchmark)

    # ---- the fast path ----

    def admit_now(self, limits: Sequence[Bucket]) -> Answer | None:
        """The decision from leases held, or None: then `await admit(limits)`. `limits` are distinct
        buckets (admission's plans are), so that one slot is never taken twice for one request."""
        now = self._clock()
        holdings = self._holdings
        held = []
        missing = False
        for limit in limits:
            holding = holdings.get(limit.bucket)
            if holding is None:
                holding = holdings[limit.bucket] = Holding(now)
            holding.meter.hit(now)
            if holding.usable(now) is None:
                missing = True
            held.append(holding)
        silent = now - self._answered
        if silent >= LEASE_LIFETIME / 2:
            if silent >= LEASE_LIFETIME:  # the store may be gone: no lease hides that for longer
                return None
            for i, holding in enumerate(held):  # a call before then: a store that is up keeps them usable
                if not holding.refilling:
                    self._ask_ahead(limits[i])
        if missing:
            for i, holding in enumerate(held):
                if not holding.leases and now < holding.refused_until:
                    # All or nothing: refused by this one, so nothing is taken from the others.
                    retry, reset = self._refusal(limits[i], now)
                    return Answer(False, i, 0, reset, retry)
            return None
        tightest, remaining, reset = 0, 0, 0.0
        for i, holding in enumerate(held):
            lease = holding.leases[0]  # what `usable` found
            lease.used = lease.free + 1
            # What this lease has left: a lower bound of what is really left (RateLimit's r=), leaving
            # out the lease that follows it, which costs more to count than the header is worth.
            left = lease.count - lease.used
            spent = lease.count - left
            if spent > REFILL_AT * lease.count and len(holding.leases) == 1 and not holding.refilling:
                self._ask_ahead(limits[i])
            if i == 0 or left < remaining:
                tightest, remaining = i, left
                reset = lease.tat - (now + lease.offset)
        return Answer(True, tightest, remaining, max(0.0, reset), 0.0)

    def _ask_ahead(self, limit: Bucket) -> None:
        self._holdings[limit.bucket].refilling = True
        self._prefetch[limit.bucket] = limit
        self._schedule()

    # ---- the slow path ----

    async def admit(self, limits: Sequence[Bucket]) -> Answer:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queued.append((limits, self._clock(), future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        queued, self._queued = self._queued, []
        prefetch, self._prefetch = self._prefetch, {}
        returns, self._returns = self._returns, {}
        task = asyncio.get_running_loop().create_task(self._refill(queued, prefetch, returns))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refill(
        self, queued: list[Queued], prefetch: dict[str, Bucket], returns: dict[str, Lease]
    ) -> None:
        now = self._clock()
        needed: dict[str, int] = {}
        limits_by_name: dict[str, Bucket] = dict(prefetch)
        for limits, _, _ in queued:
            for limit in limits:
                needed[limit.bucket] = needed.get(limit.bucket, 0) + 1
                limits_by_name[limit.bucket] = limit
        entries: list[tuple[Bucket, int, int]] = []  # (limit, want, extra)
        for name, limit in limits_by_name.items():
            holding = self._holdings.get(name) or self._holdings.setdefault(name, Holding(now))
            extra = lease_size(limit.rate, limit.burst, holding.meter.per_second(now), self.processes)
            left = holding.left(now)
            want = max(0, needed.get(name, 0) - left)
            if want or (name in prefetch and left < extra):  # a lease's worth at most is held ahead
                want += extra
            holding.refilling = True
            entries.append((limit, want, extra))
        for name, lease in returns.items():
            if name not in limits_by_name:
                entries.append((Bucket(name, 1.0 / lease.interval, 1), 0, 0))
        try:
            granted = await self._send(entries, returns, now)
        except (Exception, asyncio.CancelledError) as exc:
            for limit, _, _ in entries:
                if limit.bucket in self._holdings:
                    self._holdings[limit.bucket].refilling = False
            if isinstance(exc, asyncio.CancelledError):
                exc = StoreUnavailable("store closed")
            for _, _, future in queued:
                if not future.done():
                    own = StoreUnavailable(*exc.args) if isinstance(exc, StoreUnavailable) else exc
                    future.set_exception(own)
            if not queued and not isinstance(exc, StoreUnavailable):
                log.error("lease refill failed: %r", exc)
            return
        now = self._clock()
        for limits, arrived, future in queued:
            answer = self._decide(limits, arrived, now)
            if not future.done():
                future.set_result(answer)
        # What a slow bucket got for requests that another bucket refused goes back with the next call.
        for limit, _, extra in entries:
            leftover = granted.get(limit.bucket)
            if leftover is not None and extra == 0 and leftover.left(now) > 0:
                leftover.retire(now)
                self._returns[limit.bucket] = leftover
                self._schedule()
        if len(self._holdings) >= self._sweep_at:
            self._sweep(now)

    async def _send(
        self, entries: list[tuple[Bucket, int, int]], returns: dict[str, Lease], now: float
    ) -> dict[str, Lease]:
        by_slot: dict[int, list[tuple[Bucket, int, int]]] = {}
        for entry in entries:
            by_slot.setdefault(self._slot(entry[0].bucket), []).append(entry)
        groups = list(by_slot.items())
        sent = self._clock()
        calls = [self._one(group, returns) for _, group in groups]
        self.calls += len(calls)
        replies = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        self._answered = self._clock()
        granted: dict[str, Lease] = {}
        for (_, group), reply in zip(groups, replies, strict=True):
            store_now = float(reply[0])
            offset = store_now - sent  # an upper bound of the store's clock (see leases.py)
            for i, (limit, want, extra) in enumerate(group):
                start, count, tat = float(reply[1 + 3 * i]), int(reply[2 + 3 * i]), reply[3 + 3 * i]
                interval = 1.0 / limit.rate
                if want > 0:
                    tolerance = (limit.burst - 1) * interval
                    self._seen[limit.bucket] = _Seen(store_now, float(tat), tolerance, sent)
                holding = self._holdings.get(limit.bucket)
                if holding is None:
                    continue
                holding.refilling = False
                if want > 0:
                    holding.refused_until = self._empty_until(limit, count < want, float(tat), offset, extra)
                if count > 0:
                    lease = Lease(start, count, interval, offset, float(tat), tat)
                    holding.add(lease)
                    granted[limit.bucket] = lease
        return granted

    @staticmethod
    def _empty_until(limit: Bucket, empty: bool, tat: float, offset: float, extra: int) -> float:
        """Local time until which requests are refused here: a reply that granted less than asked left the
        bucket empty, and GCRA frees its next slot at TAT - tolerance. A fast bucket waits for a lease's
        worth of slots, which costs no capacity (they stay in the bucket) and saves a call per slot."""
        if not empty:
            return 0.0
        interval = 1.0 / limit.rate
        return tat - (limit.burst - 1) * interval + max(0, extra - 1) * interval - offset

    async def _one(self, group: list[tuple[Bucket, int, int]], returns: dict[str, Lease]) -> Any:
        keys: dict[str, int] = {}
        args: list[str | int] = [len(group)]
        for limit, want, _ in group:
            index = keys.setdefault(bucket_key(limit.bucket), len(keys) + 1)
            back = returns.get(limit.bucket)
            end, start = ("", "") if back is None else (back.tat_text, repr(back.given_back))
            args += [index, repr(float(limit.rate)), limit.burst, want, end, start]
        return await self._call(list(keys), args)

    def _decide(self, limits: Sequence[Bucket], arrived: float, now: float) -> Answer:
        leases = []
        for i, limit in enumerate(limits):
            holding = self._holdings.get(limit.bucket)
            lease = holding.usable(arrived) if holding is not None else None
            if lease is None:
                retry, reset = self._refusal(limit, now)
                return Answer(False, i, 0, reset, retry)
            leases.append(lease)
        tightest, remaining, reset = 0, 0, 0.0
        for i, lease in enumerate(leases):
            left = take(lease, arrived)
            if i == 0 or left < remaining:
                tightest, remaining, reset = i, left, lease.tat - (now + lease.offset)
        return Answer(True, tightest, remaining, max(0.0, reset), 0.0)

    def _refusal(self, limit: Bucket, now: float) -> tuple[float, float]:
        """(retry_after, reset_after) of a bucket that had no slot, from the latest reply about it."""
        seen = self._seen.get(limit.bucket)
        if seen is None:
            return 1.0 / limit.rate, 1.0 / limit.rate
        store_now = seen.now + (now - seen.local)
        retry = max(seen.tat - store_now - seen.tolerance, 1.0 / limit.rate)
        return retry, max(0.0, seen.tat - store_now)

    def _sweep(self, now: float) -> None:
        """Drop what is kept of buckets with no lease and no recent demand (a flood of client addresses)."""
        keep = {}
        for name, holding in self._holdings.items():
            if holding.left(now) > 0 or holding.refilling or now - holding.meter.since < 1.0:
                keep[name] = holding
        self._holdings = keep
        self._seen = {name: seen for name, seen in self._seen.items() if name in keep}
        self._sweep_at = max(MIN_SWEEP, 2 * len(keep))

    # ---- shutting down ----

    def unused(self) -> dict[str, Lease]:
        """The latest lease with slots left, by bucket: what `close` gives back."""
        now = self._clock()
        out: dict[str, Lease] = {}
        for name, holding in self._holdings.items():
            for lease in reversed(holding.leases):  # the latest is the tail, if any is
                if lease.left(now) > 0:
                    lease.retire(now)
                    out[name] = lease
                    break
        return out

    async def give_back(self) -> None:
        """Give back every unused tail (a graceful stop); the leases are not used afterwards."""
        returns = self.unused()
        self._holdings.clear()
        if returns:
            entries = [(Bucket(name, 1.0 / lease.interval, 1), 0, 0) for name, lease in returns.items()]
            try:
                await self._send(entries, returns, self._clock())
            except StoreUnavailable as exc:
                log.warning("leases not given back: %s", exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, _, future in self._queued:
            if not future.done():
                future.set_exception(StoreUnavailable("store closed"))
        self._queued = []
