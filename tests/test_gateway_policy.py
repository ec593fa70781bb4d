"""Gateway policies observed from the backend's side: shadow copies, and keys that are required."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.fault_backend import FaultBackend, fault_backend
from tests.support import RawClient, gateway, request


@pytest.fixture(scope="module")
def fb() -> Iterator[FaultBackend]:
    with fault_backend() as backend:
        yield backend


def routes(port: int, extra: str = "", keys: str = "keys: {required: false}") -> str:
    return f"""
backends:
  fb: {{url: "http://127.0.0.1:{port}", timeout: 5s}}
models:
  scorer:
    versions:
      "1.0": {{backend: fb, target: echo/1}}
      "2.0": {{backend: fb, target: echo/2}}
    split: {{"1.0": 100, "2.0": 0}}
{extra}
{keys}
"""


def wait_for(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.02)
    return False


def test_mirror_sends_exact_share_of_shadow_copies_and_never_returns_them(fb: FaultBackend) -> None:
    with gateway(routes(fb.port, "    mirror: {to: '2.0', percent: 25}")) as gw:
        fb.received.clear()
        with RawClient(gw.port) as client:
            for i in range(40):
                client.send(request("POST", "/predict/scorer", b"body-%d" % i, {"X-Request-Id": f"r{i}"}))
                response = client.read_response()
                assert response.status == 200
                assert response.header("x-model-version") == "1.0"  # the caller only sees the real answer
        assert wait_for(lambda: len(fb.inference_requests()) == 50)
        shadows = [
            (path, headers, body)
            for path, headers, body in fb.inference_requests()
            if "x-gateway-shadow" in headers
        ]
        assert len(shadows) == 10  # 25% of 40, exactly
        assert {path for path, _, _ in shadows} == {"/v2/models/echo/versions/2/infer"}
        originals = {
            headers["x-request-id"]: body
            for _, headers, body in fb.inference_requests()
            if "x-gateway-shadow" not in headers
        }
        for _, headers, body in shadows:
            assert originals[headers["x-request-id"]] == body  # a faithful copy of a real request


def test_mirror_skips_requests_already_going_to_the_mirror_version(fb: FaultBackend) -> None:
    with gateway(routes(fb.port, "    mirror: {to: '2.0', percent: 100}")) as gw:
        fb.received.clear()
        with RawClient(gw.port) as client:
            for _ in range(5):
                client.send(request("POST", "/predict/scorer/2.0", b"x"))
                assert client.read_response().header("x-model-version") == "2.0"
        time.sleep(0.3)
        assert len(fb.inference_requests()) == 5
        assert not any("x-gateway-shadow" in headers for _, headers, _ in fb.inference_requests())


def test_required_keys_refuse_missing_and_unknown_keys(fb: FaultBackend) -> None:
    with gateway(routes(fb.port, keys="")) as gw:  # keys.required defaults to true
        fb.received.clear()
        with RawClient(gw.port) as client:
            client.send(request("POST", "/predict/no-such-model", b"x"))
            response = client.read_response()
            assert response.status == 401  # before the model lookup: no probing for model names
            assert response.header("www-authenticate") == "Bearer"
            assert b"API key is required" in response.body
            client.send(
                request("POST", "/predict/scorer", b"x", {"Authorization": "Bearer gwk_not-a-real-key"})
            )
            response = client.read_response()
            assert response.status == 401
            assert b"gwk_not-a-real-key" not in response.body
            client.send(request("GET", "/v2/health/live"))
            assert client.read_response().status == 200
        assert fb.inference_requests() == []
        assert "gwk_not-a-real-key" not in gw.log()
