"""The three things the benchmark measures, how to start each one, and how to check it answers right.

A check happens before any measurement because a fast wrong answer (a 404 page, an error JSON, a
proxy that always picks one version) would otherwise look like a great result.
"""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nginx
from procs import Child, CpuUsage, Supervisor, descendants, free_port, wait_for_port
from wrk import INFER_BODY, WrkResult

PUBLIC_PATH = f"/v2/models/{nginx.PUBLIC_MODEL}/infer"
DIRECT_PATH = f"/v2/models/{nginx.MODEL}/versions/{nginx.VERSIONS[0]}/infer"
SPLIT_SAMPLE = 400  # requests sent to see the 90/10 split; P(no 10% answer at all) = 0.9**400 ~ 5e-19
# Over 400 requests, the observed share of a 10% version has a standard deviation of 1.5 points; 6 points
# is four of them, so only a split that ignores its weights fails, not an unlucky random one.
SPLIT_TOLERANCE_POINTS = 6.0

ROUTES_YAML = """\
backends:
  bench-backend: {{url: "http://127.0.0.1:{backend_port}", timeout: 10s}}
models:
  fraud-detector:
    versions:
      "2.1.3": {{backend: bench-backend, target: fraud_detector/3}}
      "2.2.0": {{backend: bench-backend, target: fraud_detector/4}}
    split: {{"2.1.3": 90, "2.2.0": 10}}
keys: {{required: false}}
"""


@dataclass(frozen=True)
class Sample:
    round: int
    mode: str  # "throughput" or "latency"
    wrk: WrkResult
    cpu: CpuUsage
    discarded: int = 0  # earlier measurements of this sample dropped because other programs disturbed them

    def to_json(self) -> dict[str, object]:
        cpu = {k: round(getattr(self.cpu, k), 3) for k in ("target", "backend", "loadgen", "others")}
        return {
            "round": self.round,
            "mode": self.mode,
            "discarded_disturbed": self.discarded,
            **self.wrk.to_json(),
            "cpu_cores": {
                **cpu,
                "per_core_busy": {str(c): round(b, 3) for c, b in self.cpu.core_busy.items()},
            },
        }


@dataclass
class Target:
    key: str
    label: str
    port: int = 0
    path: str = PUBLIC_PATH
    child: Child | None = None
    expect_split: bool = True
    unavailable: str | None = None  # why it could not be measured
    verification: dict[str, object] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def pids(self) -> list[int]:
        if self.child is None:
            return []
        return [self.child.pid, *descendants(self.child.pid)]


def start_backend(supervisor: Supervisor, name: str, workers: int, core: int | None) -> nginx.NginxServer:
    port = free_port()
    return nginx.start_nginx(supervisor, name, nginx.backend_conf(port, workers), port, core)


def start_nginx_proxy(supervisor: Supervisor, backend_port: int, core: int | None) -> nginx.NginxServer:
    port = free_port()
    return nginx.start_nginx(supervisor, "nginx-proxy", nginx.proxy_conf(port, backend_port), port, core)


def start_gateway(
    supervisor: Supervisor,
    target: Target,
    gateway: Path,
    backend_port: int,
    core: int | None,
    extra_args: tuple[str, ...] = (),
) -> None:
    """Starts `gateway serve`; on failure, marks the target unavailable with the reason instead of
    aborting, so the nginx numbers of the run are still printed."""
    routes = supervisor.workdir / f"routes-{target.key}.yaml"
    routes.write_text(ROUTES_YAML.format(backend_port=backend_port))
    target.port = free_port()
    argv = [str(gateway), "serve", "--config", str(routes), "--host", "127.0.0.1"]
    argv += ["--port", str(target.port), "--workers", "1", "--grpc-port", "0"]
    # Its own admin port and state directory, as in production, without colliding with a running gateway.
    argv += ["--admin-port", str(free_port()), "--state-dir", str(routes.parent / f"state-{target.key}")]
    argv += extra_args
    if not gateway.exists():
        target.unavailable = f"{gateway} does not exist (is the virtualenv installed?)"
        return
    child = supervisor.start("gateway", argv, core)
    try:
        wait_for_port(target.port, child, timeout=20)
    except RuntimeError as exc:
        supervisor.stop(child)
        target.unavailable = f"`{' '.join(argv)}` failed: {exc}"
        return
    target.child = child


def _post(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("POST", path, body=INFER_BODY, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def _answer_version(status: int, body: bytes) -> str:
    """The Triton version that produced a correct v2 answer; raises ValueError describing what is wrong."""
    snippet = body[:300].decode(errors="replace")
    if status != 200:
        raise ValueError(f"status {status}, body {snippet!r}")
    try:
        doc = json.loads(body)
    except ValueError:
        raise ValueError(f"body is not JSON: {snippet!r}") from None
    ok = (
        isinstance(doc, dict)
        and doc.get("model_name") == nginx.MODEL
        and doc.get("model_version") in nginx.VERSIONS
        and isinstance(doc.get("outputs"), list)
        and doc["outputs"]
    )
    if not ok:
        raise ValueError(f"body is not the backend's v2 inference response: {snippet!r}")
    return str(doc["model_version"])


def verify(target: Target, ready_timeout: float = 10.0) -> None:
    """Checks one answer, then (for proxies) that the weighted split sends traffic to both versions.

    A 503 is retried for a while: a gateway may listen before it has seen its backends healthy.
    Raises ValueError when the target answers wrongly.
    """
    deadline = time.monotonic() + ready_timeout
    while True:
        # A new connection per attempt, since a 503 may come with the connection closed.
        conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
        status, body = _post(conn, target.path)
        if status != 503 or time.monotonic() > deadline:
            break
        conn.close()
        time.sleep(0.2)
    try:
        version = _answer_version(status, body)
        target.verification = {"first_answer_version": version, "body": body.decode(errors="replace")}
        if not target.expect_split:
            return
        seen = Counter(_answer_version(*_post(conn, target.path)) for _ in range(SPLIT_SAMPLE))
    finally:
        conn.close()
    shares = {v: round(100 * seen[v] / SPLIT_SAMPLE, 1) for v in nginx.VERSIONS}
    target.verification["split_percent_observed"] = shares
    if len(seen) < len(nginx.VERSIONS):
        raise ValueError(
            f"no split: {SPLIT_SAMPLE} requests all went to version(s) {sorted(seen)}, "
            f"expected about {nginx.SPLIT}"
        )
    if any(abs(shares[v] - pct) > SPLIT_TOLERANCE_POINTS for v, pct in nginx.SPLIT.items()):
        raise ValueError(f"split is {shares} percent, expected {nginx.SPLIT}")
