"""The admin API over a real ControlPlane, a tmp state dir with hand-made worker snapshots and a routes file.

The workers are played by the test: the reload trigger appends a reload event to each live worker's
snapshot, which is how real workers answer. The CLI commands run in a thread against the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import app as admin
from gateway.admin.control_plane import ControlPlane
from gateway.admin.openapi import OPENAPI
from gateway.cli import admin as admin_cli
from gateway.state import files as snapshots
from gateway.state.records import WorkerSnapshot
from gateway.store.memory import MemoryStore

ALICE, BOB = "s3cret-alice-token", "s3cret-bob-token"
TOKENS = {ALICE: "alice", BOB: "bob"}
FD = "fraud-detector"

ROUTES = """
backends:
  triton-a: {url: http://127.0.0.1:8010, timeout: 10s}
  triton-b: {url: http://127.0.0.1:8020, timeout: 10s}
models:
  fraud-detector:
    versions:
      2.1.3:
        backend: triton-a
        target: fraud_detector/3
        metadata: {git: 4f9c2ab, auc: 0.931}
      2.2.0: {backend: triton-b, target: fraud_detector/4}
    aliases: {stable: 2.1.3, candidate: 2.2.0}
    split: {2.1.3: 90, 2.2.0: 10}
    sticky: header:x-user-id
  churn:
    versions:
      2026-11-05: {backend: triton-a, target: churn/1}
    split: {2026-11-05: 100}
keys:
  required: false
store:
  url: "memory://"
  on_error: fail_closed
"""


def snapshot(pid: int) -> dict[str, Any]:
    counters = {
        "statuses": [0, 8, 0, 1, 1],
        "outcomes": [8, 1, 1, 0, 0],
        "buckets": [0, 4, 6] + [0] * 46,
        "latency_sum": 0.02,
        "in_flight": 1,
        "consecutive_failures": 0,
    }
    return {
        "pid": pid,
        "worker": pid - 100,
        "started": time.time() - 60,
        "time": time.time(),
        "revision": "",
        "source": "routes.yaml",
        "reloads": [
            {
                "time": time.time() - 60,
                "ok": True,
                "revision": "",
                "trigger": "start",
                "errors": [],
                "duration_ms": 1.0,
            }
        ],
        "reload_counts": {"ok": 1, "failed": 0},
        "health": {
            "backends": {"triton-a": {"ready": True, "detail": "", "checked_at": time.time()}},
            "versions": {f"{FD}/2.1.3": {"ready": True, "detail": "", "checked_at": time.time()}},
        },
        "splits": {FD: {"2.1.3": 90, "2.2.0": 10}},
        "stats": {"versions": {f"{FD}/2.1.3": counters}, "unrouted": [0, 0, 0, 3, 0]},
        "mirrors": {"in_flight": 0, "skipped": 0},
        "connections": 2,
        "admission": {
            "store_url": "memory://",
            "store_up": True,
            "on_error": "fail_closed",
            "live_processes": 2,
            "store_errors": 0,
            "fail_open": 0,
            "fail_closed": 0,
            "outcomes": [["", FD, "admitted", 10]],
        },
        "rollouts": {"leader": pid == 101, "records": {}},
        "internal_errors": 0,
        "audit_failures": 0,
    }


@dataclass
class Fleet:
    """Two workers' snapshot files; `refuse` makes a worker refuse the next reload, like a bad file would."""

    state: Path
    config: Path
    refuse: set[int] = field(default_factory=set)
    silent: set[int] = field(default_factory=set)
    triggered: int = 0

    def write(self, pid: int, **changes: Any) -> None:
        snapshots.write_snapshot(self.state, WorkerSnapshot.from_json({**snapshot(pid), **changes}))

    async def trigger(self) -> None:
        self.triggered += 1
        from gateway.routing import config

        revision = config.load_table(self.config).revision
        for path in sorted((self.state / snapshots.WORKERS).glob("*.json")):
            data = snapshots.read_json(path)
            if data["pid"] in self.silent or time.time() - data["time"] > snapshots.STALE_AFTER:
                continue
            ok = data["pid"] not in self.refuse
            errors = [] if ok else [f"{self.config}:8:12: split for fraud-detector adds up to 105, not 100"]
            event = {"time": time.time(), "ok": ok, "revision": revision if ok else None}
            data["reloads"].append({**event, "trigger": "admin", "errors": errors, "duration_ms": 1.5})
            data["reload_counts"]["ok" if ok else "failed"] += 1
            data["revision"] = revision if ok else data["revision"]
            data["time"] = time.time()
            snapshots.write_snapshot(self.state, WorkerSnapshot.from_json(data))


@dataclass
class Admin:
    client: TestClient[web.Request, web.Application]
    plane: ControlPlane
    fleet: Fleet
    app: web.Application

    async def call(self, method: str, path: str, token: str | None = ALICE, **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.client.request(method, path, headers=headers, **kwargs) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    def audit(self) -> list[dict[str, Any]]:
        return self.plane.audit(100)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Admin]:
    config = tmp_path / "routes.yaml"
    config.write_text(ROUTES)
    fleet = Fleet(tmp_path / "state", config)
    plane = ControlPlane(str(config), fleet.state, fleet.trigger)
    fleet.write(101)
    fleet.write(102)
    app = admin.build_admin_app(plane, dict(TOKENS), MemoryStore())
    async with TestClient(TestServer(app)) as client:
        yield Admin(client, plane, fleet, app)


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    return {(route.method, route.resource.canonical) for route in app.router.routes() if route.resource}


def concrete(path: str) -> str:
    concrete = path.replace("{model}", FD).replace("{name}", "team-a").replace("{action}", "pause")
    return concrete.replace("{version}", "2.1.3")


# -- authentication ------------------------------------------------------------------------------


async def test_every_route_refuses_without_a_valid_token(
    api: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    public = {("GET", "/"), ("GET", "/index.html"), ("GET", "/static/{name}")}  # the dashboard's files
    assert public <= served_routes(api.app)
    routes = (served_routes(api.app) - public) | {("GET", "/no/such/route")}
    assert len(routes) == 27  # 26 served, and one that is not
    wrong = ["", "Bearer", "Bearer ", "Bearer nope", f"Basic {ALICE}", f"Bearer {ALICE}x", ALICE]
    for method, path in sorted(routes):
        async with api.client.request(method, concrete(path)) as response:
            assert response.status == 401, (method, path)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert "token" in (await response.json())["error"]
        for header in wrong:
            async with api.client.request(
                method, concrete(path), headers={"Authorization": header}
            ) as response:
                assert response.status == 401, (method, path, header)
                assert response.content_type == "application/json"
    assert api.fleet.triggered == 0
    assert api.audit() == []
    assert ALICE not in caplog.text


async def test_token_name_is_who_and_secret_never_logged(
    api: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert (await api.call("POST", "/api/reload", token=BOB))[0] == 200
    assert (await api.call("POST", "/api/reload", token=ALICE))[0] == 200
    assert [e["who"] for e in api.audit()] == ["bob", "alice"]
    assert BOB not in caplog.text and ALICE not in caplog.text


def test_empty_token_is_refused_at_build_time(tmp_path: Path) -> None:
    plane = ControlPlane(str(tmp_path / "routes.yaml"), tmp_path / "state", _never)
    with pytest.raises(ValueError, match="empty"):
        admin.build_admin_app(plane, {"": "anyone"}, MemoryStore())


# -- reading -------------------------------------------------------------------------------------


async def test_reads(api: Admin) -> None:
    status, routes = await api.call("GET", "/api/routes")
    assert status == 200 and routes["file_valid"]
    assert routes["models"][FD]["split_in_file"] == {"2.1.3": 90, "2.2.0": 10}
    status, versions = await api.call("GET", "/api/versions")
    assert status == 200
    assert versions["models"][FD]["2.1.3"]["total"]["requests"] == 20  # both workers
    status, backends = await api.call("GET", "/api/backends")
    assert status == 200 and set(backends) == {"101", "102"}
    status, reloads = await api.call("GET", "/api/reloads")
    assert status == 200 and len(reloads["events"]) == 2
    status, audit = await api.call("GET", "/api/audit?limit=5")
    assert status == 200 and audit == {"entries": []}
    for bad in ("0", "abc", "100001"):
        status, body = await api.call("GET", f"/api/audit?limit={bad}")
        assert status == 400 and "limit" in body["error"]


async def test_status_joins_routes_and_versions(api: Admin) -> None:
    status, body = await api.call("GET", "/api/status")
    assert status == 200
    assert body["file_valid"] and body["consistent"] and not body["in_sync"]  # workers report revision ""
    assert body["workers"] == {"alive": 2, "gone": 0}
    row = body["models"][FD]["versions"]["2.1.3"]
    assert row["weight_in_file"] == 90 and row["weight_live"] == 90 and row["ready"] is True
    assert body["models"]["churn"]["versions"]["2026-11-05"]["weight_in_file"] == 100
    assert body["last_reload_error"] is None


async def test_metrics_endpoint(api: Admin) -> None:
    async with api.client.get("/metrics", headers={"Authorization": f"Bearer {ALICE}"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    assert 'gateway_requests_total{code="2xx",model="fraud-detector",version="2.1.3"} 16.0' in text
    assert ALICE not in text and BOB not in text


# -- acting --------------------------------------------------------------------------------------


async def test_reload_ok_and_audited(api: Admin) -> None:
    status, body = await api.call("POST", "/api/reload")
    assert status == 200 and body["ok"] and set(body["workers"]) == {"101", "102"}
    assert body["missing"] == []
    assert api.audit()[-1]["who"] == "alice" and api.audit()[-1]["action"] == "reload"
    _, status_body = await api.call("GET", "/api/status")
    assert status_body["in_sync"]


async def test_reload_refused_by_a_worker_is_422(api: Admin) -> None:
    api.fleet.refuse.add(102)
    status, body = await api.call("POST", "/api/reload", token=BOB)
    assert status == 422 and not body["ok"]
    assert "worker 102 refused" in body["error"] and "adds up to 105" in body["error"]
    assert api.audit()[-1] == {**api.audit()[-1], "who": "bob", "action": "reload", "ok": False}
    _, status_body = await api.call("GET", "/api/status")
    assert status_body["reload_failing"] == ["102"]
    assert status_body["last_reload_error"]["pid"] == 102


async def test_reload_ignores_gone_workers_and_reports_silent_ones(
    api: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.fleet.write(103, time=time.time() - 60)  # died a minute ago: nobody waits for it
    status, body = await api.call("POST", "/api/reload")
    assert status == 200 and set(body["workers"]) == {"101", "102"}

    reload = api.plane.reload
    monkeypatch.setattr(api.plane, "reload", lambda who: reload(who, wait=0.3))
    api.fleet.silent.add(102)
    status, body = await api.call("POST", "/api/reload")
    assert status == 504 and body["missing"] == ["102"] and "did not report" in body["error"]
    api.fleet.silent.add(101)
    status, body = await api.call("POST", "/api/reload")
    assert status == 504 and body["missing"] == ["101", "102"]
    for pid in (101, 102):
        api.fleet.write(pid, time=time.time() - 60)
    status, body = await api.call("POST", "/api/reload")
    assert status == 504 and "no live worker reported" in body["error"]


async def test_override_set_and_clear(api: Admin) -> None:
    weights = {"weights": {"stable": 50, "2.2.0": 50}, "reason": "load test"}
    status, body = await api.call("PUT", f"/api/models/{FD}/weights", token=BOB, json=weights)
    assert status == 200, body
    assert body["weights"] == {"2.1.3": 50, "2.2.0": 50} and body["set_by"] == "bob"
    _, routes = await api.call("GET", "/api/routes")
    assert routes["models"][FD]["override"]["active"] is True
    assert api.audit()[-1]["action"] == "override.set" and api.audit()[-1]["who"] == "bob"

    status, body = await api.call("DELETE", f"/api/models/{FD}/weights")
    assert status == 200 and body == {"model": FD, "cleared": True}
    assert api.audit()[-1]["action"] == "override.clear" and api.audit()[-1]["who"] == "alice"
    status, body = await api.call("DELETE", f"/api/models/{FD}/weights")
    assert status == 404 and "no weight override" in body["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"weights": {"2.1.3": 50, "2.2.0": 40}}, "add up to 90, not 100"),
        ({"weights": {"2.1.3": 50, "9.9.9": 50}}, "no version or alias '9.9.9'"),
        ({"weights": {"2.1.3": 50.0, "2.2.0": 50}}, "whole number"),
        ({"weights": {"2.1.3": 100, "stable": 0}}, "named twice"),
        ({"weights": [100]}, '"weights" must be an object'),
        ({"weights": {}}, '"weights" must be an object'),
        ({"weight": {"2.1.3": 100}}, "unknown field(s) 'weight'"),
        ({"weights": {"2.1.3": 100}, "reason": 7}, '"reason" must be a string'),
        ([1, 2], "JSON object"),
    ],
)
async def test_override_refusals_are_400_with_a_reason(api: Admin, body: Any, message: str) -> None:
    status, answer = await api.call("PUT", f"/api/models/{FD}/weights", json=body)
    assert status == 400 and message in answer["error"], answer
    assert api.audit() == []


async def test_override_of_unknown_model_and_malformed_json(api: Admin) -> None:
    status, answer = await api.call("PUT", "/api/models/nope/weights", json={"weights": {"1": 100}})
    assert status == 400 and "unknown model 'nope'" in answer["error"]
    status, answer = await api.call("PUT", f"/api/models/{FD}/weights", data=b"{weights: 1")
    assert status == 400 and "body must be JSON" in answer["error"]


# -- errors and the document ---------------------------------------------------------------------


async def test_errors_are_json_without_tracebacks(api: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    status, body = await api.call("GET", "/no/such/route")
    assert status == 404 and body == {"error": "no such route: GET /no/such/route"}
    status, body = await api.call("POST", "/api/routes")
    assert status == 405 and "GET" in body["error"]

    def explode() -> None:
        raise RuntimeError("internal detail /etc/secret")

    monkeypatch.setattr(api.plane, "routes_view", explode)
    status, body = await api.call("GET", "/api/routes")
    assert status == 500 and "secret" not in json.dumps(body) and "Traceback" not in json.dumps(body)


async def test_openapi_lists_every_served_route(api: Admin) -> None:
    status, document = await api.call("GET", "/openapi.json")
    assert status == 200 and document == json.loads(json.dumps(OPENAPI))
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in {"get", "put", "post", "delete", "patch"}
    }
    assert documented == served_routes(api.app)
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        **document["components"]["securitySchemes"]["bearerAuth"],
        "type": "http",
        "scheme": "bearer",
    }
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method != "parameters" and operation.get("security") != []:
                assert "401" in operation["responses"], (method, path)
            if method in {"put", "post", "delete", "patch"}:
                assert "403" in operation["responses"], (method, path)

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in refs(v)]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []

    for ref in refs(document):
        target: Any = document
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]  # a KeyError names a dangling reference


async def test_sampler_runs_in_the_background(api: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    def sample() -> None:
        nonlocal calls
        calls += 1

    monkeypatch.setattr(api.plane, "sample", sample)
    await asyncio.sleep(admin.SAMPLE_EVERY * 1.5)
    assert calls >= 1


# -- the CLI against the same server -------------------------------------------------------------


def cli_args(api: Admin, *, token: str | None = ALICE, state_dir: str | None = None, admin: str = "") -> Any:
    return argparse.Namespace(
        admin=admin or str(api.client.make_url("/")),
        token=token,
        state_dir=state_dir,
        timeout=5.0,
        json=False,
    )


async def test_cli_status_and_reload(api: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(admin_cli.run_status, cli_args(api)) == 0
    out = capsys.readouterr().out
    assert FD in out and "2.1.3" in out and "2026-11-05" in out and "2 worker(s) alive" in out
    assert await asyncio.to_thread(admin_cli.run_reload, cli_args(api)) == 0
    assert "pid 101: ok" in capsys.readouterr().out
    api.fleet.refuse.add(101)
    assert await asyncio.to_thread(admin_cli.run_reload, cli_args(api)) == 1
    out = capsys.readouterr().out
    assert "pid 101: REFUSED" in out and "adds up to 105" in out
    assert await asyncio.to_thread(admin_cli.run_status, cli_args(api)) == 0
    assert "still refused by pid(s) 101" in capsys.readouterr().out


async def test_cli_errors(
    api: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    assert await asyncio.to_thread(admin_cli.run_status, cli_args(api, token="wrong")) == 1
    assert "GATEWAY_ADMIN_TOKEN" in capsys.readouterr().err
    assert await asyncio.to_thread(admin_cli.run_status, cli_args(api, token=None)) == 1
    assert "no admin token" in capsys.readouterr().err

    (tmp_path / "admin-token").write_text(BOB + "\n")
    assert (
        await asyncio.to_thread(admin_cli.run_reload, cli_args(api, token=None, state_dir=str(tmp_path))) == 0
    )
    assert api.audit()[-1]["who"] == "bob"
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", f"ops:{ALICE},ci:{BOB}")
    assert await asyncio.to_thread(admin_cli.run_reload, cli_args(api, token=None)) == 0
    assert api.audit()[-1]["who"] == "alice"

    closed = f"http://127.0.0.1:{_closed_port()}"
    assert await asyncio.to_thread(admin_cli.run_status, cli_args(api, admin=closed)) == 1
    assert "cannot connect" in capsys.readouterr().err

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>")

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", text)
    async with TestServer(other) as server:
        assert (
            await asyncio.to_thread(admin_cli.run_status, cli_args(api, admin=str(server.make_url("/")))) == 1
        )
    assert "not JSON" in capsys.readouterr().err


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _never() -> None:
    raise AssertionError("no reload expected")
