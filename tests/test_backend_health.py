"""Active health checks: a version whose Triton dies leaves the split, and comes back when it returns."""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter

from backends.local import free_port, start_version
from tests.conftest import TritonFleet
from tests.support import GatewayProcess, gateway
from tests.test_live_reload import BODY, wait_until


def post(process: GatewayProcess, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    conn.request("POST", path, BODY)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, response.getheader("X-Model-Version") or "", body


def unpinned(process: GatewayProcess, count: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(count):
        status, version, _ = post(process, "/v2/models/fraud-detector/infer")
        seen[f"{status} {version}"] += 1
    return seen


def test_dead_version_leaves_the_split_and_returns_when_ready(triton: TritonFleet) -> None:
    port = free_port()
    own = start_version("fraud_detector", 6, port)
    routes = f"""
backends:
  triton-a: {{url: "{triton.v3.url}", timeout: 10s}}
  triton-own: {{url: "http://127.0.0.1:{port}", timeout: 10s}}
models:
  fraud-detector:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3}}
      2.6.0: {{backend: triton-own, target: fraud_detector/6}}
    split: {{2.1.3: 50, 2.6.0: 50}}
keys: {{required: false}}
"""
    try:
        with gateway(routes) as process:
            first = unpinned(process, 20)
            assert set(first) == {"200 2.1.3", "200 2.6.0"} and abs(first["200 2.1.3"] - 10) <= 2, first
            own.kill()

            def only_the_live_version_is_used() -> bool:
                return unpinned(process, 4) == Counter({"200 2.1.3": 4})

            assert wait_until(only_the_live_version_is_used, 10) is not None
            assert unpinned(process, 30) == Counter({"200 2.1.3": 30})  # no failures once it is out
            status, version, body = post(process, "/v2/models/fraud-detector/versions/2.6.0/infer")
            assert (status, version) == (503, "")
            assert "2.6.0 of fraud-detector is not ready" in json.loads(body)["error"]

            own = start_version("fraud_detector", 6, port)  # the same version comes back
            assert wait_until(lambda: unpinned(process, 10)["200 2.6.0"] >= 4, 15) is not None
            time.sleep(0.1)
            assert post(process, "/v2/models/fraud-detector/versions/2.6.0/infer")[0] == 200
    finally:
        own.stop()
