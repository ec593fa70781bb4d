"""Rollout evidence end to end: real Triton versions, a real Redis, two gateway processes.

One run of both gateways goes through the issue's scenarios in order (each a few seconds; the evidence
checks are exact, so each would fail on a double count, a pinned request, a caller's fault or a lost
command): the evidence is exactly the split's requests, apart from pinned ones and caller faults; a
non-leader SIGKILLed mid-step and replaced changes nothing beyond what it served; a healthy canary with
5% malformed requests steps up; operator commands of one rollout never act on the next; with the audit
log unwritable a failing canary is rolled back and the state says so. Apart: a client that reads
slowly is not a backend timeout, and one that reads nothing is its own fault (499).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from backends.local import TritonProcess, free_port, start_version
from tests.conftest import TritonFleet
from tests.fault_backend import FaultBackend, fault_backend
from tests.redis_servers import RedisServer
from tests.support import GatewayProcess, gateway
from tests.test_admin_e2e import admin
from tests.test_live_reload import BODY, wait_until
from tests.test_rollout_e2e import leader_of

FD = "fraud-detector"
MALFORMED = (
    b'{"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 2], "data": [1, 1]}'  # cut short
)
HOLD = "min_step_duration: 2s, min_step_requests: 50"


@pytest.fixture(scope="module")
def failing() -> Iterator[TritonProcess]:
    process = start_version("fraud_detector", 8, free_port(), error_rate=0.3)  # 30% of batches fail (500)
    try:
        yield process
    finally:
        process.stop()


def routes(triton: TritonFleet, failing: TritonProcess, store_url: str, rollout: str) -> str:
    return f"""
backends:
  triton-a: {{url: "{triton.v3.url}", timeout: 10s}}
  triton-b: {{url: "{triton.v4.url}", timeout: 10s}}
  triton-failing: {{url: "{failing.url}", timeout: 10s}}
models:
  {FD}:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3}}
      2.2.0: {{backend: triton-b, target: fraud_detector/4}}
      2.3.0: {{backend: triton-a, target: fraud_detector/3}}
      2.9.0: {{backend: triton-failing, target: fraud_detector/8}}
    split: {{2.1.3: 100, 2.2.0: 0, 2.3.0: 0, 2.9.0: 0}}
    rollout: {rollout}
keys: {{required: false}}
store: {{url: "{store_url}", timeout: 500ms}}
"""


@dataclass
class Mix:
    """Requests from threads over several gateways: split, malformed (unpinned), pinned by path."""

    ports: list[int]
    malformed_every: int = 20  # 5%
    pinned_every: int = 0  # 0: none
    answers: Counter[tuple[str, int, str]] = field(default_factory=Counter)  # (kind, status, version)
    problems: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, count: int, threads: int = 4) -> Mix:
        """Send about `count` requests (or until stopped, if count is 0) and wait for them."""
        workers = [threading.Thread(target=self._loop, args=(i, count // threads)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return self

    def background(self, threads: int = 4) -> list[threading.Thread]:
        workers = [threading.Thread(target=self._loop, args=(i, 0), daemon=True) for i in range(threads)]
        for worker in workers:
            worker.start()
        return workers

    def _loop(self, index: int, count: int) -> None:
        sent = 0
        while (count and sent < count) or (not count and not self.stop.is_set()):
            sent += 1
            port = self.ports[(index + sent // 25) % len(self.ports)]
            if self.pinned_every and sent % self.pinned_every == 0:
                kind, path, body = "pinned", f"/v2/models/{FD}/versions/2.2.0/infer", BODY.encode()
            elif sent % self.malformed_every == 3:
                kind, path, body = "malformed", f"/v2/models/{FD}/infer", MALFORMED
            else:
                kind, path, body = "split", f"/v2/models/{FD}/infer", BODY.encode()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                conn.close()
            except OSError as exc:
                self.problems.append(f"{kind}: {exc}")
                continue
            version = response.getheader("X-Model-Version") or ""
            with self._lock:
                self.answers[(kind, response.status, version)] += 1
            if kind == "malformed" and b"failed to parse the request JSON" not in payload:
                self.problems.append(f"malformed answered {response.status}: {payload[:120]!r}")

    def served(self, version: str) -> int:
        return self.answers[("split", 200, version)]


def record_of(process: GatewayProcess) -> dict[str, object]:
    status, body = admin(process, "GET", "/api/rollouts")
    assert status == 200, body
    record = body["rollouts"][FD]["record"]
    return record if record is not None else {}


def phase(process: GatewayProcess) -> object:
    state = record_of(process).get("state")
    return state.get("phase") if isinstance(state, dict) else None


def evidence(process: GatewayProcess) -> tuple[int, int, int, int, int]:
    """(baseline requests, canary requests, canary failures, canary pinned, caller faults) of the step."""
    found = record_of(process).get("evidence")
    if not isinstance(found, dict) or "counts" not in found:
        return (-1, -1, -1, -1, -1)
    counts, traffic = found["counts"], found["traffic"]
    faults = sum(traffic[v][c]["caller_faults"] for v in traffic for c in ("split", "sticky"))
    return (
        counts["baseline"]["requests"],
        counts["canary"]["requests"],
        counts["canary"]["failures"],
        traffic["2.2.0"]["pinned"]["requests"],
        faults,
    )


def expected(mixes: list[Mix]) -> tuple[int, int, int, int, int]:
    faults = sum(m.answers[("malformed", 400, v)] for m in mixes for v in ("2.1.3", "2.2.0"))
    pinned = sum(m.answers[("pinned", 200, "2.2.0")] for m in mixes)
    return (sum(m.served("2.1.3") for m in mixes), sum(m.served("2.2.0") for m in mixes), 0, pinned, faults)


def by_choice(process: GatewayProcess, version: str) -> dict[str, dict[str, int]]:
    """What this gateway's own workers served of `version`, by how it was chosen."""
    status, body = admin(process, "GET", "/api/versions")
    assert status == 200, body
    return body["models"][FD][version]["total"]["by_choice"]  # type: ignore[no-any-return]


def act(process: GatewayProcess, action: str) -> None:
    status, body = admin(process, "POST", f"/api/rollouts/{FD}/{action}")
    assert status == 202, body


def retarget(processes: list[GatewayProcess], table: str) -> None:
    for process in processes:
        process.routes_path.write_text(table)


def next_spec(baseline: str, canary: str, first_step: int) -> str:
    """A rollout that never progresses on its own: only an operator (or a leaked command) would move it."""
    return f"{{baseline: {baseline}, canary: {canary}, steps: [{first_step}, 100], min_step_duration: 600s}}"


def start_next(processes: list[GatewayProcess], table: str, first_step: int) -> None:
    """Change the file to a new rollout; it must start at its first step, whatever came before."""
    retarget(processes, table)

    def started() -> bool:
        state = record_of(processes[0]).get("state")
        return isinstance(state, dict) and state["weight"] == first_step and state["phase"] == "progressing"

    assert wait_until(started, 10) is not None, record_of(processes[0])


def test_rollout_evidence_with_two_gateways(triton: TritonFleet, failing: TritonProcess) -> None:
    redis = RedisServer().start()
    healthy = f"{{baseline: 2.1.3, canary: 2.2.0, steps: [50, 100], {HOLD}, max_error_rate_increase: 0.01}}"
    table = routes(triton, failing, redis.url, healthy)
    first = GatewayProcess(table).start()
    second = GatewayProcess(table).start()
    replacement: GatewayProcess | None = None
    try:
        assert wait_until(lambda: phase(first) == "progressing", 15) is not None
        act(first, "pause")  # hold the step while its evidence is counted exactly
        assert wait_until(lambda: phase(first) == "paused", 5) is not None

        # The evidence is the split's requests, exactly: not the pinned ones, not the malformed ones.
        burst = Mix([first.port, second.port], pinned_every=10).run(400)
        assert not burst.problems, burst.problems[:5]
        assert burst.answers[("malformed", 400, "2.1.3")] + burst.answers[("malformed", 400, "2.2.0")] == 20
        assert burst.answers[("pinned", 200, "2.2.0")] == 40
        assert wait_until(lambda: evidence(first) == expected([burst]), 5) is not None, (
            evidence(first),
            expected([burst]),
        )
        pinned = sum(by_choice(p, "2.2.0")["pinned"]["requests"] for p in (first, second))
        assert pinned == 40  # served, counted and shown per version: apart

        # SIGKILL the process that does not decide, mid-step, once it has published what it served.
        [leader] = leader_of([first, second])
        doomed = second if leader is first else first
        assert doomed.process is not None
        doomed.process.kill()
        doomed.process.wait()
        replacement = GatewayProcess(table).start()
        time.sleep(6.0)  # past the dead process's stats time to live: it is gone from the store
        after = Mix([leader.port, replacement.port], pinned_every=10).run(200)
        assert not after.problems, after.problems[:5]
        assert wait_until(lambda: evidence(leader) == expected([burst, after]), 5) is not None, (
            evidence(leader),
            expected([burst, after]),
        )
        time.sleep(2.0)
        assert evidence(leader) == expected([burst, after])  # and it stays so: nothing counted twice

        # A healthy canary with 5% malformed requests on both versions is stepped up, never rolled back.
        act(leader, "resume")
        live = [leader, replacement]
        traffic = Mix([p.port for p in live])
        threads = traffic.background()
        try:
            assert wait_until(lambda: phase(leader) == "promoted", 90) is not None, record_of(leader)
        finally:
            traffic.stop.set()
            for thread in threads:
                thread.join()
        history = [(e["action"], e["by"]) for e in record_of(leader)["history"]]  # type: ignore[attr-defined]
        assert ("promote", "controller") in history and ("rollback", "controller") not in history
        assert not traffic.problems, traffic.problems[:5]
        assert {status for (kind, status, _), _ in traffic.answers.items() if kind == "malformed"} == {400}

        # Operator commands belong to one rollout: promote, rollback and pause never reach the next one.
        # A -> B promoted by hand, then the file says B -> C; that rolled back, then C -> A; that paused,
        # then A -> B again: each next one starts at its first step.
        chain = [
            ("2.1.3", "2.2.0", 10, "promote", "promoted"),
            ("2.2.0", "2.3.0", 20, "rollback", "rolled_back"),
            ("2.3.0", "2.1.3", 30, "pause", "paused"),
        ]
        for baseline, canary, first_step, action, done in chain:
            start_next(
                live, routes(triton, failing, redis.url, next_spec(baseline, canary, first_step)), first_step
            )
            act(leader, action)
            assert wait_until(lambda: phase(leader) == done, 5) is not None  # noqa: B023
        start_next(live, routes(triton, failing, redis.url, next_spec("2.1.3", "2.2.0", 40)), 40)
        time.sleep(2.0)
        fresh = record_of(leader)
        assert fresh["state"] == {**fresh["state"], "phase": "progressing", "weight": 40}  # type: ignore[dict-item]
        assert "last_command" not in fresh

        # With the audit log unwritable, a failing canary is still rolled back, and the state says so.
        for process in live:
            audit = process.directory / "state" / "audit.log"
            audit.unlink(missing_ok=True)
            audit.mkdir()
        spec = f"{{baseline: 2.1.3, canary: 2.9.0, steps: [50, 100], {HOLD}, max_error_rate_increase: 0.0}}"
        retarget(live, routes(triton, failing, redis.url, spec))
        doomed_canary = Mix([p.port for p in live], malformed_every=10**9)
        threads = doomed_canary.background()
        try:
            assert wait_until(lambda: phase(leader) == "rolled_back", 60) is not None, record_of(leader)
        finally:
            doomed_canary.stop.set()
            for thread in threads:
                thread.join()
        final = record_of(leader)
        assert final["state"]["weight"] == 0 and final["history"][-1]["action"] == "rollback"  # type: ignore[index]

        def unrecorded() -> float:
            metrics = admin(leader, "GET", "/metrics")[1]
            lines = [line for line in metrics.splitlines() if line.startswith("gateway_audit_write_failures")]
            return float(lines[0].split()[-1]) if lines else 0.0

        assert wait_until(lambda: unrecorded() >= 2, 5) is not None, unrecorded()  # start and rollback
    finally:
        for process in (first, second, replacement):
            if process is not None:
                process.stop()
        redis.cleanup()


# -- what Triton blames on the request --------------------------------------------------------------------


BLAMED = {  # request body -> the status the client gets; every one is the caller's fault
    "not JSON": (b"hello", 400),
    "cut short": (MALFORMED, 400),
    "no inputs": (b"{}", 400),
    "inputs not a list": (b'{"inputs": 5}', 400),
    "strings as FP32": (BODY.replace("[1, 1]", '["a", "b"]').encode(), 400),
    "shape larger than data": (BODY.replace("[1, 2]", "[1, 5]").encode(), 400),
    "negative shape": (BODY.replace("[1, 2]", "[1, -2]").encode(), 400),
    "unknown input": (BODY.replace("INPUT__0", "NOPE").encode(), 400),  # Triton's own 400
    "wrong datatype": (BODY.replace("FP32", "INT32").encode(), 400),  # Triton's own 400
    "no batch dimension": (BODY.replace("[1, 2]", "[2]").encode(), 400),  # Triton's own 400
}


def test_requests_triton_blames_get_400_and_are_the_callers(triton: TritonFleet) -> None:
    table = f"""
backends:
  triton-a: {{url: "{triton.v3.url}", timeout: 10s}}
models:
  {FD}: {{versions: {{2.1.3: {{backend: triton-a, target: fraud_detector/3}}}}}}
keys: {{required: false}}
"""
    with gateway(table) as process:
        for name, (body, want) in BLAMED.items():
            conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
            conn.request("POST", f"/v2/models/{FD}/infer", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            conn.close()
            assert (response.status, response.getheader("X-Model-Version")) == (want, "2.1.3"), name
            assert "error" in json.loads(payload), name  # Triton's own message, KServe-shaped
        good = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
        good.request("POST", f"/v2/models/{FD}/infer", BODY, {"Content-Type": "application/json"})
        assert good.getresponse().status == 200

        def counted() -> dict[str, int]:
            return by_choice(process, "2.1.3")["split"]

        assert wait_until(lambda: counted()["caller_faults"] == len(BLAMED), 5) is not None, counted()
        assert counted() == {"requests": 1, "failures": 0, "caller_faults": len(BLAMED)}


# -- slow clients are not slow backends -----------------------------------------------------------------


SLOW_READER_ROUTES = """
backends:
  fb: {{url: "http://127.0.0.1:{port}", timeout: 2s}}
models:
  big: {{versions: {{"7": {{backend: fb, target: big/1}}}}}}
keys: {{required: false}}
server: {{write_timeout: 2s}}
"""


def outcomes(process: GatewayProcess) -> dict[str, int]:
    status, body = admin(process, "GET", "/api/versions")
    assert status == 200, body
    return body["models"]["big"]["7"]["total"]["by_outcome"]  # type: ignore[no-any-return]


def big_request(process: GatewayProcess, size: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # small window: the gateway must wait
    sock.settimeout(20)
    sock.connect(("127.0.0.1", process.port))
    body = str(size).encode()
    head = f"POST /v2/models/big/infer HTTP/1.1\r\nHost: gw\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


def test_a_slow_reader_is_not_a_backend_timeout() -> None:
    with fault_backend() as backend, gateway(SLOW_READER_ROUTES.format(port=backend.port)) as process:
        _slow_reader(backend, process)


def _slow_reader(backend: FaultBackend, process: GatewayProcess) -> None:
    size = 32_000_000  # far more than the socket buffers hold: the gateway must wait for the client
    sock = big_request(process, size)
    started = time.monotonic()
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, _, body = data.partition(b"\r\n\r\n")
        received = len(body)
        while received < size:  # about 8 MB/s: 4 s in all, twice the backend's timeout
            burst = 0
            while burst < 131072 and received < size:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                burst += len(chunk)
                received += len(chunk)
            if not burst:
                break
            time.sleep(0.015)
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 200 ") and received == size
    assert time.monotonic() - started > 2.5
    assert wait_until(lambda: outcomes(process)["ok"] == 1, 5) is not None, outcomes(process)
    assert outcomes(process)["timeout"] == 0

    stalled = big_request(process, size)  # reads the head, then nothing past write_timeout: its own doing
    try:
        assert stalled.recv(4096).startswith(b"HTTP/1.1 200 ")
        assert wait_until(lambda: outcomes(process)["abandoned"] == 1, 6) is not None, outcomes(process)
    finally:
        stalled.close()
    assert outcomes(process)["timeout"] == 0 and outcomes(process)["upstream_error"] == 0
    assert len(backend.inference_requests()) == 2
