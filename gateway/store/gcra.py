"""GCRA, the generic cell rate algorithm: exact rate limits from one number per bucket.

A bucket stores its theoretical arrival time (TAT): when it would be empty again if every admitted
request had been spaced exactly `1 / rate` apart. A request at time `now` is admitted if
`TAT - now <= (burst - 1) * interval`, and then TAT advances by one interval (from `max(TAT, now)`).
Nothing decays in the background, so the same arithmetic runs in process memory and inside a Redis
Lua script (`gateway/store/gcra.lua`), and gives the same answers.

A request usually meets several limits (its key, its key on this model, the model as a whole). It is
admitted only if every one admits it, and only then are they all charged, so a denied request costs no
budget anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class Bucket:
    """One GCRA bucket to check (a limit applied to one scope): `rate` per second, `burst` at once."""

    bucket: str  # the store key, e.g. "key:alice", "key:alice:model:fraud-detector", "model:fraud-detector"
    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one bucket says about one request."""

    allowed: bool
    remaining: int  # requests that would still be admitted right now, after this one
    retry_after: float  # seconds until one more request would be admitted; 0 when allowed
    reset_after: float  # seconds until the bucket is back to its full burst


def gcra(tat: float, now: float, rate: float, burst: int) -> tuple[bool, float, Verdict]:
    """(allowed, new TAT, verdict) for one request against one bucket whose stored TAT is `tat` (0 if new)."""
    interval = 1.0 / rate
    tolerance = (burst - 1) * interval
    start = max(tat, now)
    new_tat = start + interval
    allowed = start - now <= tolerance
    if allowed:
        remaining = int((now + tolerance - start) / interval + 1e-9)
        return True, new_tat, Verdict(True, remaining, 0.0, new_tat - now)
    return False, tat, Verdict(False, 0, start - now - tolerance, max(0.0, tat - now))


def check_all(
    tats: Sequence[float], now: float, buckets: Sequence[Bucket]
) -> tuple[bool, list[float], list[Verdict]]:
    """All-or-nothing over several buckets: (admitted, TATs to store, one verdict per bucket)."""
    results = [gcra(tat, now, limit.rate, limit.burst) for tat, limit in zip(tats, buckets, strict=True)]
    admitted = all(allowed for allowed, _, _ in results)
    if not admitted:
        # Nothing is charged; verdicts of buckets that would have admitted still say so.
        return False, list(tats), [verdict for _, _, verdict in results]
    return True, [new_tat for _, new_tat, _ in results], [verdict for _, _, verdict in results]


class Answer(NamedTuple):
    """One request's decision over all its limits, as the headers need it (index: its tightest limit)."""

    admitted: bool
    tightest: int  # index of the limit with the least left (the one that refused, if refused)
    remaining: int
    reset_after: float
    retry_after: float  # 0 when admitted


def summarize(admitted: bool, verdicts: Sequence[Verdict]) -> Answer:
    """One request's verdicts as one answer: its tightest limit, and how long until it may retry."""
    tightest = min(range(len(verdicts)), key=lambda i: verdicts[i].remaining)
    verdict = verdicts[tightest]
    retry = 0.0 if admitted else max(v.retry_after for v in verdicts)
    return Answer(admitted, tightest, verdict.remaining, verdict.reset_after, retry)
