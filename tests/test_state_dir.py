"""The state directory is the gateway user's alone, its files are written without following planted
symlinks, and the audit log is best-effort: a failed write is counted, never an action undone.

The directory checks run on real directories under tmp_path; ownership is changed with os.chown where
the tests run as root, and checked against a directory root owns where they do not.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.access.admission import Admission, AdmissionDecision, access_policy
from gateway.admin import app as admin
from gateway.admin.control_plane import ControlPlane
from gateway.app.server import ServeOptions
from gateway.routing.config import parse_table
from gateway.state import files
from gateway.store.memory import MemoryStore
from tests.support import REPO, free_port

TOKEN = "s3cret-admin-token"
ROUTES = """
backends:
  triton-a: {url: http://127.0.0.1:9, timeout: 10s}
models:
  fraud-detector:
    versions:
      2.1.3: {backend: triton-a, target: fraud_detector/3}
    split: {2.1.3: 100}
keys: {required: true}
"""


def mode(path: Path) -> int:
    return path.lstat().st_mode & 0o7777


# -- the directory -------------------------------------------------------------------------------


def test_a_new_state_directory_is_private(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    files.prepare(state)
    assert mode(state) == 0o700 and mode(state / files.WORKERS) == 0o700
    assert state.stat().st_uid == os.geteuid()


def test_an_own_directory_readable_by_others_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # whatever the umask made of it
    files.prepare(state)
    assert mode(state) == 0o700


def test_a_symlink_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(target)
    with pytest.raises(files.UnsafeStateDir, match="is a symlink"):
        files.prepare(tmp_path / "state")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("bits", [0o770, 0o1777])
def test_a_directory_others_may_write_is_refused(tmp_path: Path, bits: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, bits)
    with pytest.raises(files.UnsafeStateDir, match="writable by other users"):
        files.prepare(state)
    assert mode(state) == bits and not (state / files.WORKERS).exists()


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        os.chown(state, 54321, 54321)  # as another local user would have created it first
    else:
        state = Path("/usr")  # root's, and this user's uid is not 0
    with pytest.raises(files.UnsafeStateDir, match=r"belongs to uid \d+, not to this user"):
        files.prepare(state)
    assert not (state / files.WORKERS).exists()


def test_gateway_serve_refuses_an_unsafe_state_dir_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ROUTES.replace("keys: {required: true}\n", ""))
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(tmp_path / "real")
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "routes.yaml")]
    argv += ["--host", "127.0.0.1", "--port", str(free_port()), "--admin-port", str(free_port())]
    argv += ["--state-dir", str(tmp_path / "state"), "--grpc-port", "0"]
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": TOKEN}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert done.returncode == 1
    assert "refusing to start" in done.stderr and "is a symlink" in done.stderr, done.stderr


def test_the_default_is_the_private_runtime_dir_else_the_users_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, home = tmp_path / "run", tmp_path / "home"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert ServeOptions("routes.yaml", port=9123).state_path() == runtime / "model-gateway" / "9123"
    os.chmod(runtime, 0o755)  # not private: not trusted with the admin token
    assert files.default_state_dir(9123) == home / ".local" / "state" / "model-gateway" / "9123"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert files.default_state_dir(8080) == home / ".local" / "state" / "model-gateway" / "8080"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    assert files.default_state_dir(8080) == tmp_path / "xdg-state" / "model-gateway" / "8080"
    files.prepare(files.default_state_dir(8080))
    assert mode(tmp_path / "xdg-state" / "model-gateway" / "8080") == 0o700


# -- writing files -------------------------------------------------------------------------------


def test_a_write_replaces_a_symlink_at_the_target_instead_of_following_it(tmp_path: Path) -> None:
    state, victim = tmp_path / "state", tmp_path / "victim"
    files.prepare(state)
    victim.write_text("precious")
    (state / files.OVERRIDES).symlink_to(victim)
    files.write_overrides(state, {})
    assert victim.read_text() == "precious"
    assert not (state / files.OVERRIDES).is_symlink() and files.read_overrides(state) == {}
    assert mode(state / files.OVERRIDES) == 0o600


def test_a_write_ignores_symlinks_planted_at_guessable_temporary_names(tmp_path: Path) -> None:
    state, victim = tmp_path / "state", tmp_path / "victim"
    files.prepare(state)
    victim.write_text("precious")
    # The names earlier releases used, and this process's pid in every position a guess could take.
    for name in (f".{files.OVERRIDES}.{os.getpid()}.tmp", f".{files.OVERRIDES}.tmp"):
        (state / name).symlink_to(victim)
    for _ in range(3):
        files.write_overrides(state, {})
    assert victim.read_text() == "precious"
    leftovers = sorted(p.name for p in state.iterdir() if p.name.endswith(".tmp"))
    assert len(leftovers) == 2  # only the planted ones: each write's own temporary file is gone
    with pytest.raises(FileExistsError):  # and an exclusive create never opens a planted link
        files._open_new(state / leftovers[0], os.O_WRONLY | os.O_EXCL)


def test_the_audit_log_does_not_follow_a_symlink(tmp_path: Path) -> None:
    state, victim = tmp_path / "state", tmp_path / "victim"
    files.prepare(state)
    victim.write_text("precious")
    (state / files.AUDIT).symlink_to(victim)
    audit = files.AuditLog(state)
    assert audit.append("alice", "reload", {"ok": True}) is None
    assert victim.read_text() == "precious" and audit.failures == 1


# -- the audit log is best-effort ----------------------------------------------------------------


async def _no_reload() -> None:
    raise AssertionError("no reload expected")


@pytest.fixture
async def admin_client(tmp_path: Path) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], Any]]:
    config = tmp_path / "routes.yaml"
    config.write_text(ROUTES)
    plane = ControlPlane(str(config), tmp_path / "state", _no_reload)
    store = MemoryStore()
    app = admin.build_admin_app(plane, {TOKEN: "alice"}, store)
    async with TestClient(TestServer(app)) as client:
        yield client, (plane, store)


async def test_an_unwritable_audit_log_loses_the_line_not_the_key(
    admin_client: tuple[TestClient[web.Request, web.Application], Any], caplog: pytest.LogCaptureFixture
) -> None:
    client, (plane, store) = admin_client
    (plane.state_dir / files.AUDIT).mkdir()  # writing a line into it fails, as a full disk would
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with client.post("/api/keys", json={"name": "team-a"}, headers=auth) as response:
        assert response.status == 201
        secret = (await response.json())["secret"]
    assert plane.audit_log.failures == 1 and "not recorded: keys.create by alice" in caplog.text
    assert secret not in caplog.text

    table = parse_table(ROUTES)
    done: asyncio.Future[AdmissionDecision] = asyncio.get_running_loop().create_future()

    class Caller:
        client = "10.0.0.1"

        def header(self, name: bytes) -> bytes | None:
            return f"Bearer {secret}".encode() if name == b"authorization" else None

    admission = Admission(store, "fail_closed")
    admission.admit(
        access_policy(table, table.models["fraud-detector"]), Caller(), done.set_result, done.set_exception
    )
    decision = await asyncio.wait_for(done, 2)
    assert (decision.status, decision.key_name) == (0, "team-a")  # the key works

    # An override goes ahead too, and both lost lines are counted where operators look.
    weights = {"weights": {"2.1.3": 100}, "reason": "test"}
    async with client.put("/api/models/fraud-detector/weights", json=weights, headers=auth) as response:
        assert response.status == 200
    assert files.read_overrides(plane.state_dir)["fraud-detector"].set_by == "alice"
    async with client.get("/metrics", headers=auth) as response:
        assert "gateway_audit_write_failures_total 2.0" in await response.text()
    async with client.get("/api/status", headers=auth) as response:
        assert (await response.json())["audit_write_failures"] == 2
    async with client.get("/api/audit", headers=auth) as response:
        assert response.status == 200


def test_a_failed_append_returns_none_and_a_good_one_the_entry(tmp_path: Path) -> None:
    files.prepare(tmp_path / "state")
    audit = files.AuditLog(tmp_path / "state")
    entry = audit.append("controller", "rollout.step", {"model": "m", "weight": 25})
    assert entry is not None and entry["time"] == pytest.approx(time.time(), abs=5)
    assert audit.read() == [entry] and audit.failures == 0
    assert audit.append("controller", "rollout.step", {"not json": object()}) is None
    assert audit.failures == 1 and audit.read() == [entry]
    assert json.loads((tmp_path / "state" / files.AUDIT).read_text()) == entry
