"""The supervisor of `gateway serve --workers N`: a worker that keeps dying is restarted with growing
delays while the others keep serving the port, and the restarts show on the admin API; a worker that
cannot start at all (the port is taken) still stops the gateway with an error.

Real gateway processes in front of the FAKE echo backend (`tests/fault_backend.py`).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.state import files
from tests.fault_backend import FaultBackend, fault_backend
from tests.support import REPO, GatewayProcess, free_port, gateway
from tests.test_admin_e2e import admin, samples

ROUTES = """
backends:
  fake: {{url: "http://127.0.0.1:{port}", timeout: 5s}}
models:
  echo:
    versions:
      "1": {{backend: fake, target: echo/1}}
keys: {{required: false}}
"""


@pytest.fixture(scope="module")
def backend() -> Iterator[FaultBackend]:
    with fault_backend() as fb:
        yield fb


def newest_worker(state: Path, index: int, exclude: set[int], timeout: float = 30.0) -> int:
    """The pid of worker `index` once a process not in `exclude` has published for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snapshot in files.read_snapshots(state):
            if snapshot.worker == index and snapshot.alive and snapshot.pid not in exclude:
                return snapshot.pid
        time.sleep(0.05)
    raise AssertionError(f"no new process for worker {index} within {timeout}s")


class Traffic:
    """Requests one after another, each on a new connection (so the kernel spreads them over workers)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.successes: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("POST", "/v2/models/echo/infer", b"{}")
                ok = conn.getresponse().status == 200
                conn.close()
            except (OSError, http.client.HTTPException):
                ok = False  # a connection the killed worker had accepted or queued
            if ok:
                self.successes.append(time.monotonic())
            else:
                self.failures += 1
            time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def longest_gap(self, since: float) -> float:
        times = [since, *(t for t in self.successes if t > since), time.monotonic()]
        return max(b - a for a, b in itertools.pairwise(times))


def restarts(process: GatewayProcess) -> dict[str, object]:
    status, body = admin(process, "GET", "/api/status")
    assert status == 200, body
    view: dict[str, object] = body["worker_restarts"]
    return view


def test_a_worker_killed_again_and_again_is_restarted_later_each_time_and_the_port_keeps_serving(
    backend: FaultBackend,
) -> None:
    with gateway(ROUTES.format(port=backend.port), workers=2) as process:
        state = process.directory / "state"
        killed: set[int] = set()
        with Traffic(process.port) as traffic:
            started = time.monotonic()
            for _ in range(4):
                pid = newest_worker(state, 0, killed)
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            deadline = time.monotonic() + 10
            while restarts(process)["total"] != 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # worker 0 is down now, waiting out its 4 s: worker 1 serves alone
            gap = traffic.longest_gap(started)

        view = restarts(process)
        recent = view["recent"]
        assert isinstance(recent, list) and view["total"] == 4
        assert [r["delay_s"] for r in reversed(recent)] == [0.5, 1.0, 2.0, 4.0]
        assert all(r["worker"] == 0 and r["exit_code"] == -signal.SIGKILL for r in recent)
        assert {r["pid"] for r in recent} == killed
        status, text = admin(process, "GET", "/metrics")
        assert status == 200
        assert samples(text)[("gateway_worker_restarts_total", ())] == 4
        assert gap < 2.0, f"no request served for {gap:.2f}s ({traffic.failures} failed)"
        assert len(traffic.successes) > 50
        assert "restarting it in 4.0s (4 restart(s) so far)" in process.log()
        assert process.process is not None and process.process.poll() is None
        print(f"4 kills: longest gap {gap:.2f}s, {len(traffic.successes)} served, {traffic.failures} failed")
        # SIGTERM while a restart is pending: no new worker, a clean exit.
        assert process.stop() == 0


def test_a_worker_that_cannot_bind_at_the_first_start_stops_the_gateway_with_the_error(
    tmp_path: Path, backend: FaultBackend
) -> None:
    (tmp_path / "routes.yaml").write_text(ROUTES.format(port=backend.port))
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: the workers cannot share it
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "routes.yaml")]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--grpc-port", "0"]
        argv += ["--admin-port", str(free_port()), "--state-dir", str(tmp_path / "state")]
        env = {**os.environ, "GATEWAY_ADMIN_TOKEN": "tester:test-admin-token"}
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert done.returncode != 0
    assert "cannot listen" in done.stderr and "before it served; stopping" in done.stderr, done.stderr
