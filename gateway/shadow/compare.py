"""Comparing two answers to one request, and the figures kept per pair of versions (pure).

Equal means every output has the same name, shape and datatype kind, and every element is close in
numpy's sense (|a - b| <= 1e-8 + 1e-5 * |b|, NaN equal to NaN); BYTES must match exactly. The argmax
is compared for classification-like outputs: floating point with more than one element on the last
axis (class scores per row); an answer without one has no argmax to compare. The largest absolute
difference is over all numeric elements of the answer.

Quantiles come from fixed buckets, so workers' figures add up exactly: a reported quantile is the
smallest bucket edge at or above the nearest-rank quantile of the raw values (the figure is at most
one bucket, a factor of 10^(1/4) for differences, above the exact one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.shadow.decode import Tensor
from gateway.typed_json import Fields, RecordError

RTOL, ATOL = 1e-5, 1e-8  # numpy.isclose's defaults
# |difference| buckets: exactly 0, then 1e-9 .. 1e4 at four per decade; above the last is "more".
DIFF_EDGES: tuple[float, ...] = (0.0, *(10 ** (k / 4) for k in range(-36, 17)))
_STEPS_MS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# Signed latency difference (shadow minus primary), milliseconds.
LATENCY_EDGES_MS: tuple[float, ...] = (*(-s for s in reversed(_STEPS_MS)), 0.0, *_STEPS_MS)
REASONS = ("status", "undecodable", "too_large", "busy")  # why an answer pair was not compared


@dataclass(frozen=True, slots=True)
class Comparison:
    equal: bool
    same_argmax: bool | None  # None: no classification-like output
    max_abs_diff: float | None  # None: the answers have different outputs or shapes


def compare(primary: dict[str, Tensor], shadow: dict[str, Tensor]) -> Comparison:
    if primary.keys() != shadow.keys():
        return Comparison(False, None, None)
    equal, largest, argmax = True, 0.0, None
    for name, a in primary.items():
        b = shadow[name]
        if isinstance(a, tuple) or isinstance(b, tuple):
            equal = equal and a == b if isinstance(a, tuple) and isinstance(b, tuple) else False
            continue
        if a.shape != b.shape:
            return Comparison(False, None, None)
        x, y = a.astype(np.float64), b.astype(np.float64)
        equal = equal and bool(np.isclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True).all())
        if x.size:
            diff = np.abs(x - y)
            diff[np.isnan(x) & np.isnan(y)] = 0.0
            largest = max(largest, float(np.nan_to_num(diff, nan=math.inf).max()))
        if a.dtype.kind == "f" and a.ndim >= 1 and a.shape[-1] > 1:
            same = bool((np.argmax(x, axis=-1) == np.argmax(y, axis=-1)).all())
            argmax = same if argmax is None else argmax and same
    return Comparison(equal, argmax, largest)


def bucket(edges: tuple[float, ...], value: float) -> int:
    """The first bucket whose edge is at or above `value`; len(edges) for beyond the last."""
    low, high = 0, len(edges)
    while low < high:
        mid = (low + high) // 2
        if edges[mid] >= value:
            high = mid
        else:
            low = mid + 1
    return low


OVER = "beyond"  # a quantile above the last bucket edge: JSON has no infinity


def quantile(edges: tuple[float, ...], counts: tuple[int, ...] | list[int], q: float) -> float | str | None:
    total = sum(counts)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for i, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return edges[i] if i < len(edges) else OVER
    return OVER


@dataclass(slots=True)
class PairStats:
    """Cumulative figures for one (model, primary version, shadow version); one process's."""

    compared: int = 0
    equal: int = 0
    argmax_compared: int = 0
    same_argmax: int = 0
    shape_differs: int = 0
    diff_counts: list[int] = field(default_factory=lambda: [0] * (len(DIFF_EDGES) + 1))
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    latency_sum_ms: float = 0.0
    not_compared: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def add(self, result: Comparison, latency_diff_ms: float) -> None:
        self.compared += 1
        self.equal += result.equal
        if result.same_argmax is not None:
            self.argmax_compared += 1
            self.same_argmax += result.same_argmax
        if result.max_abs_diff is None:
            self.shape_differs += 1
        else:
            self.diff_counts[bucket(DIFF_EDGES, result.max_abs_diff)] += 1
        self.latency_counts[bucket(LATENCY_EDGES_MS, latency_diff_ms)] += 1  # noqa: RUF100
        self.latency_sum_ms += latency_diff_ms

    def merge(self, other: PairStats) -> None:
        self.compared += other.compared
        self.equal += other.equal
        self.argmax_compared += other.argmax_compared
        self.same_argmax += other.same_argmax
        self.shape_differs += other.shape_differs
        self.diff_counts = [a + b for a, b in zip(self.diff_counts, other.diff_counts, strict=True)]
        self.latency_counts = [a + b for a, b in zip(self.latency_counts, other.latency_counts, strict=True)]
        self.latency_sum_ms += other.latency_sum_ms
        for reason in REASONS:
            self.not_compared[reason] += other.not_compared.get(reason, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "equal": self.equal,
            "argmax_compared": self.argmax_compared,
            "same_argmax": self.same_argmax,
            "shape_differs": self.shape_differs,
            "diff_counts": list(self.diff_counts),
            "latency_counts": list(self.latency_counts),
            "latency_sum_ms": self.latency_sum_ms,
            "not_compared": dict(self.not_compared),
        }

    @classmethod
    def read(cls, f: Fields) -> PairStats:
        diff, latency = list(f.integers("diff_counts")), list(f.integers("latency_counts"))
        if len(diff) != len(DIFF_EDGES) + 1 or len(latency) != len(LATENCY_EDGES_MS) + 1:
            raise RecordError(f"{f.where}: bucket counts of another release")
        reasons = f.child("not_compared")
        return cls(
            f.integer("compared"),
            f.integer("equal"),
            f.integer("argmax_compared"),
            f.integer("same_argmax"),
            f.integer("shape_differs"),
            diff,
            latency,
            f.number("latency_sum_ms"),
            {reason: reasons.integer(reason) for reason in REASONS},
        )

    def summary(self) -> dict[str, Any]:
        """What the admin API and the dashboard show."""
        n = self.compared
        diffs = self.diff_counts
        return {
            "compared": n,
            "equal_share": self.equal / n if n else None,
            "argmax_compared": self.argmax_compared,
            "same_argmax_share": self.same_argmax / self.argmax_compared if self.argmax_compared else None,
            "shape_differs": self.shape_differs,
            "max_abs_diff": {
                q: quantile(DIFF_EDGES, diffs, p)
                for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
            },
            "latency_diff_ms": {
                "mean": self.latency_sum_ms / n if n else None,
                **{
                    q: quantile(LATENCY_EDGES_MS, self.latency_counts, p)
                    for q, p in (("p50", 0.5), ("p95", 0.95))
                },
            },
            "not_compared": dict(self.not_compared),
        }


def merge_all(parts: Iterable[Mapping[str, PairStats]]) -> dict[tuple[str, str, str], PairStats]:
    """Several processes' figures (keyed "model/primary/shadow") summed per (model, primary, shadow)."""
    merged: dict[tuple[str, str, str], PairStats] = {}
    for part in parts:
        for key, stats in part.items():
            model, primary, shadow = key.split("/", 2)
            merged.setdefault((model, primary, shadow), PairStats()).merge(stats)
    return merged
