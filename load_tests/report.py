"""Summaries, the printed tables and the JSON document of a benchmark run.

Medians over rounds, because one disturbed round (another process waking up on a 2-core machine)
should not move the result; min-max shows how much the rounds disagreed. Ratios between targets are
also computed round by round: the rounds are interleaved, so within one round both targets ran under
the same conditions, and the per-round ratio cancels slow drifts of the machine.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from targets import Sample, Target

# DESIGN.md section 3, measured on the 2-core development machine (wrk, 32 connections).
REFERENCE = [
    ("nginx fixed response (the backend), direct", "~112,000", "31 us (direct)"),
    ("nginx 1 worker, weighted proxy to it", "20,000-40,000", "+20 us"),
    ("asyncio Protocol + httptools gateway design", "15,000-18,000", "+69 us"),
    ("aiohttp low-level web.Server front", "4,400-7,300", "+241 us"),
]

METRICS: dict[str, Callable[[Sample], float]] = {
    "rps": lambda s: s.wrk.rps,
    "p50_us": lambda s: s.wrk.p50_us,
    "p99_us": lambda s: s.wrk.p99_us,
    "target_cpu": lambda s: s.cpu.target,
    "others_cpu": lambda s: s.cpu.others,
}
OTHERS_DISTURB = 0.15  # cores; above this, programs outside the benchmark were competing for CPU
MODES = ("throughput", "latency")


@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        return cls(statistics.median(values), min(values), max(values)) if values else None

    def to_json(self) -> dict[str, float]:
        return {"median": round(self.median, 3), "min": round(self.low, 3), "max": round(self.high, 3)}


def samples(target: Target, mode: str) -> list[Sample]:
    return [s for s in target.samples if s.mode == mode]


def summary(target: Target, mode: str) -> dict[str, Stat | None]:
    chosen = samples(target, mode)
    return {name: Stat.of([get(s) for s in chosen]) for name, get in METRICS.items()}


def per_round(a: Target, b: Target, mode: str, combine: Callable[[Sample, Sample], float]) -> Stat | None:
    """Combines a's and b's samples of the same round (for example a ratio) and summarizes those."""
    by_round = {s.round: s for s in samples(b, mode)}
    return Stat.of([combine(s, by_round[s.round]) for s in samples(a, mode) if s.round in by_round])


def comparisons(targets: dict[str, Target]) -> dict[str, Stat | None]:
    """Throughput ratios and added latency; keys name what is compared, as in the JSON output."""
    result: dict[str, Stat | None] = {}
    measured = {k: t for k, t in targets.items() if t.samples}
    pairs = [("gateway", "nginx"), ("nginx", "direct"), ("gateway", "direct"), ("gateway", "gateway_nostats")]
    for a, b in pairs:
        if a in measured and b in measured:
            result[f"throughput_{a}_over_{b}"] = per_round(
                measured[a], measured[b], "throughput", lambda x, y: x.wrk.rps / y.wrk.rps
            )
    if "direct" in measured:
        for proxy in ("nginx", "gateway"):
            if proxy in measured:
                result[f"added_p50_us_{proxy}"] = per_round(
                    measured[proxy], measured["direct"], "latency", lambda x, y: x.wrk.p50_us - y.wrk.p50_us
                )
    return result


COMPARISON_LABELS = {
    "throughput_gateway_over_nginx": "throughput gateway / nginx proxy",
    "throughput_nginx_over_direct": "throughput nginx proxy / direct backend",
    "throughput_gateway_over_direct": "throughput gateway / direct backend",
    "added_p50_us_nginx": "p50 added by nginx proxy at 1 connection (us)",
    "added_p50_us_gateway": "p50 added by gateway at 1 connection (us)",
    "throughput_gateway_over_gateway_nostats": "throughput gateway / gateway with stats off (metrics cost)",
}


def _cell(stat: Stat | None, fmt: str) -> str:
    if stat is None:
        return "-"
    m, lo, hi = (format(v, fmt) for v in (stat.median, stat.low, stat.high))
    return f"{m} [{lo}..{hi}]"


def _percent(stat: Stat | None) -> str:
    return "-" if stat is None else f"{100 * stat.median:.0f}"


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  " + "  ".join(cells))


def print_results(targets: dict[str, Target], titles: dict[str, str], loadgen_core: int | None) -> list[str]:
    """Prints the tables and returns the problems found (empty when the run is clean).

    CPU columns are medians, in % of one core. "target CPU" near 100 means the target was the
    bottleneck; "wrk core" near 100 with the target below that means the load generator's core (shared
    with the backend on 2 cores) was the limit; "others CPU" is what programs outside the benchmark
    took, which on a shared machine explains a disturbed round.
    """
    problems: list[str] = []
    header = ["target", "requests/s", "p50 us", "p99 us", "target CPU%", "wrk core%", "others CPU%", "errors"]
    for mode, title in titles.items():
        print(f"\n{title}  (median of rounds [min..max])")
        rows = []
        for target in targets.values():
            if target.unavailable:
                rows.append([target.label, "not measured", *[""] * (len(header) - 2)])
                continue
            stats = summary(target, mode)
            wrk_core = None
            if loadgen_core is not None:
                wrk_core = Stat.of([s.cpu.core_busy.get(loadgen_core, 0.0) for s in samples(target, mode)])
            errors = sum(s.wrk.errors for s in samples(target, mode))
            rows.append(
                [
                    target.label,
                    _cell(stats["rps"], ",.0f"),
                    _cell(stats["p50_us"], ",.0f"),
                    _cell(stats["p99_us"], ",.0f"),
                    _percent(stats["target_cpu"]),
                    _percent(wrk_core),
                    _percent(stats["others_cpu"]),
                    f"{errors:,} FAILED" if errors else "0",
                ]
            )
            if errors:
                problems.append(f"{target.label}: {errors:,} failed requests in the {mode} runs (see above)")
        _print_table(header, rows)

    comp = comparisons(targets)
    print("\nComparisons  (median of per-round values [min..max])")
    if not comp:
        print("  none: they need the direct backend or the nginx proxy measured alongside")
    for key, label in COMPARISON_LABELS.items():
        if key in comp:
            print(f"  {label:<48} {_cell(comp[key], '+,.0f' if key.startswith('added') else '.2f')}")
    print("\nReference, DESIGN.md section 3 (a 2-core machine like this one; compare ratios, not absolutes)")
    for name, rps, added in REFERENCE:
        print(f"  {name:<48} {rps:>15} req/s   p50 {added}")
    return problems


def notes(target: Target, loadgen_core: int | None) -> list[str]:
    """Rounds whose numbers measure something other than the target, found from the CPU figures."""
    found = []
    starved = [
        s.round
        for s in samples(target, "throughput")
        if loadgen_core is not None and s.cpu.target < 0.85 and s.cpu.core_busy.get(loadgen_core, 0.0) > 0.95
    ]
    if starved:
        found.append(
            f"{target.label}: in throughput round(s) {starved} the target used under 85% of its core while "
            "the load generator's core was full; requests/s there is a lower bound"
        )
    disturbed = sorted({s.round for s in target.samples if s.cpu.others > OTHERS_DISTURB})
    if disturbed:
        found.append(
            f"{target.label}: in round(s) {disturbed} programs outside the benchmark used over "
            f"{100 * OTHERS_DISTURB:.0f}% of a core; those rounds were disturbed (medians resist a few "
            "such rounds; rerun on a quiet machine if most rounds are)"
        )
    return found


def to_json(targets: dict[str, Target], header: dict[str, object], problems: list[str]) -> dict[str, object]:
    doc: dict[str, object] = dict(header)
    doc["targets"] = {
        key: {
            "label": t.label,
            "url": t.url if t.port else None,
            "unavailable": t.unavailable,
            "verification": t.verification,
            "summary": {
                mode: {name: (st.to_json() if st else None) for name, st in summary(t, mode).items()}
                for mode in MODES
            },
            "samples": [s.to_json() for s in t.samples],
        }
        for key, t in targets.items()
    }
    doc["comparisons"] = {k: (v.to_json() if v else None) for k, v in comparisons(targets).items()}
    doc["reference_design_md"] = [{"path": n, "requests_per_s": r, "p50": a} for n, r, a in REFERENCE]
    doc["problems"] = problems
    doc["ok"] = not problems
    return doc
