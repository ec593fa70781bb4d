"""Collecting a primary answer and its shadow copy's, and comparing them on a thread of their own.

The request path only appends the bytes it already has in hand to a `Pair` (no copy, no parse) and,
when both answers are in, puts the pair on a bounded queue; a daemon thread decodes and compares
(numpy, most of it outside the GIL). The budget is per worker: at most MAX_HELD_BYTES of answers held
for comparison at once, at most MAX_ANSWER_BYTES per answer, at most QUEUE pairs waiting. What does not
fit is not compared and is counted by reason, so the figures say how much they cover; a busy comparer
never slows, delays or fails a request. CPU is budgeted too: the thread may spend at most CPU_SHARE of
one core (measured per comparison, refilled with wall time); while that is spent, mirrored requests get
no pair at all, so nothing is even collected (counted as `busy`). Measured here: a small JSON answer
pair costs about 0.3 ms, a 256 KB binary one about 5 ms.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from gateway.shadow.compare import PairStats, compare
from gateway.shadow.decode import Undecodable, decode

log = logging.getLogger("gateway.shadow")

MAX_ANSWER_BYTES = 1 << 20  # 1 MiB: larger answers are not compared
MAX_HELD_BYTES = 16 << 20  # all pairs of one worker together, captured or queued
QUEUE = 256
CPU_SHARE = 0.05  # of one core, at most, for comparing
PRIMARY, SHADOW = 0, 1


@dataclass(slots=True)
class _Answer:
    status: int = 0
    header_length: int | None = None
    chunks: list[bytes] | None = None
    seconds: float = 0.0
    done: bool = False


class Comparer:
    """One per worker: the budget, the queue, the thread, and the figures per version pair."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = 0
        self._queue: queue.Queue[Pair] = queue.Queue(QUEUE)
        self._stats: dict[tuple[str, str, str], PairStats] = {}
        self._thread: threading.Thread | None = None
        self._cpu = CPU_SHARE  # seconds of comparing the thread may still spend
        self._refilled = time.monotonic()

    def pair(self, model: str, primary: str, shadow: str) -> Pair | None:
        """A pair to collect both answers in, or None while the CPU budget is spent (counted busy)."""
        key = (model, primary, shadow)
        with self._lock:
            now = time.monotonic()
            self._cpu = min(CPU_SHARE, self._cpu + (now - self._refilled) * CPU_SHARE)
            self._refilled = now
            if self._cpu <= 0:
                self._stats.setdefault(key, PairStats()).not_compared["busy"] += 1
                return None
        return Pair(self, key)

    def figures(self) -> dict[str, PairStats]:
        """A copy of the figures, keyed "model/primary/shadow"."""
        with self._lock:
            copies = {}
            for key, stats in self._stats.items():
                copy = PairStats()
                copy.merge(stats)
                copies["/".join(key)] = copy
            return copies

    # -- called from the request path (the event loop thread) -------------------------------------

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self._held + size > MAX_HELD_BYTES:
                return False
            self._held += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self._held -= size

    def skipped(self, key: tuple[str, str, str], reason: str) -> None:
        with self._lock:
            self._stats.setdefault(key, PairStats()).not_compared[reason] += 1

    def submit(self, pair: Pair) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shadow-comparer", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(pair)
        except queue.Full:
            self.release(pair.held)
            self.skipped(pair.key, "busy")

    # -- the comparer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            pair = self._queue.get()
            started = time.perf_counter()
            try:
                self._compare(pair)
            except Exception:
                log.exception("shadow comparison of %s failed", "/".join(pair.key))
            finally:
                self.release(pair.held)
                with self._lock:
                    self._cpu -= time.perf_counter() - started

    def _compare(self, pair: Pair) -> None:
        primary, shadow = pair.answers
        try:
            a = decode(b"".join(primary.chunks or ()), primary.header_length)
            b = decode(b"".join(shadow.chunks or ()), shadow.header_length)
        except Undecodable as exc:
            log.debug("shadow comparison of %s: %s", "/".join(pair.key), exc)
            self.skipped(pair.key, "undecodable")
            return
        result = compare(a, b)
        latency_ms = (shadow.seconds - primary.seconds) * 1000
        with self._lock:
            self._stats.setdefault(pair.key, PairStats()).add(result, latency_ms)


class Pair:
    """A primary answer and its shadow copy's, collected as they stream past; compared once both end."""

    __slots__ = ("_comparer", "answers", "held", "key", "over")

    def __init__(self, comparer: Comparer, key: tuple[str, str, str]) -> None:
        self._comparer = comparer
        self.key = key
        self.answers = (_Answer(), _Answer())
        self.held = 0  # bytes reserved from the comparer's budget
        self.over: str | None = None  # why this pair will not be compared, once known

    def head(self, side: int, status: int, header_length: int | None) -> None:
        answer = self.answers[side]
        answer.status, answer.header_length = status, header_length
        answer.chunks = [] if status == 200 else None

    def body(self, side: int, data: bytes) -> None:
        answer = self.answers[side]
        if answer.chunks is None or self.over is not None:
            return
        if sum(map(len, answer.chunks)) + len(data) > MAX_ANSWER_BYTES:
            self._give_up("too_large")
        elif not self._comparer.reserve(len(data)):
            self._give_up("busy")
        else:
            self.held += len(data)
            answer.chunks.append(data)  # the bytes object the wire gave us: held, not copied

    def done(self, side: int, seconds: float) -> None:
        answer = self.answers[side]
        if answer.done:
            return
        answer.done, answer.seconds = True, seconds
        if answer.status != 200 and self.over is None:
            self._give_up("status")
        primary, shadow = self.answers
        if not (primary.done and shadow.done):
            return
        if self.over == "cancelled":
            return
        if self.over is not None:
            self._comparer.skipped(self.key, self.over)
            return
        self._comparer.submit(self)

    def cancel(self) -> None:
        """The copy was not sent (Mirrors counts it as skipped): nothing to compare, nothing to count."""
        self._give_up("cancelled")

    def failed(self, side: int) -> None:
        """That side ended without a whole answer (a timeout, a lost connection, a cancelled copy)."""
        self.answers[side].status = 0
        self.done(side, 0.0)

    def _give_up(self, reason: str) -> None:
        self.over = reason
        for answer in self.answers:
            answer.chunks = None
        self._comparer.release(self.held)
        self.held = 0
