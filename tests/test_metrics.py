"""`gateway.admin.metrics`: Prometheus text from hand-made worker snapshots.

The snapshots are written as the JSON a worker publishes and parsed through `WorkerSnapshot.from_json`,
as the control plane reads them.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.admin import metrics
from gateway.admin.control_plane import ControlPlane
from gateway.state import files as snapshots
from gateway.state.records import WorkerSnapshot
from gateway.stats.counters import LATENCY_BUCKETS, STATUS_CLASSES
from gateway.stats.kinds import EXPORTED_BUCKETS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
ROUTES = Path(__file__).resolve().parent.parent / "routes.yaml"


def version_stats(
    statuses: list[int], outcomes: list[int], latencies: list[float], in_flight: int = 0
) -> dict[str, Any]:
    """Counters as a worker publishes them: buckets non-cumulative, the last one +Inf."""
    buckets = [0] * (len(LATENCY_BUCKETS) + 1)
    for seconds in latencies:
        buckets[next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))] += 1
    return {
        "statuses": statuses,
        "outcomes": outcomes,
        "buckets": buckets,
        "latency_sum": sum(latencies),
        "in_flight": in_flight,
        "consecutive_failures": 0,
    }


def reload_event(at: float, ok: bool, errors: list[str] | None = None) -> dict[str, Any]:
    return {
        "time": at,
        "ok": ok,
        "revision": "rev-a" if ok else None,
        "trigger": "start",
        "errors": errors or [],
        "duration_ms": 1.0,
    }


def worker(
    pid: int,
    *,
    alive: bool = True,
    revision: str = "rev-a",
    versions: dict[str, dict[str, Any]] | None = None,
    unrouted: list[int] | None = None,
    reloads: list[dict[str, Any]] | None = None,
    reload_counts: dict[str, int] | None = None,
    ready: dict[str, bool] | None = None,
    backends: dict[str, bool] | None = None,
    started: float = 1000.0,
    internal_errors: int = 0,
    audit_failures: int = 0,
) -> dict[str, Any]:
    return {
        "pid": pid,
        "worker": pid % 10,
        "started": started,
        "time": time.time(),
        "alive": alive,
        "revision": revision,
        "source": "routes.yaml",
        "reloads": reloads if reloads is not None else [reload_event(started, True)],
        "reload_counts": reload_counts or {"ok": 1, "failed": 0},
        "health": {
            "backends": {
                n: {"ready": r, "detail": "", "checked_at": 1.0} for n, r in (backends or {}).items()
            },
            "versions": {k: {"ready": r, "detail": "", "checked_at": 1.0} for k, r in (ready or {}).items()},
        },
        "splits": {},
        "stats": {"versions": versions or {}, "unrouted": unrouted or [0, 0, 0, 0, 0]},
        "mirrors": {"in_flight": 1, "skipped": 2},
        "connections": 4,
        "admission": {
            "store_url": "memory://",
            "store_up": True,
            "on_error": "fail_closed",
            "live_processes": 1,
            "store_errors": 0,
            "fail_open": 0,
            "fail_closed": 0,
            "outcomes": [],
        },
        "rollouts": {"leader": False, "records": {}},
        "internal_errors": internal_errors,
        "audit_failures": audit_failures,
    }


def render(fleet: list[dict[str, Any]], table_revision: str | None) -> bytes:
    """The text for these hand-made snapshots, read the way the control plane reads snapshot files."""
    workers = [replace(WorkerSnapshot.from_json(w), alive=w["alive"]) for w in fleet]
    return metrics.render_snapshots(workers, table_revision)


def parse(text: bytes) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


FD = "fraud-detector"


@pytest.fixture
def fleet() -> list[dict[str, Any]]:
    """Two live workers and one that died after serving requests."""
    a = worker(
        101,
        versions={
            f"{FD}/2.1.3": version_stats([0, 10, 0, 2, 1], [10, 2, 0, 1, 0], [0.002] * 6 + [0.05] * 7, 3),
            f"{FD}/2.2.0": version_stats([0, 4, 0, 0, 0], [4, 0, 0, 0, 0], [0.01] * 4),
        },
        unrouted=[0, 0, 0, 5, 1],
        reloads=[reload_event(1.0, True), reload_event(2.0, False, ["x"])],
        reload_counts={"ok": 3, "failed": 1},
        ready={f"{FD}/2.1.3": True, f"{FD}/2.2.0": True},
        backends={"triton-a": True, "triton-b": True},
        started=1000.0,
    )
    b = worker(
        102,
        revision="rev-b",
        versions={f"{FD}/2.1.3": version_stats([0, 5, 0, 0, 3], [5, 0, 1, 1, 1], [0.002, 40.0] * 4, 2)},
        unrouted=[0, 0, 0, 2, 0],
        reload_counts={"ok": 2, "failed": 0},
        ready={f"{FD}/2.1.3": True, f"{FD}/2.2.0": False},
        backends={"triton-a": True, "triton-b": False},
        started=900.0,
        internal_errors=2,
    )
    gone = worker(
        103,
        alive=False,
        revision="rev-old",
        versions={f"{FD}/2.1.3": version_stats([0, 7, 0, 0, 0], [7, 0, 0, 0, 0], [0.3] * 7, 7)},
        unrouted=[0, 0, 0, 1, 0],
        reload_counts={"ok": 1, "failed": 4},
        ready={f"{FD}/2.1.3": False},
        started=10.0,
        internal_errors=1,
        audit_failures=2,
    )
    return [a, b, gone]


def test_request_counts_add_up_exactly_across_workers(fleet: list[dict[str, Any]]) -> None:
    samples = parse(render(fleet, "rev-a"))
    expected = {"1xx": 0, "2xx": 10 + 5 + 7, "3xx": 0, "4xx": 2, "5xx": 1 + 3}
    for code in STATUS_CLASSES:
        assert (
            value(samples, "gateway_requests_total", model=FD, version="2.1.3", code=code) == expected[code]
        )
    assert value(samples, "gateway_requests_total", model=FD, version="2.2.0", code="2xx") == 4
    for kind, count in {"timeout": 2, "upstream_error": 1, "server_error": 1}.items():
        assert value(samples, "gateway_upstream_errors_total", model=FD, version="2.1.3", kind=kind) == count
    unrouted = {labels: v for labels, v in series(samples, "gateway_unrouted_responses_total").items()}
    assert unrouted[frozenset({("code", "4xx")})] == 8
    assert unrouted[frozenset({("code", "5xx")})] == 1
    assert value(samples, "gateway_mirror_skipped_total") == 6  # dead worker's skips happened too
    assert value(samples, "gateway_internal_errors_total") == 3  # and its internal errors too
    assert value(samples, "gateway_audit_write_failures_total") == 2  # and its lost audit lines


def test_histogram_is_cumulative_and_matches_count(fleet: list[dict[str, Any]]) -> None:
    samples = parse(render(fleet, "rev-a"))
    name = "gateway_request_duration_seconds"
    buckets = {
        dict(labels)["le"]: v
        for labels, v in series(samples, f"{name}_bucket").items()
        if dict(labels)["version"] == "2.1.3"
    }
    bounds = sorted(buckets, key=float)
    # every fifth of the fine bounds the rollout tests use, and the last: a scrape of a sane size
    assert [float(b) for b in bounds] == [*(LATENCY_BUCKETS[i] for i in EXPORTED_BUCKETS), math.inf]
    assert len(bounds) < 50 and float(bounds[-2]) == LATENCY_BUCKETS[-1]
    counts = [buckets[b] for b in bounds]
    assert counts == sorted(counts), "cumulative buckets never go down"
    total = value(samples, f"{name}_count", model=FD, version="2.1.3")
    assert counts[-1] == total == 13 + 8 + 7
    assert buckets[next(b for b in bounds if float(b) >= 0.002)] == 6 + 4  # the 2 ms requests of a and b
    assert buckets[next(b for b in bounds if float(b) >= 0.05)] == 6 + 4 + 7
    assert counts[-2] == total - 4  # the four 40 s requests are only in +Inf
    assert value(samples, f"{name}_sum", model=FD, version="2.1.3") == pytest.approx(
        0.002 * 6 + 0.05 * 7 + (0.002 + 40.0) * 4 + 0.3 * 7
    )


def test_in_flight_and_other_gauges_come_from_live_workers_only(fleet: list[dict[str, Any]]) -> None:
    samples = parse(render(fleet, "rev-a"))
    assert value(samples, "gateway_requests_in_flight", model=FD, version="2.1.3") == 3 + 2
    assert value(samples, "gateway_requests_in_flight", model=FD, version="2.2.0") == 0
    assert value(samples, "gateway_mirror_in_flight") == 2
    assert value(samples, "gateway_client_connections") == 8
    assert value(samples, "gateway_workers", state="alive") == 2
    assert value(samples, "gateway_workers", state="gone") == 1
    assert value(samples, "gateway_start_time_seconds") == 900.0  # oldest live, not the dead one


def test_revision_info_per_live_worker(fleet: list[dict[str, Any]]) -> None:
    samples = parse(render(fleet, "rev-a"))
    revisions = series(samples, "gateway_config_revision_info")
    assert {tuple(sorted(labels)): v for labels, v in revisions.items()} == {
        (("pid", "101"), ("revision", "rev-a")): 1,
        (("pid", "102"), ("revision", "rev-b")): 1,
    }
    assert value(samples, "gateway_config_file_revision_info", revision="rev-a") == 1
    assert value(samples, "gateway_config_file_valid") == 1
    assert value(samples, "gateway_config_in_sync") == 0  # 102 is still on rev-b

    fleet[1]["revision"] = "rev-a"
    samples = parse(render(fleet, "rev-a"))
    assert value(samples, "gateway_config_in_sync") == 1  # the dead worker's old revision does not count


def test_invalid_file_still_reports_what_workers_serve(fleet: list[dict[str, Any]]) -> None:
    fleet[1]["revision"] = "rev-a"
    samples = parse(render(fleet, None))
    assert value(samples, "gateway_config_file_valid") == 0
    assert not series(samples, "gateway_config_file_revision_info")
    assert value(samples, "gateway_config_in_sync") == 1  # they agree with each other


def test_reloads_and_readiness(fleet: list[dict[str, Any]]) -> None:
    samples = parse(render(fleet, "rev-a"))
    assert value(samples, "gateway_config_reloads_total", result="success") == 3 + 2 + 1
    assert value(samples, "gateway_config_reloads_total", result="failure") == 1 + 0 + 4
    assert value(samples, "gateway_config_last_reload_success", pid="101") == 0
    assert value(samples, "gateway_config_last_reload_success", pid="102") == 1
    assert ("gateway_config_last_reload_success", frozenset({("pid", "103")})) not in samples
    assert value(samples, "gateway_backend_ready", backend="triton-b", pid="101") == 1
    assert value(samples, "gateway_backend_ready", backend="triton-b", pid="102") == 0
    # 2.1.3: both live workers see it ready (the dead one's opinion is stale); 2.2.0: one does not.
    assert value(samples, "gateway_version_ready", model=FD, version="2.1.3") == 1
    assert value(samples, "gateway_version_ready", model=FD, version="2.2.0") == 0
    assert value(samples, "gateway_build_info", version=__version__) == 1


def test_no_workers_yet_renders_valid_text() -> None:
    samples = parse(metrics.render_snapshots([], None))
    assert value(samples, "gateway_workers", state="alive") == 0
    assert value(samples, "gateway_config_reloads_total", result="failure") == 0


def test_render_reads_the_control_planes_state_dir(tmp_path: Path, fleet: list[dict[str, Any]]) -> None:
    state = tmp_path / "state"
    plane = ControlPlane(str(ROUTES), state, _never)
    revision = plane.table().revision  # type: ignore[union-attr]
    for snapshot in fleet:
        snapshots.write_snapshot(state, WorkerSnapshot.from_json(snapshot))
    # read_snapshots judges liveness by age: make 103 stale.
    stale = snapshots.read_json(state / "workers" / "103.json")
    stale["time"] = time.time() - 60
    snapshots.write_snapshot(state, WorkerSnapshot.from_json(stale))

    samples = parse(metrics.render(plane))
    assert value(samples, "gateway_config_file_revision_info", revision=revision) == 1
    assert value(samples, "gateway_workers", state="gone") == 1
    assert value(samples, "gateway_requests_total", model=FD, version="2.1.3", code="2xx") == 22


async def _never() -> None:
    raise AssertionError("no reload expected")
