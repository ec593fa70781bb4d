"""routes.yaml edited while the gateway serves: 2 workers, real Triton, steady traffic, 50 rewrites."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backends.example import INPUT_NAME, VERSION_OUTPUT
from tests.conftest import TritonFleet
from tests.support import GatewayProcess, gateway

BODY = json.dumps({"inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [1, 2], "data": [1, 1]}]})
TRITON_VERSION = {"2.1.3": 3, "2.2.0": 4, "2.1.3-copy": 3}


def routes_for(triton: TritonFleet, weights: tuple[int, int], extra_version: bool = False) -> str:
    extra = "      2.1.3-copy: {backend: triton-a, target: fraud_detector/3}\n" if extra_version else ""
    return f"""
backends:
  triton-a: {{url: "{triton.v3.url}", timeout: 10s}}
  triton-b: {{url: "{triton.v4.url}", timeout: 10s}}
models:
  fraud-detector:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3}}
      2.2.0: {{backend: triton-b, target: fraud_detector/4}}
{extra}    split: {{2.1.3: {weights[0]}, 2.2.0: {weights[1]}}}
keys: {{required: false}}
"""


INVALID_EDITS = [
    ("split over 100", lambda good: re.sub(r"split: \{2\.1\.3: \d+", "split: {2.1.3: 105", good)),
    ("YAML syntax", lambda good: good.replace("models:", "models: [")),
    ("unknown backend", lambda good: good.replace("backend: triton-b", "backend: triton-z")),
]


@dataclass
class Traffic:
    """Unpinned requests from several threads until stopped; every answer is checked."""

    port: int
    failures: list[str] = field(default_factory=list)
    answered: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, threads: int = 3) -> Traffic:
        for _ in range(threads):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        requests = 0
        while not self.stop.is_set():
            requests += 1
            if requests % 20 == 0:  # new connections now and then, so both workers get traffic
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("POST", "/v2/models/fraud-detector/infer", BODY)
                response = conn.getresponse()
                payload = response.read()
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            if response.status != 200:
                self.failures.append(f"{response.status}: {payload[:200]!r}")
                continue
            version = response.getheader("X-Model-Version") or "?"
            outputs = {o["name"]: o["data"] for o in json.loads(payload)["outputs"]}
            if outputs[VERSION_OUTPUT][0] != TRITON_VERSION.get(version):
                self.failures.append(f"{version} answered with Triton version {outputs[VERSION_OUTPUT]}")
            self.answered[version] += 1
        conn.close()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def worker_states(process: GatewayProcess) -> list[dict[str, object]]:
    states = []
    for path in (process.directory / "state" / "workers").glob("*.json"):
        try:
            states.append(json.loads(path.read_text()))
        except ValueError:
            continue  # replaced atomically, but a reader can still race the very first write
    return states


def wait_until(condition: object, timeout: float) -> float | None:
    """Seconds until `condition()` held, or None if it did not within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if callable(condition) and condition():
            return time.monotonic() - started
        time.sleep(0.01)
    return None


def write_file(path: Path, text: str, by_rename: bool) -> str:
    """Write like an editor would; returns the revision the gateway will report (sha256 of the bytes)."""
    data = text.encode()
    if by_rename:
        temporary = path.with_name(path.name + ".swp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
    else:
        with open(path, "wb") as handle:
            handle.write(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def two_workers(triton: TritonFleet) -> Iterator[GatewayProcess]:
    with gateway(routes_for(triton, (90, 10)), workers=2) as process:
        assert wait_until(lambda: len(worker_states(process)) == 2, 10) is not None
        yield process


def test_fifty_edits_under_traffic_apply_everywhere_within_a_second(
    triton: TritonFleet, two_workers: GatewayProcess
) -> None:
    process = two_workers
    path = process.routes_path
    traffic = Traffic(process.port).start()
    delays = []
    refused = 0
    try:
        good = routes_for(triton, (90, 10))
        for edit in range(50):
            by_rename = edit % 2 == 1
            if edit % 5 == 4:  # an invalid edit: reported, and the last good table keeps serving
                name, breaker = INVALID_EDITS[(edit // 5) % len(INVALID_EDITS)]
                serving = {state["revision"] for state in worker_states(process)}
                bad_revision = write_file(path, breaker(good), by_rename)

                def refused_everywhere(bad: str = bad_revision) -> bool:
                    states = worker_states(process)
                    return (
                        len(states) == 2
                        and all(any(not e["ok"] and e["time"] > 0 for e in s["reloads"][-1:]) for s in states)
                        and all(s["revision"] != bad for s in states)
                    )

                assert wait_until(refused_everywhere, 5) is not None, f"invalid edit ({name}) not reported"
                for state in worker_states(process):
                    last = state["reloads"][-1]
                    assert not last["ok"] and last["errors"], last
                    assert all(":" in error for error in last["errors"])  # file:line:column: message
                assert {state["revision"] for state in worker_states(process)} == serving
                refused += 1
                continue
            weights = (100 - edit % 4 * 10, edit % 4 * 10)
            good = routes_for(triton, weights, extra_version=edit % 3 == 0)
            revision = write_file(path, good, by_rename)
            took = wait_until(
                lambda rev=revision: [s["revision"] for s in worker_states(process)] == [rev, rev], 5
            )
            assert took is not None, f"edit {edit} never reached both workers"
            delays.append(took)
            for state in worker_states(process):
                assert state["splits"]["fraud-detector"] == {"2.1.3": weights[0], "2.2.0": weights[1]}
            # The new version is there exactly when the file says so.
            conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
            conn.request("POST", "/v2/models/fraud-detector/versions/2.1.3-copy/infer", BODY)
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status == (200 if edit % 3 == 0 else 404)
    finally:
        traffic.finish()
    assert traffic.failures == [], traffic.failures[:10]
    assert sum(traffic.answered.values()) > 200
    assert refused == 10
    print(
        f"\nedits applied in every worker after: median {sorted(delays)[len(delays) // 2]:.3f}s, "
        f"max {max(delays):.3f}s; traffic answered {dict(traffic.answered)}"
    )
    assert max(delays) < 1.0, sorted(delays)[-5:]


def test_sighup_reloads_every_worker(triton: TritonFleet, two_workers: GatewayProcess) -> None:
    process = two_workers
    before = {s["pid"]: len(s["reloads"]) for s in worker_states(process)}
    process.signal(signal.SIGHUP)

    def all_reloaded() -> bool:
        states = worker_states(process)
        return all(
            s["reloads"][-1]["trigger"] == "signal"
            and len(s["reloads"]) >= min(before.get(s["pid"], 0) + 1, 50)
            for s in states
        )

    assert wait_until(all_reloaded, 5) is not None


# Failures that mean a request was never taken in: the connection was refused or closed before the
# gateway read it (an idle keep-alive connection closed by the shutdown). Anything else is a lost request.
NOT_ACCEPTED = ("ConnectionRefusedError", "RemoteDisconnected", "BrokenPipeError", "ConnectionResetError")


def test_sigterm_during_traffic_answers_every_accepted_request(triton: TritonFleet) -> None:
    routes = triton.routes(slow_timeout="10s")
    with gateway(routes, workers=2) as process:
        slow_results: list[int | str] = []

        def slow_request() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
            try:
                conn.request("POST", "/v2/models/fraud-detector/versions/2.3.0-slow/infer", BODY)
                response = conn.getresponse()
                response.read()
                slow_results.append(response.status)
            except Exception as exc:  # recorded and asserted below
                slow_results.append(f"{type(exc).__name__}: {exc}")

        traffic = Traffic(process.port).start(threads=2)
        slow = [threading.Thread(target=slow_request) for _ in range(3)]
        for thread in slow:
            thread.start()
        time.sleep(1.0)  # the slow requests (2.5 s each in Triton) are in flight now
        process.signal(signal.SIGTERM)
        for thread in slow:
            thread.join(30)
        assert process.process is not None
        assert process.process.wait(30) == 0
        traffic.finish()
    assert slow_results == [200, 200, 200]
    lost = [f for f in traffic.failures if not f.startswith(NOT_ACCEPTED)]
    assert lost == [], lost[:5]
    assert sum(traffic.answered.values()) > 20
