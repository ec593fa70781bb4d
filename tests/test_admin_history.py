"""GET /api/history: the points the dashboard's charts draw, from the control plane's samples.

A worker's snapshot grows by a known amount between samples taken on a clock the test moves, so every
point's rate and error rate is known exactly.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from gateway.admin import control_plane
from gateway.admin.control_plane import CHART_STEP, CHART_WINDOW, HISTORY, ControlPlane
from tests.test_admin_unit import FD, ROUTES, Fleet


def counters(ok: int, failed: int) -> dict[str, Any]:
    # outcomes: ok, client_error, server_error, timeout, upstream_error, abandoned (stats/kinds.py)
    return {
        "statuses": [0, ok, 0, 0, failed],
        "outcomes": [ok, 0, failed, 0, 0, 0],
        "buckets": [0, 0, ok + failed] + [0] * 46,
        "latency_sum": 0.0,
        "in_flight": 0,
        "consecutive_failures": 0,
    }


def test_history_points_cover_a_short_window_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(ROUTES)
    fleet = Fleet(tmp_path / "state", config)
    plane = ControlPlane(str(config), fleet.state, fleet.trigger)
    clock = [1000.0]
    monkeypatch.setattr(control_plane.time, "monotonic", lambda: clock[0])
    ok = failed = 0
    seconds = int(HISTORY + 40)  # more than is kept: the oldest samples are dropped
    for second in range(seconds):
        # 10 requests a second; from second 200 on, 2 of them fail.
        ok, failed = ok + (8 if second >= 200 else 10), failed + (2 if second >= 200 else 0)
        fleet.write(101, stats={"versions": {f"{FD}/2.1.3": counters(ok, failed)}, "unrouted": [0] * 5})
        plane.sample()
        clock[0] += 1.0
    clock[0] -= 1.0
    view = plane.history_view()
    assert view["window_seconds"] == CHART_WINDOW
    points = view["models"][FD]["2.1.3"]
    times = [p["t"] for p in points]
    assert times == sorted(times) and all(b - a >= CHART_STEP - 1e-6 for a, b in itertools.pairwise(times))
    assert times[-1] - times[0] <= HISTORY
    assert len(points) >= HISTORY / CHART_STEP - 2
    assert {p["rps"] for p in points} == {10.0}
    # Points whose window lies wholly after second 200 show 20% failing, wholly before it none.
    newest, oldest = points[-1], points[0]
    assert newest["error_rate"] == 0.2 and oldest["error_rate"] == 0.0
    assert {p["error_rate"] for p in points} >= {0.0, 0.2}
    assert newest["p50"] is not None and newest["p50"] <= newest["p95"] <= newest["p99"]
