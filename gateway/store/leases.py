"""Token leases: a process takes a stretch of a GCRA bucket's capacity in one store call and serves
requests from it locally, exactly.

A GCRA bucket is one number, its TAT (gateway.store.gcra). Every admitted request takes the next slot
of the bucket's time line: slot = max(TAT, now), TAT = slot + interval, admitted only if
slot - now <= tolerance. Counting the slots proves GCRA's bound: requests admitted at times in any
window [a, b] have distinct slots, `interval` apart, in [a, b + tolerance], so there are at most
floor((b - a) / interval) + burst of them.

A lease keeps that proof. The store charges k slots at once (TAT advances by k intervals, atomically,
so two processes never get the same slot), and the process hands them out one per request, each
subject to the same two conditions a request checked in the store would meet:
  - slot >= the request's arrival (in the store's clock): a slot already in the past is never used,
    so a lease held back and spent later cannot bunch requests into a window;
  - slot - now <= tolerance: true of every slot of a grant from the moment it is granted.
So the requests of all processes together meet the bound above: no window admits more than the limit
allows, however the leases are spread, and whatever a process that dies was holding (its slots pass
unused). What is left unused is capacity lost, never capacity added; `LEASE_SHARE` bounds it.

Clocks: slots are on the store's clock. The offset from this process's monotonic clock is taken from
each grant, against when the call was *sent*, so it is an upper bound of the store's time (the reply
was made after the call left): a slot that passes the check here has certainly not passed there.

Everything here is pure bookkeeping with time given as data; the store (gateway.store.redis) does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from gateway.store.gcra import Answer as Answer  # re-exported: what leases decide

# A lease is sized for this much of the process's own demand on the bucket: long enough that the
# store sees one call per a few hundred requests at tens of thousands of requests per second, short
# enough that stranded capacity stays small.
LEASE_SPAN: Final = 0.05  # seconds
# The next lease is asked for once this share of the current one is spent (or passed): 37 ms ahead at
# LEASE_SPAN, so that even a slow answer seldom keeps requests waiting.
REFILL_AT: Final = 0.25
# Leases are not used once the store has not answered this process for this long, whatever they have
# left: how long leases can keep admitting after the store went away (fail_closed answers 503 then;
# docs/operations.md). Exactness does not depend on it: a slot is never used before its time anyway.
LEASE_LIFETIME: Final = 0.05  # seconds
# All processes' leases of one bucket together hold at most this share of its burst: the capacity that
# an idle or dead process can strand.
LEASE_SHARE: Final = 0.125
# A bucket whose lease would hold fewer tokens (a slow bucket, or a small burst shared by many
# processes) is checked in the store per request, as before leases.
MIN_LEASE: Final = 2
RATE_WINDOW: Final = 0.25  # seconds over which a bucket's own demand is measured


def lease_size(rate: float, burst: int, own_rate: float, processes: int) -> int:
    """Tokens to take beyond the requests waiting now; 0: check this bucket per request.

    A lease from a bucket that is not behind starts at the store's `now`, so time uses it up as much as
    requests do: to last `LEASE_SPAN` it must span that much of the bucket's time line, rate x span
    tokens, whatever the process's own rate. Its own rate decides whether a lease is worth taking at
    all (would it serve `MIN_LEASE` requests?), and `LEASE_SHARE` bounds what all processes hold.
    """
    cap = math.floor(burst * LEASE_SHARE / (2 * max(1, processes)))  # a lease and the one taken ahead
    if cap < MIN_LEASE or own_rate * LEASE_SPAN < MIN_LEASE:
        return 0
    return min(cap, math.ceil(max(rate, own_rate) * LEASE_SPAN))


@dataclass(slots=True)
class Lease:
    """Slots start, start + interval, ..., start + (count - 1) x interval of one bucket, this process's."""

    start: float  # store clock
    count: int
    interval: float
    offset: float  # store time <= local monotonic time + offset (from the call's send time)
    tat: float  # the bucket's TAT right after the grant: this lease's end, unless others took more since
    tat_text: str  # the same as the store wrote it: a give-back applies only while the TAT is still this
    used: int = 0  # slots before this index are spent or passed
    retired: bool = False  # its unused tail was given back: never used again
    free: int = 0  # the first free slot, as `Holding.usable` last found it (for `admit_now`)
    given_back: float = 0.0  # once retired: where the slots not ours any more begin (store clock)

    def first_free(self, arrived: float) -> int:
        """Index of the first slot a request that arrived at local time `arrived` may take."""
        store_time = arrived + self.offset
        if store_time <= self.start:
            return self.used
        index = math.ceil((store_time - self.start) / self.interval)
        if self.start + index * self.interval < store_time:  # rounding: never a slot before arrival
            index += 1
        return max(self.used, index)

    def left(self, arrived: float) -> int:
        """Slots a request arriving at local time `arrived` could still take."""
        return 0 if self.retired else self.count - self.first_free(arrived)

    def retire(self, now: float) -> None:
        """Use no more of it, not even for a request that waited (its unused tail is being given back)."""
        self.given_back = self.start + self.first_free(now) * self.interval
        self.used = self.count
        self.retired = True


class Meter:
    """A bucket's own demand in this process: requests per second over the last full window."""

    __slots__ = ("count", "rate", "since")

    def __init__(self, now: float) -> None:
        self.since = now
        self.count = 0
        self.rate = 0.0

    def hit(self, now: float) -> None:
        elapsed = now - self.since
        if elapsed >= RATE_WINDOW:
            self.rate = self.count / elapsed
            self.since, self.count = now, 0
        self.count += 1

    def per_second(self, now: float) -> float:
        elapsed = now - self.since
        current = self.count / elapsed if elapsed >= RATE_WINDOW / 4 else 0.0
        return max(self.rate, current)


class Holding:
    """What this process holds of one bucket: its leases, oldest first (usually one, and the one taken
    ahead to follow it), with how fast it is asked for."""

    __slots__ = ("leases", "meter", "refilling", "refused_until")

    def __init__(self, now: float) -> None:
        self.leases: list[Lease] = []
        self.meter = Meter(now)
        self.refilling = False  # a refill call is on its way
        # Local time before which the store has no slot for anyone (its latest reply granted less than
        # asked, and GCRA frees the next slot only then): requests are refused here, asking nobody.
        self.refused_until = 0.0

    @property
    def current(self) -> Lease | None:
        return self.leases[0] if self.leases else None

    def usable(self, arrived: float) -> Lease | None:
        """The lease a request arriving at local time `arrived` takes its slot from; None when none has
        one left (spent, passed or given back: dropped)."""
        leases = self.leases
        while leases:
            lease = leases[0]
            if not lease.retired:
                lease.free = lease.first_free(arrived)
                if lease.free < lease.count:
                    return lease
            del leases[0]
        return None

    def add(self, lease: Lease) -> None:
        self.leases.append(lease)

    def left(self, arrived: float) -> int:
        return sum(x.left(arrived) for x in self.leases)


def take(lease: Lease, arrived: float) -> int:
    """Spend the first free slot for a request that arrived at `arrived` (the caller checked `usable`);
    returns how many slots the lease has left after it."""
    index = lease.first_free(arrived)
    lease.used = index + 1
    return lease.count - lease.used
