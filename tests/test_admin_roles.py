"""Admin token roles: a read token sees everything and changes nothing; the dashboard's files are public.

Over a real ControlPlane and hand-made worker snapshots (tests/test_admin_unit.py's fleet), through
aiohttp's test server.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import app as admin
from gateway.admin import dashboard
from gateway.admin.auth import AdminToken, TokenError, parse_tokens
from gateway.admin.control_plane import ControlPlane
from gateway.app import server
from gateway.cli import admin as admin_cli
from gateway.state import files as snapshots
from gateway.store.memory import MemoryStore
from tests.test_admin_unit import ROUTES, Admin, Fleet, concrete, served_routes

READER, OPERATOR = "reader-secret-1234", "operator-secret-5678"
TOKENS = (AdminToken("viewer", READER, "read"), AdminToken("oncall", OPERATOR, "operate"))
PUBLIC = {("GET", "/"), ("GET", "/index.html"), ("GET", "/static/{name}")}
ACTIONS = {"PUT", "POST", "PATCH", "DELETE"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Admin]:
    config = tmp_path / "routes.yaml"
    config.write_text(ROUTES)
    fleet = Fleet(tmp_path / "state", config)
    plane = ControlPlane(str(config), fleet.state, fleet.trigger)
    fleet.write(101)
    app = admin.build_admin_app(plane, TOKENS, MemoryStore())
    async with TestClient(TestServer(app)) as client:
        yield Admin(client, plane, fleet, app)


def test_token_formats_and_roles() -> None:
    assert parse_tokens("just-a-secret") == (AdminToken("admin", "just-a-secret", "operate"),)
    assert parse_tokens("alice:alice-secret, bob:bob-secret-x:read ,carol:carol-secret:operate") == (
        AdminToken("alice", "alice-secret", "operate"),
        AdminToken("bob", "bob-secret-x", "read"),
        AdminToken("carol", "carol-secret", "operate"),
    )
    # A name may hold a colon, as before roles existed: only a short last part is taken for a role.
    assert parse_tokens("team:alice:alice-secret") == (AdminToken("team:alice", "alice-secret"),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bob:bob-secret-x:admin", "neither a role nor a secret"),
        ("bob:bob-secret-x:Read", "neither a role nor a secret"),
        ("bob:tiny", "shorter than 8"),
        ("alice:same-secret-1,bob:same-secret-1:read", "same secret twice"),
    ],
)
def test_bad_token_settings_are_refused_without_echoing_secrets(text: str, message: str) -> None:
    with pytest.raises(TokenError, match=message) as caught:
        parse_tokens(text)
    for secret in ("bob-secret-x", "tiny", "same-secret-1"):
        assert secret not in str(caught.value)


def test_serve_refuses_a_token_with_an_unknown_role(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "ops:ops-secret-123:write")
    with pytest.raises(server.AdminRefused, match="name:secret:read"):
        server.admin_tokens(tmp_path, "127.0.0.1")
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "viewer:view-secret-1:read,ops:ops-secret-123")
    assert [t.role for t in server.admin_tokens(tmp_path, "127.0.0.1")] == ["read", "operate"]


def test_cli_uses_an_operate_token_when_the_variable_lists_several(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", f"viewer:{READER}:read,oncall:{OPERATOR}")
    assert admin_cli.resolve_token(argparse.Namespace(token=None, state_dir=None)) == OPERATOR


async def test_whoami_tells_the_role(api: Admin) -> None:
    assert await api.call("GET", "/api/whoami", token=READER) == (
        200,
        {"name": "viewer", "role": "read", "can_act": False},
    )
    assert await api.call("GET", "/api/whoami", token=OPERATOR) == (
        200,
        {"name": "oncall", "role": "operate", "can_act": True},
    )
    assert (await api.call("GET", "/api/whoami", token="wrong-token-123"))[0] == 401


async def test_a_read_token_reads_everything(api: Admin) -> None:
    reads = sorted((m, p) for m, p in served_routes(api.app) - PUBLIC if m == "GET")
    assert len(reads) >= 15
    for method, path in reads:
        status, body = await api.call(method, concrete(path), token=READER)
        # 404 for the one version or key the fixture lacks; never a refusal of the token.
        assert status in (200, 404), (path, status, body)
        if status == 404:
            assert "token" not in str(body) and "role" not in str(body), path
    status, text = await api.call("GET", "/metrics", token=READER)
    assert status == 200 and "gateway_requests_total" in text


async def test_a_read_token_changes_nothing(api: Admin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    actions = sorted((m, p) for m, p in served_routes(api.app) if m in ACTIONS)
    assert len(actions) >= 8
    for method, path in actions:
        status, body = await api.call(method, concrete(path), token=READER, json={"weights": {"2.1.3": 100}})
        assert status == 403, (method, path, status, body)
        assert "'viewer' has the 'read' role" in body["error"] and "'operate' role" in body["error"]
    assert api.fleet.triggered == 0
    assert api.audit() == []
    assert snapshots.read_overrides(api.fleet.state) == {}
    assert (await api.call("GET", "/api/keys", token=READER))[1]["keys"] == []
    assert READER not in caplog.text
    # The same calls with an operate token do act: the refusal was the role's, not the request's.
    status, _ = await api.call(
        "PUT", f"/api/models/{concrete('{model}')}/weights", token=OPERATOR, json={"weights": {"2.1.3": 100}}
    )
    assert status == 200
    assert [e["who"] for e in api.audit()] == ["oncall"]


async def test_dashboard_files_need_no_token_and_nothing_else_is_public(api: Admin) -> None:
    async with api.client.get("/") as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        page = await response.text()
    assert "fraud-detector" not in page  # the page names no model: data comes only with a token
    for name in ("dashboard.js", "dashboard.css"):
        async with api.client.get(f"/static/{name}") as response:
            assert response.status == 200, name
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/static/nope.js", "/static/..%2Fapp.py", "/static/../auth.py"):
        async with api.client.get(path) as response:
            assert response.status in (401, 404), path
            assert "import" not in await response.text()
    async with api.client.post("/") as response:
        assert response.status == 401  # only reading the files is public


def test_dashboard_assets_name_no_other_origin() -> None:
    """Every asset is served by the gateway: no CDN, no font or script from elsewhere."""
    for path in sorted(dashboard.STATIC.iterdir()):
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), path.name
        assert "https://" not in text and "//cdn" not in text, path.name
