"""Versions as archives end to end: a plain tritonserver in explicit model-control mode (the binary that
nvidia-pytriton ships, serving Python-backend models loaded through its repository API), a real Redis,
the gateway, the `gateway` command line and tritonclient.

One Triton and one gateway serve the whole module; each test writes the routes it needs. The Triton
hosts one model name per public version (fraud_detector, fraud_detector_canary, fraud_detector_fixed),
since a load replaces a model name's files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http

from backends.example_archives import SOURCE
from backends.local import free_port
from backends.repository_server import RepositoryServer, start_repository_server
from tests.redis_servers import RedisServer
from tests.support import REPO, GatewayProcess
from tests.test_admin_e2e import admin, samples
from tests.test_backend_health import unpinned

SAMPLE = REPO / "backends" / "examples" / "sample_request.json"
ROW = np.array([[1, 2, 3, 4]], dtype=np.float32)


def eventually(condition: Callable[[], Any], timeout: float = 30.0, every: float = 0.1) -> Any:
    """The first truthy value of `condition()`; fails after `timeout` (generous: 2 cores, shared)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not true within {timeout} s"
        time.sleep(every)


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=REPO, timeout=180
    )


def model_dir(root: Path, name: str, version: int, weights: float, dims: str = "[ -1 ]") -> Path:
    """A copy of the example model named `name`, with one version folder and its own weights."""
    target = root / name
    (target / str(version)).mkdir(parents=True)
    config = (SOURCE / "config.pbtxt").read_text().replace("dims: [ -1 ]", f"dims: {dims}")
    (target / "config.pbtxt").write_text(config)
    shutil.copy(SOURCE / "3" / "model.py", target / str(version) / "model.py")
    np.save(target / str(version) / "weights.npy", np.array([weights, weights], dtype=np.float32))
    return target


def build(root: Path, source: Path, version_id: str, triton_version: int) -> tuple[Path, str]:
    output = root / f"{source.parent.name}-{source.name}-{version_id}.zip"
    done = gateway_cli(
        "archive", "create", str(source), "--model", "fraud-detector", "--version", version_id,
        "--triton-version", str(triton_version), "--sample-request", str(SAMPLE),
        "--git-commit", "4f9c2ab", "--created", "2026-01-15", "--output", str(output),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return output, done.stdout.strip().rsplit(", ", 1)[1]


@dataclass
class Env:
    triton: RepositoryServer
    gateway: GatewayProcess
    root: Path
    archive: Path  # 2.1.3's, deployed by the `deployed` fixture
    digest: str
    store_url: str

    def connect(self) -> list[str]:
        return ["--admin", self.gateway.admin_url, "--token", self.gateway.admin_token]

    def routes(self, versions: str, split: str, extra: str = "", archive: str | None = None) -> str:
        return f"""
backends:
  triton-r: {{url: "{self.triton.url}", timeout: 10s}}
models:
  fraud-detector:
    versions:
      2.1.3: {{backend: triton-r, target: fraud_detector/3, archive: "{archive or self.digest}"}}
{versions}    split: {split}
{extra}keys: {{required: false}}
store: {{url: "{self.store_url}", timeout: 500ms}}
"""

    def apply(self, text: str) -> tuple[int, Any]:
        """Write the routes file and have every worker reload it; (status, body) of POST /api/reload."""
        self.gateway.routes_path.write_text(text)
        return admin(self.gateway, "POST", "/api/reload")

    def deploy(self, archive: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        config = ["--backend", "triton-r", "--config", str(self.gateway.routes_path)]
        return gateway_cli("archive", "deploy", str(archive), *config, *self.connect(), *extra)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("archives")
    redis = RedisServer().start()
    triton = start_repository_server(free_port(), log_path=root / "triton.log")
    archive, digest = build(root, SOURCE, "2.1.3", 3)
    process = GatewayProcess("")
    env = Env(triton, process, root, archive, digest, redis.url)
    process.routes = env.routes("", "{2.1.3: 100}")
    try:
        process.start()
        yield env
    finally:
        process.stop()
        triton.stop()
        redis.cleanup()


@dataclass(frozen=True)
class Deployed:
    ready_before: int  # status of the ready endpoint before the deploy
    output: str


@pytest.fixture(scope="module")
def deployed(env: Env) -> Deployed:
    status, _ = admin(env.gateway, "GET", "/api/status")
    assert status == 200
    ready_before = triton_http.InferenceServerClient(f"127.0.0.1:{env.gateway.port}").is_model_ready(
        "fraud-detector", "2.1.3"
    )
    done = env.deploy(env.archive)
    assert done.returncode == 0, done.stderr + done.stdout
    return Deployed(int(ready_before), done.stdout)


def infer(env: Env, version: str = "2.1.3") -> triton_http.InferResult:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{env.gateway.port}", network_timeout=30)
    tensor = triton_http.InferInput("INPUT__0", list(ROW.shape), "FP32")
    tensor.set_data_from_numpy(ROW)
    return client.infer("fraud-detector", [tensor], model_version=version)


def answered(env: Env) -> bool:
    try:
        return bool(infer(env).as_numpy("OUTPUT__1")[0][0] == 3)
    except Exception:
        return False


def test_deploy_makes_the_version_ready_and_answering_through_the_gateway(
    env: Env, deployed: Deployed
) -> None:
    assert deployed.ready_before == 0  # nothing was loaded into this Triton before
    assert "loaded fraud_detector/3" in deployed.output and "OUTPUT__0, OUTPUT__1" in deployed.output
    assert f"fraud-detector 2.1.3: registered, {env.digest}" in deployed.output
    eventually(lambda: answered(env))  # the gateway's health check sees it ready within seconds
    result = infer(env)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), [[33.0]])  # sum 10 * 3 + 3
    shown = gateway_cli("versions", "show", "fraud-detector", "2.1.3", *env.connect())
    assert f"registered by tester as {env.digest}" in shown.stdout
    assert "deployed to triton-r by tester" in shown.stdout

    def metadata() -> Any:
        client = triton_http.InferenceServerClient(f"127.0.0.1:{env.gateway.port}")
        gateway = client.get_model_metadata("fraud-detector", "2.1.3")["gateway"]
        return gateway if (gateway["registry"] or {}).get("digest") == env.digest else None

    found = eventually(metadata, timeout=40)  # the worker re-reads the registry every 10 s
    assert found["archive"] == env.digest and found["registry"]["target"] == "fraud_detector/3"


def test_re_registering_a_version_id_with_other_content_is_refused(env: Env, deployed: Deployed) -> None:
    other, other_digest = build(env.root, model_dir(env.root / "other", "fraud_detector", 3, 5.0), "2.1.3", 3)
    assert other_digest != env.digest
    refused = env.deploy(other)
    assert refused.returncode == 1
    assert f"fraud-detector 2.1.3 is already {env.digest}" in refused.stderr
    assert "give the new build a new version id" in refused.stderr
    assert "loaded" not in refused.stdout  # refused before Triton was touched: the old build still answers
    np.testing.assert_allclose(infer(env).as_numpy("OUTPUT__0"), [[33.0]])
    record = json.loads(
        gateway_cli("versions", "show", "fraud-detector", "2.1.3", "--json", *env.connect()).stdout
    )
    body = {"record": {**record["record"], "digest": other_digest}}
    status, answer = admin(env.gateway, "PUT", "/api/versions/fraud-detector/2.1.3", body)
    assert status == 409 and f"is already {env.digest}" in answer["error"]


def test_a_routes_edit_pointing_a_registered_version_at_another_archive_is_refused(
    env: Env, deployed: Deployed
) -> None:
    eventually(lambda: answered(env))
    good = env.routes("", "{2.1.3: 100}")
    assert env.apply(good)[0] == 200
    before = admin(env.gateway, "GET", "/api/status")[1]["worker_revisions"]
    other = "sha256:" + "e" * 64
    edit = env.routes("", "{2.1.3: 100}", archive=other)
    status, body = env.apply(edit)
    assert status == 422
    line = next(i for i, row in enumerate(edit.splitlines(), 1) if other in row)
    column = edit.splitlines()[line - 1].index(f'"{other}') + 1  # the value, its quote included
    (error,) = next(iter(body["workers"].values()))["errors"]
    assert error.startswith(
        f"{env.gateway.routes_path}:{line}:{column}: fraud-detector 2.1.3 names archive {other}"
    )
    assert f"the registry has fraud-detector 2.1.3 as {env.digest}" in error
    assert admin(env.gateway, "GET", "/api/reloads")[1]["last_error"]["errors"] == [error]
    assert admin(env.gateway, "GET", "/api/status")[1]["worker_revisions"] == before  # the old table serves
    assert unpinned(env.gateway, 10) == {"200 2.1.3": 10}
    assert env.apply(good)[0] == 200


def test_a_canary_whose_input_shape_differs_is_refused_by_the_schema_gate(
    env: Env, deployed: Deployed
) -> None:
    fixed, digest = build(
        env.root, model_dir(env.root / "fixed", "fraud_detector_fixed", 5, 5.0, "[ 4 ]"), "2.9.0", 5
    )
    done = env.deploy(fixed)
    assert done.returncode == 0, done.stderr
    eventually(lambda: answered(env))
    canary = f'      2.9.0: {{backend: triton-r, target: fraud_detector_fixed/5, archive: "{digest}"}}\n'
    assert env.apply(env.routes(canary, "{2.1.3: 100, 2.9.0: 0}"))[0] == 200

    # A reload giving it weight for the first time is refused, naming the tensor and the difference.
    status, body = env.apply(env.routes(canary, "{2.1.3: 90, 2.9.0: 10}"))
    assert status == 422
    (error,) = next(iter(body["workers"].values()))["errors"]
    assert "schema gate: fraud-detector 2.9.0 cannot take the traffic of 2.1.3" in error
    assert "input INPUT__0: 2.9.0 takes shape [-1, 4], 2.1.3 takes [-1, -1]" in error
    assert unpinned(env.gateway, 30) == {"200 2.1.3": 30}

    # A rollout with it as the canary is held: no record, so no traffic, and the hold is visible.
    rollout = "    rollout: {baseline: 2.1.3, canary: 2.9.0, steps: [50, 100]}\n"
    assert env.apply(env.routes(canary, "{2.1.3: 100, 2.9.0: 0}", rollout))[0] == 200
    held = eventually(lambda: admin(env.gateway, "GET", "/api/schema-gate")[1]["held"].get("fraud-detector"))
    assert "INPUT__0" in held
    time.sleep(2.5)  # two more controller rounds: the rollout must still not have started
    assert admin(env.gateway, "GET", "/api/rollouts")[1]["rollouts"]["fraud-detector"]["record"] is None
    assert unpinned(env.gateway, 30) == {"200 2.1.3": 30}
    metrics = samples(admin(env.gateway, "GET", "/metrics")[1])
    labels = (("model", "fraud-detector"), ("version", "2.9.0"), ("where", "reload"))
    assert metrics[("gateway_schema_gate_refusals_total", labels)] >= 1
    assert metrics[("gateway_schema_gate_held", (("model", "fraud-detector"),))] == 1

    # allow_schema_change lets the intended change through, audited.
    allowed = canary.replace("}\n", ", allow_schema_change: true}\n")
    assert env.apply(env.routes(allowed, "{2.1.3: 100, 2.9.0: 0}", rollout))[0] == 200
    eventually(lambda: admin(env.gateway, "GET", "/api/rollouts")[1]["rollouts"]["fraud-detector"]["record"])
    audit = admin(env.gateway, "GET", "/api/audit")[1]["entries"]
    assert any(e["action"] == "schema_change.allowed" and e["version"] == "2.9.0" for e in audit)


def test_versions_show_lists_the_history_of_a_version_rolled_out_and_rolled_back(
    env: Env, deployed: Deployed
) -> None:
    canary_dir = model_dir(env.root / "canary", "fraud_detector_canary", 4, 4.0)
    archive, digest = build(env.root, canary_dir, "2.2.0", 4)
    assert env.deploy(archive).returncode == 0
    canary = f'      2.2.0: {{backend: triton-r, target: fraud_detector_canary/4, archive: "{digest}"}}\n'
    rollout = "    rollout: {baseline: 2.1.3, canary: 2.2.0, steps: [50, 100], min_step_duration: 10m}\n"
    assert env.apply(env.routes(canary, "{2.1.3: 100, 2.2.0: 0}", rollout))[0] == 200

    def phase() -> str | None:
        view = admin(env.gateway, "GET", "/api/rollouts")[1]["rollouts"]["fraud-detector"]
        return view["record"]["state"]["phase"] if view["record"] else None

    eventually(lambda: phase() == "progressing")
    eventually(lambda: "200 2.2.0" in unpinned(env.gateway, 10))  # the canary serves half the split
    rolled = gateway_cli("rollout", "rollback", "fraud-detector", *env.connect())
    assert rolled.returncode == 0, rolled.stderr
    eventually(lambda: phase() == "rolled_back")

    def shown() -> str | None:
        out = gateway_cli("versions", "show", "fraud-detector", "2.2.0", *env.connect()).stdout
        return out if "rollout rolled back" in out and "served requests" in out else None

    history = eventually(shown, timeout=40).split("history:")[1]
    assert f"registered by tester as {digest}" in history
    assert "rollout started as canary (against 2.1.3), canary at 50% by controller" in history
    assert "rollout rolled back as canary (against 2.1.3), canary at 0% by tester" in history
    assert history.index("started") < history.index("rolled back")
    baseline = gateway_cli("versions", "show", "fraud-detector", "2.1.3", *env.connect()).stdout
    assert "rollout rolled back as baseline (against 2.2.0)" in baseline
    listing = gateway_cli("versions", "list", "fraud-detector", *env.connect()).stdout
    assert "2.2.0" in listing and digest[:19] in listing


def test_deploy_into_a_model_repository_never_replaces_another_build(env: Env) -> None:
    archive, _ = build(env.root, model_dir(env.root / "repo-src", "fraud_detector_repo", 6, 6.0), "2.6.0", 6)
    repository = env.triton.repository
    done = gateway_cli("archive", "deploy", str(archive), "--repository", str(repository), "--no-register")
    assert done.returncode == 0, done.stderr
    folder = repository / "fraud_detector_repo"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "6/model.py",
        "6/weights.npy",
        "config.pbtxt",
    ]
    again = gateway_cli("archive", "deploy", str(archive), "--repository", str(repository), "--no-register")
    assert again.returncode == 0, again.stderr  # the same build again changes nothing
    other, _ = build(env.root, model_dir(env.root / "repo-other", "fraud_detector_repo", 6, 7.0), "2.6.1", 6)
    refused = gateway_cli("archive", "deploy", str(other), "--repository", str(repository), "--no-register")
    assert refused.returncode == 1 and "already holds a different 6/weights.npy" in refused.stderr
    # The layout is Triton's: the server loads it from its repository by name.
    client = triton_http.InferenceServerClient(env.triton.url.removeprefix("http://"), network_timeout=60)
    client.load_model("fraud_detector_repo")
    assert client.is_model_ready("fraud_detector_repo", "6")
