"""The indexes every counter uses: latency buckets, what became of a request, how its version was chosen.

A leaf module, so that the typed records (`gateway.stats.records`) and the counters that fill them
(`gateway.stats.counters`) share one definition.
"""

from __future__ import annotations

import math
from enum import IntEnum

# 5% apart: the rollout's p95 test needs bounds as fine as the latency margins users set (its smallest
# representable margin is one bucket ratio); 1 ms to 30 s is then 213 bounds.
BUCKET_FACTOR = 1.05
_FIRST_BUCKET = 0.001
_LAST_BUCKET = 30.0
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    float(f"{_FIRST_BUCKET * BUCKET_FACTOR**i:.6g}")  # 6 significant digits: ratios within 1e-5 of 1.05
    for i in range(math.ceil(math.log(_LAST_BUCKET / _FIRST_BUCKET, BUCKET_FACTOR)) + 1)
)  # upper bounds in seconds; one more bucket (+Inf) follows
# /metrics exports every fifth bound (27.6% apart), plus the last: a cumulative histogram may drop
# bounds exactly, and 213 series per version would be a heavy scrape for no operational gain.
EXPORTED_BUCKETS: tuple[int, ...] = tuple(
    i for i in range(len(LATENCY_BUCKETS)) if i % 5 == 0 or i == len(LATENCY_BUCKETS) - 1
)
BUCKETS = len(LATENCY_BUCKETS) + 1


class Outcome(IntEnum):
    """What became of a request that was routed to a version."""

    OK = 0  # 1xx-3xx from the backend
    CLIENT_ERROR = 1  # a 4xx, or a 5xx that blames the request (gateway.pipeline.blame): the caller's fault
    SERVER_ERROR = 2  # 5xx from the backend
    TIMEOUT = 3  # the backend did not answer in time
    UPSTREAM_ERROR = 4  # could not connect, or the connection broke
    ABANDONED = 5  # 499: the client left, or stopped reading its answer, before the exchange ended


OUTCOMES = tuple(outcome.name.lower() for outcome in Outcome)
# Never the version's doing: out of the evidence entirely, requests and latency included.
CALLER_FAULTS = (Outcome.CLIENT_ERROR, Outcome.ABANDONED)
FAILURES = (Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.UPSTREAM_ERROR)


class Choice(IntEnum):
    """How the version that served a request was chosen."""

    SPLIT = 0  # the weighted split: the experiment's own assignment, the rollout's evidence
    STICKY = 1  # the sticky cohort hash: counted apart and left out of the evidence (one caller's
    # requests are not independent: all its failures land on one version, and the tests count requests)
    PINNED = 2  # named by the caller (path, X-Model-Version, an alias): served and counted, never evidence
    SHADOW = 3  # a mirrored copy whose answer is dropped: counted, never evidence


CHOICES = tuple(choice.name.lower() for choice in Choice)
EVIDENCE = (Choice.SPLIT,)  # what the rollout tests count
