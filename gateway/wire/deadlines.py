"""Many timeouts checked by one periodic timer.

A connection's timeouts change state several times per request (head, body, in flight, idle). One
event-loop timer per change costs a timer allocation and a heap operation each time, which on the hot
path is more than the rest of the request's bookkeeping. Instead each member keeps a plain `deadline`
(loop time, 0 for none) and one timer per registry sweeps them every `resolution` seconds, so a timeout
fires between its deadline and one resolution later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Expiring(Protocol):
    deadline: float

    def expired(self) -> None: ...


M = TypeVar("M", bound=Expiring)


def resolution_for(*timeouts: float) -> float:
    """A sweep period fine enough for the shortest timeout, and no busier than needed."""
    return min(0.5, max(0.02, min(timeouts) / 4))


class Deadlines(Generic[M]):
    """The members whose deadlines one timer watches; iterating gives the members."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float) -> None:
        self._loop = loop
        self.resolution = resolution
        self._members: set[M] = set()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[M]:
        return iter(list(self._members))

    def add(self, member: M) -> None:
        self._members.add(member)
        if self._timer is None:
            self._timer = self._loop.call_later(self.resolution, self._sweep)

    def discard(self, member: M) -> None:
        self._members.discard(member)

    def now(self) -> float:
        return self._loop.time()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        now = self._loop.time()
        for member in list(self._members):
            if 0.0 < member.deadline <= now:
                member.deadline = 0.0
                member.expired()
        self._timer = self._loop.call_later(self.resolution, self._sweep) if self._members else None
