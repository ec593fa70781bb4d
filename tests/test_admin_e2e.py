"""The admin port of a running gateway: metrics across workers, overrides, reload, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TritonFleet
from tests.support import REPO, GatewayProcess, free_port, gateway, wait_for_port
from tests.test_backend_health import post, unpinned
from tests.test_live_reload import wait_until, worker_states


def admin(
    process: GatewayProcess, method: str, path: str, body: Any = None, token: str | None = ""
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token or process.admin_token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(process.admin_url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            status = response.status
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        raw, status, kind = error.read(), error.code, error.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in kind else raw.decode()


def samples(metrics_text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_add_up_exactly_across_two_workers(triton: TritonFleet) -> None:
    with gateway(triton.routes(), workers=2) as process:
        sent: Counter[str] = Counter()
        for i in range(300):  # a new connection each time: the kernel spreads them over both workers
            if i % 3 == 2:
                status, _, _ = post(process, "/v2/models/no-such-model/infer")
                assert status == 404
                sent["404"] += 1
            else:
                version = "2.1.3" if i % 3 == 0 else "2.2.0"
                status, answered, _ = post(process, f"/v2/models/fraud-detector/versions/{version}/infer")
                assert (status, answered) == (200, version)
                sent[version] += 1
        per_worker = []
        for state in worker_states(process):
            stats = state["stats"]["versions"]  # type: ignore[index]
            per_worker.append(sum(sum(v["outcomes"]) for v in stats.values()))  # type: ignore[union-attr]
        expected = {
            (
                "gateway_requests_total",
                (("code", "2xx"), ("model", "fraud-detector"), ("version", "2.1.3")),
            ): sent["2.1.3"],
            (
                "gateway_requests_total",
                (("code", "2xx"), ("model", "fraud-detector"), ("version", "2.2.0")),
            ): sent["2.2.0"],
            ("gateway_unrouted_responses_total", (("code", "4xx"),)): sent["404"],
            (
                "gateway_request_duration_seconds_count",
                (("model", "fraud-detector"), ("version", "2.1.3")),
            ): sent["2.1.3"],
        }

        def exact() -> bool:
            status, text = admin(process, "GET", "/metrics")
            found = samples(text)
            return status == 200 and all(found.get(key) == value for key, value in expected.items())

        assert wait_until(exact, 5) is not None, samples(admin(process, "GET", "/metrics")[1])
        per_worker = [
            sum(sum(v["outcomes"]) for v in s["stats"]["versions"].values())  # type: ignore[index,union-attr]
            for s in worker_states(process)
        ]
        assert len(per_worker) == 2 and all(count > 0 for count in per_worker), per_worker  # both served
        assert sum(per_worker) == sent["2.1.3"] + sent["2.2.0"]
        status, versions = admin(process, "GET", "/api/versions")
        assert versions["models"]["fraud-detector"]["2.1.3"]["total"]["requests"] == sent["2.1.3"]


def test_admin_refuses_without_the_token(triton: TritonFleet) -> None:
    with gateway(triton.routes()) as process:
        for method, path in [
            ("GET", "/api/routes"),
            ("GET", "/api/versions"),
            ("GET", "/metrics"),
            ("POST", "/api/reload"),
            ("GET", "/api/audit"),
            ("GET", "/openapi.json"),
            ("PUT", "/api/models/fraud-detector/weights"),
        ]:
            assert admin(process, method, path, token=None)[0] == 401, path
            assert admin(process, method, path, token="wrong-token-value")[0] == 401, path
        assert admin(process, "GET", "/api/routes")[0] == 200


def test_override_steers_traffic_until_the_file_changes_the_model(triton: TritonFleet) -> None:
    with gateway(triton.routes(split="{2.1.3: 100, 2.2.0: 0}")) as process:
        assert unpinned(process, 5) == Counter({"200 2.1.3": 5})
        status, body = admin(
            process,
            "PUT",
            "/api/models/fraud-detector/weights",
            {"weights": {"stable": 0, "candidate": 100}, "reason": "drill"},
        )
        assert status == 200, body
        assert wait_until(lambda: unpinned(process, 3) == Counter({"200 2.2.0": 3}), 3) is not None
        routes = admin(process, "GET", "/api/routes")[1]["models"]["fraud-detector"]
        assert routes["override"]["active"] and routes["override"]["set_by"] == "tester"
        assert routes["split_live"] == {"2.1.3": 0, "2.2.0": 100}
        assert routes["split_in_file"] == {"2.1.3": 100, "2.2.0": 0}

        bad = admin(
            process, "PUT", "/api/models/fraud-detector/weights", {"weights": {"2.1.3": 60, "2.2.0": 60}}
        )
        assert bad[0] == 400 and "120" in bad[1]["error"]

        # The platform team edits this model: the file wins again, and the override shows as lapsed.
        edited = triton.routes(split="{2.1.3: 100, 2.2.0: 0}").replace("header:x-user-id", "header:x-caller")
        process.routes_path.write_text(edited)
        assert wait_until(lambda: unpinned(process, 3) == Counter({"200 2.1.3": 3}), 3) is not None
        routes = admin(process, "GET", "/api/routes")[1]["models"]["fraud-detector"]
        assert routes["override"]["active"] is False
        assert admin(process, "DELETE", "/api/models/fraud-detector/weights")[0] == 200
        assert admin(process, "DELETE", "/api/models/fraud-detector/weights")[0] == 404
        audit = admin(process, "GET", "/api/audit")[1]["entries"]
        assert [(e["who"], e["action"]) for e in audit] == [
            ("tester", "override.set"),
            ("tester", "override.clear"),
        ]


def test_cli_status_and_reload(triton: TritonFleet) -> None:
    with gateway(triton.routes()) as process:
        post(process, "/v2/models/fraud-detector/versions/2.1.3/infer")
        env = {**os.environ, "GATEWAY_ADMIN_TOKEN": process.admin_token}
        cli = [sys.executable, "-m", "gateway"]
        admin_arg = ["--admin", process.admin_url]
        status = subprocess.run(
            [*cli, "status", *admin_arg], capture_output=True, text=True, env=env, timeout=30
        )
        assert status.returncode == 0, status.stderr
        for expected in ("fraud-detector", "2.1.3", "2.2.0", "90", "10"):
            assert expected in status.stdout
        reload = subprocess.run(
            [*cli, "reload", *admin_arg], capture_output=True, text=True, env=env, timeout=30
        )
        assert reload.returncode == 0, reload.stdout + reload.stderr
        process.routes_path.write_text(
            process.routes_path.read_text().replace("split: {2.1.3: 90", "split: {2.1.3: 95")
        )
        time.sleep(0.3)
        refused = subprocess.run(
            [*cli, "reload", *admin_arg], capture_output=True, text=True, env=env, timeout=30
        )
        assert refused.returncode == 1
        assert "adds up to 105" in refused.stdout + refused.stderr
        assert unpinned(process, 2).keys() <= {"200 2.1.3", "200 2.2.0"}  # the last good table still serves
        no_token = subprocess.run(
            [*cli, "status", *admin_arg],
            capture_output=True,
            text=True,
            env={k: v for k, v in env.items() if k != "GATEWAY_ADMIN_TOKEN"},
            timeout=30,
        )
        assert no_token.returncode != 0


def test_admin_port_off_loopback_needs_a_configured_token(tmp_path: Any) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text((REPO / "routes.yaml").read_text())
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(routes),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--admin-host",
        "0.0.0.0",
        "--admin-port",
        str(free_port()),
        "--state-dir",
        str(tmp_path / "state"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, cwd=REPO)
    assert result.returncode == 1
    assert "GATEWAY_ADMIN_TOKEN" in result.stderr


def test_loopback_admin_without_token_writes_one_for_the_cli(tmp_path: Any) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text((REPO / "routes.yaml").read_text())
    admin_port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(routes),
        "--port",
        str(free_port()),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--admin-port",
        str(admin_port),
        "--state-dir",
        str(tmp_path / "state"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(admin_port, process=process)
        token_file = tmp_path / "state" / "admin-token"
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin_port}/api/routes", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["file_valid"] is True
    finally:
        process.terminate()
        process.wait(15)
