"""End to end: tritonclient -> gateway -> real Triton servers, one per version."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from backends.example import INPUT_NAME, SCORE_OUTPUT, VERSION_OUTPUT, expected_outputs
from tests.conftest import TritonFleet
from tests.support import GatewayProcess, free_port, gateway

BATCH = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 8.0]], dtype=np.float32)
TRITON_VERSION = {"2.1.3": 3, "2.2.0": 4, "stable": 3, "candidate": 4}


@pytest.fixture(scope="module")
def gw(triton: TritonFleet) -> Iterator[GatewayProcess]:
    with gateway(triton.routes()) as process:
        yield process


def client_for(process: GatewayProcess) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(
        url=f"127.0.0.1:{process.port}", connection_timeout=30, network_timeout=30
    )


def infer(
    client: triton_http.InferenceServerClient,
    version: str = "",
    binary: bool = False,
    headers: dict[str, str] | None = None,
) -> triton_http.InferResult:
    tensor = triton_http.InferInput(INPUT_NAME, list(BATCH.shape), "FP32")
    tensor.set_data_from_numpy(BATCH, binary_data=binary)
    outputs = [
        triton_http.InferRequestedOutput(name, binary_data=binary) for name in (SCORE_OUTPUT, VERSION_OUTPUT)
    ]
    return client.infer("fraud-detector", [tensor], model_version=version, outputs=outputs, headers=headers)


def assert_answered_by(result: triton_http.InferResult, triton_version: int) -> None:
    expected = expected_outputs(triton_version, BATCH)
    np.testing.assert_allclose(result.as_numpy(SCORE_OUTPUT), expected[SCORE_OUTPUT])
    np.testing.assert_array_equal(result.as_numpy(VERSION_OUTPUT), expected[VERSION_OUTPUT])


@pytest.mark.parametrize("version", ["2.1.3", "2.2.0", "stable", "candidate"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_pinned_version_answers_with_its_own_outputs(gw: GatewayProcess, version: str, binary: bool) -> None:
    result = infer(client_for(gw), version, binary=binary)
    assert_answered_by(result, TRITON_VERSION[version])
    assert result.get_response()["model_name"] == "fraud_detector"


def test_header_pin_and_predict_path(gw: GatewayProcess) -> None:
    assert_answered_by(infer(client_for(gw), headers={"X-Model-Version": "candidate"}), 4)
    body = json.dumps(
        {"inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    )
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    for path, version, triton_version in (
        ("/predict/fraud-detector/2.2.0", "2.2.0", 4),
        ("/predict/fraud-detector/stable", "2.1.3", 3),
    ):
        conn.request("POST", path, body, {"Content-Type": "application/json", "X-Request-Id": "req-42"})
        response = conn.getresponse()
        payload = json.loads(response.read())
        assert response.status == 200
        assert response.getheader("X-Model-Version") == version
        assert response.getheader("X-Request-Id") == "req-42"
        outputs = {o["name"]: o["data"] for o in payload["outputs"]}
        assert outputs[VERSION_OUTPUT] == [triton_version]
        assert outputs[SCORE_OUTPUT] == [10 * triton_version + triton_version]
    conn.close()


def _version_counts(
    port: int, requests: int, workers: int = 4, headers: dict[str, str] | None = None
) -> Counter[str]:
    body = json.dumps({"inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [1, 2], "data": [1, 1]}]})

    def run(count: int) -> Counter[str]:
        seen: Counter[str] = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(count):
            conn.request("POST", "/v2/models/fraud-detector/infer", body, headers or {})
            response = conn.getresponse()
            payload = json.loads(response.read())
            assert response.status == 200, payload
            triton_version = {o["name"]: o["data"] for o in payload["outputs"]}[VERSION_OUTPUT][0]
            header_version = response.getheader("X-Model-Version")
            assert TRITON_VERSION[header_version] == triton_version  # the header names who really answered
            seen[header_version] += 1
        conn.close()
        return seen

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(run, [requests // workers] * workers), Counter())


def test_split_90_10_holds_over_2000_requests(gw: GatewayProcess) -> None:
    counts = _version_counts(gw.port, 2000)
    assert sum(counts.values()) == 2000
    assert abs(100 * counts["2.1.3"] / 2000 - 90) <= 2, counts
    assert abs(100 * counts["2.2.0"] / 2000 - 10) <= 2, counts


def test_sticky_callers_keep_their_version(gw: GatewayProcess) -> None:
    client = client_for(gw)
    chosen = {}
    for user in range(40):
        versions = {
            infer(client, headers={"x-user-id": f"user-{user}"}).get_response()["outputs"][1]["data"][0]
            for _ in range(4)
        }
        assert len(versions) == 1, (user, versions)
        chosen[user] = versions.pop()
    assert set(chosen.values()) <= {3, 4}


def test_unknown_model_and_version_are_404(gw: GatewayProcess) -> None:
    client = client_for(gw)
    tensor = triton_http.InferInput(INPUT_NAME, [1, 2], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
    with pytest.raises(InferenceServerException) as unknown_model:
        client.infer("no-such-model", [tensor])
    assert "unknown model" in unknown_model.value.message()
    assert unknown_model.value.status() == "404"
    with pytest.raises(InferenceServerException) as unknown_version:
        client.infer("fraud-detector", [tensor], model_version="9.9.9")
    assert unknown_version.value.status() == "404"
    assert "9.9.9" in unknown_version.value.message()


def test_backend_down_is_503_and_hung_backend_is_504_within_its_timeout(triton: TritonFleet) -> None:
    dead_port = free_port()
    extra = """
  orphan:
    versions:
      "1": {backend: nowhere, target: fraud_detector/3}
"""
    routes = triton.routes(extra_model=extra).replace(
        "backends:\n", f'backends:\n  nowhere: {{url: "http://127.0.0.1:{dead_port}", timeout: 5s}}\n'
    )
    with gateway(routes) as process:
        client = client_for(process)
        tensor = triton_http.InferInput(INPUT_NAME, [1, 2], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
        with pytest.raises(InferenceServerException) as down:
            client.infer("orphan", [tensor])
        assert down.value.status() == "503"
        # Either the health check already took the backend out, or the request found it down itself.
        assert "backend nowhere" in down.value.message()

        started = time.monotonic()
        with pytest.raises(InferenceServerException) as hung:
            client.infer("fraud-detector", [tensor], model_version="2.3.0-slow")
        elapsed = time.monotonic() - started
        assert hung.value.status() == "504"
        assert "did not answer within 1s" in hung.value.message()
        assert 0.9 <= elapsed < 2.4  # the slow version needs 2.5 s; the gateway gives up at its 1 s timeout
        assert_answered_by(infer(client, "2.1.3"), 3)  # and keeps serving


def test_metadata_readiness_and_config(gw: GatewayProcess) -> None:
    client = client_for(gw)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("fraud-detector")
    assert client.is_model_ready("fraud-detector", "2.2.0")
    metadata = client.get_model_metadata("fraud-detector", "2.1.3")
    assert metadata["name"] == "fraud-detector"
    assert metadata["versions"] == ["2.1.3"]
    assert [t["name"] for t in metadata["inputs"]] == [INPUT_NAME]
    assert metadata["gateway"]["metadata"] == {"git": "4f9c2ab", "auc": 0.931}
    assert metadata["gateway"]["aliases"] == ["stable"]
    assert metadata["gateway"]["target"] == "fraud_detector/3"
    whole = client.get_model_metadata("fraud-detector")
    assert whole["gateway"]["version"] == "2.1.3"  # the version with the most traffic speaks for the model
    assert set(whole["versions"]) == {"2.1.3", "2.2.0", "2.3.0-slow"}
    config = client.get_model_config("fraud-detector", "candidate")
    assert config["name"] == "fraud_detector"
    assert config["max_batch_size"] > 0
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("no-such-model")


def test_two_workers_share_the_port(triton: TritonFleet) -> None:
    with gateway(triton.routes(), workers=2) as process:
        assert process.process is not None
        children = subprocess.run(
            ["pgrep", "-P", str(process.process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 2
        counts = _version_counts(process.port, 400, workers=8)
        assert sum(counts.values()) == 400
        assert set(counts) == {"2.1.3", "2.2.0"}
        assert process.stop() == 0


def test_sigterm_lets_requests_in_flight_finish(triton: TritonFleet) -> None:
    with gateway(triton.routes(slow_timeout="10s")) as process:
        results: list[object] = []

        def slow_request() -> None:
            try:
                results.append(infer(client_for(process), "2.3.0-slow"))
            except Exception as exc:  # recorded and asserted below
                results.append(exc)

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.5)  # the request is now waiting on the slow version
        process.signal(signal.SIGTERM)
        thread.join(30)
        assert isinstance(results[0], triton_http.InferResult), results
        assert_answered_by(results[0], 5)
        assert process.process is not None
        assert process.process.wait(15) == 0
