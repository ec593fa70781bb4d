"""Shadow comparison end to end: a mirror between versions that differ on purpose, real Triton.

fraud-detector's split sends requests to 2.1.3 (Triton version 3) and 2.2.0 (version 4); every one is
mirrored to 2.1.3-copy, version 3 again. So 2.1.3 -> 2.1.3-copy answers agree, 2.2.0 -> 2.1.3-copy
answers differ (score = sum * v + v, and the version output). The test asks Triton itself for the
shadow's answer to each request and computes the figures from the raw answers; the admin API must say
the same. Half the requests ask for binary outputs (the binary tensor extension), half for JSON.
"""

from __future__ import annotations

import http.client
import json
import math
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.shadow.compare import DIFF_EDGES
from tests.conftest import TritonFleet
from tests.support import gateway
from tests.test_admin_e2e import admin

FD = "fraud-detector"
COPY = "2.1.3-copy"
REQUESTS = 40
DTYPES = {"FP32": "<f4", "INT32": "<i4"}


def routes(triton: TritonFleet) -> str:
    return f"""
backends:
  triton-a: {{url: "{triton.v3.url}", timeout: 10s}}
  triton-b: {{url: "{triton.v4.url}", timeout: 10s}}
models:
  {FD}:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3}}
      2.2.0: {{backend: triton-b, target: fraud_detector/4}}
      {COPY}: {{backend: triton-a, target: fraud_detector/3}}
    split: {{2.1.3: 50, 2.2.0: 50, {COPY}: 0}}
    mirror: {{to: {COPY}, percent: 100}}
    limit: {{rate: 1/h, burst: {REQUESTS}}}
keys: {{required: false}}
"""


def body(i: int) -> bytes:
    request: dict[str, Any] = {
        "inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 3], "data": [i * 0.37, -i, 2.5]}]
    }
    if i % 2:  # binary outputs for odd requests
        request["outputs"] = [
            {"name": name, "parameters": {"binary_data": True}} for name in ("OUTPUT__0", "OUTPUT__1")
        ]
    return json.dumps(request).encode()


def post(port: int, path: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def tensors(headers: dict[str, str], payload: bytes) -> dict[str, npt.NDArray[Any]]:
    """The test's own reading of an answer, JSON or binary."""
    length = headers.get("inference-header-content-length")
    head = json.loads(payload if length is None else payload[: int(length)])
    offset, found = int(length or 0), {}
    for output in head["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            found[output["name"]] = np.array(output["data"], dtype=DTYPES[output["datatype"]])
        else:
            found[output["name"]] = np.frombuffer(
                payload[offset : offset + size], dtype=DTYPES[output["datatype"]]
            )
            offset += size
    return found


def nearest_rank_edge(values: list[float], q: float) -> float:
    value = sorted(values)[max(1, math.ceil(q * len(values))) - 1]
    return min(edge for edge in DIFF_EDGES if edge >= value)


def test_shadow_figures_match_the_raw_answers(triton: TritonFleet) -> None:
    port_a = int(triton.v3.url.rsplit(":", 1)[1])
    raw: dict[str, list[tuple[bool, float]]] = {"2.1.3": [], "2.2.0": []}
    with gateway(routes(triton)) as process:
        for i in range(REQUESTS):
            status, headers, payload = post(process.port, f"/v2/models/{FD}/infer", body(i))
            assert status == 200, payload
            version = headers["x-model-version"]
            # What the shadow answered: the same request to the copy's Triton, version 3.
            s_status, s_headers, s_payload = post(
                port_a, "/v2/models/fraud_detector/versions/3/infer", body(i)
            )
            assert s_status == 200
            primary, shadow = tensors(headers, payload), tensors(s_headers, s_payload)
            assert primary.keys() == shadow.keys() == {"OUTPUT__0", "OUTPUT__1"}
            equal = all(np.isclose(primary[k], shadow[k], rtol=1e-5, atol=1e-8).all() for k in primary)
            largest = max(
                float(np.abs(primary[k].astype(float) - shadow[k].astype(float)).max()) for k in primary
            )
            raw[version].append((equal, largest))
        # The mirror never counted against the model's limit: all REQUESTS passed, and the next one is
        # the first the limit refuses (were the copies charged, half would have been refused).
        assert post(process.port, f"/v2/models/{FD}/infer", body(0))[0] == 429

        def figures() -> dict[str, Any]:
            pairs = admin(process, "GET", "/api/shadow")[1]["pairs"]
            return {p["primary"]: p for p in pairs}

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sum(p["compared"] for p in figures().values()) < REQUESTS:
            time.sleep(0.2)
        shown = figures()
        versions = admin(process, "GET", "/api/versions")[1]["models"][FD]
        metrics = admin(process, "GET", "/metrics")[1]

    assert {len(raw["2.1.3"]), len(raw["2.2.0"])} == {REQUESTS // 2}
    assert all(eq for eq, _ in raw["2.1.3"]) and not any(eq for eq, _ in raw["2.2.0"])  # differ on purpose
    for version, answers in raw.items():
        pair = shown[version]
        assert (pair["model"], pair["shadow"]) == (FD, COPY)
        assert pair["compared"] == len(answers)
        assert pair["equal_share"] == sum(eq for eq, _ in answers) / len(answers)
        diffs = [d for _, d in answers]
        for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)):
            assert pair["max_abs_diff"][q] == nearest_rank_edge(diffs, p), (version, q, diffs)
        assert pair["argmax_compared"] == 0  # one score per row: no classification output to compare
        assert pair["same_argmax_share"] is None
        assert sum(pair["not_compared"].values()) == 0
        assert pair["latency_diff_ms"]["mean"] is not None
    # Shadow copies are counted apart: never split (rollout evidence), never pinned.
    copy = versions[COPY]["total"]["by_choice"]
    assert copy["shadow"]["requests"] == REQUESTS and copy["split"]["requests"] == 0
    labels = f'model="{FD}",primary="2.2.0",shadow="{COPY}"'
    assert f"gateway_shadow_compared_total{{{labels}}} {REQUESTS // 2}.0" in metrics
    assert f"gateway_shadow_equal_total{{{labels}}} 0.0" in metrics
