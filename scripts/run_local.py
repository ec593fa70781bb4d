"""`make run`: the example versions built as archives, deployed into local Triton servers (CPU), and the
gateway serving routes.yaml, which names their digests; Ctrl-C stops everything.

The whole path of docs/archives.md: `gateway archive create` for each version, one tritonserver per
local backend in explicit model-control mode, the gateway, then `gateway archive deploy` into each
backend, which loads the version through Triton's repository API, warms it up and registers it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backends.example_archives import EXAMPLES, archive_path, create_command
from backends.knobs import Knobs, write_knobs
from backends.repository_server import RepositoryServer, start_repository_server
from backends.up import load_routes, local_backends

REPO = Path(__file__).resolve().parent.parent


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def dashboard_url(admin: str, state_dir: Path) -> str:
    """The dashboard with the generated token in the fragment: a browser never sends a fragment to the
    server, and the page moves it into the tab's sessionStorage and out of the address bar."""
    if os.environ.get("GATEWAY_ADMIN_TOKEN", "").strip():
        return f"{admin}/  (sign in with a token from $GATEWAY_ADMIN_TOKEN)"
    try:
        token = (state_dir / "admin-token").read_text().strip()
    except OSError:
        return f"{admin}/"
    return f"{admin}/#token={token}"


def gateway_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def archived_versions(routes: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(version id, backend) of every version of the example model whose routes entry names an archive."""
    versions = routes.get("models", {}).get("fraud-detector", {}).get("versions", {}) or {}
    return [
        (vid, v.get("backend", "")) for vid, v in versions.items() if isinstance(v, dict) and v.get("archive")
    ]


def build_archives(directory: Path) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    for example in EXAMPLES:
        if subprocess.run(create_command(example, directory), cwd=REPO).returncode != 0:
            return False
    return True


def deploy(
    routes_path: str, versions: list[tuple[str, str]], archives: Path, admin: str, state: Path
) -> bool:
    known = {example.version: example for example in EXAMPLES}
    for version, backend in versions:
        if version not in known:
            print(
                f"{routes_path} names an archive for {version}, which is no example version", file=sys.stderr
            )
            return False
        command = gateway_command("archive", "deploy", str(archive_path(archives, known[version])))
        command += [
            "--backend",
            backend,
            "--config",
            routes_path,
            "--admin",
            admin,
            "--state-dir",
            str(state),
        ]
        if subprocess.run(command, cwd=REPO).returncode != 0:
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--routes", default="routes.yaml")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--admin-port", type=int, default=8081)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--log-dir", default=str(REPO / "run"))
    args = parser.parse_args()
    log_dir = Path(args.log_dir)
    state_dir = log_dir / "state"
    admin = f"http://127.0.0.1:{args.admin_port}"

    check = subprocess.run(gateway_command("validate", args.routes))
    if check.returncode != 0:
        return check.returncode
    log_dir.mkdir(parents=True, exist_ok=True)
    print("building the example versions as archives ...", flush=True)
    if not build_archives(log_dir / "archives"):
        return 1
    routes = load_routes(args.routes)
    backends = local_backends(routes)
    print(f"starting {len(backends)} tritonserver(s), one per version (logs in {log_dir}/) ...", flush=True)
    servers: list[RepositoryServer] = []
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    gateway: subprocess.Popen[bytes] | None = None
    try:
        knobs_dir = log_dir / "knobs"  # `make demo` turns a backend's fault knobs here
        knobs_dir.mkdir(exist_ok=True)
        for backend in backends:
            knobs = knobs_dir / f"{backend.name}.json"
            write_knobs(knobs, Knobs())  # every run starts healthy, whatever a demo left behind
            log_path = log_dir / f"{backend.name}.log"
            servers.append(
                start_repository_server(
                    backend.port, grpc_port=backend.grpc_port, log_path=log_path, knobs_file=knobs
                )
            )
        serve = ["serve", "--config", args.routes, "--port", str(args.port)]
        serve += [
            "--grpc-port",
            str(args.grpc_port),
            "--admin-port",
            str(args.admin_port),
            "--state-dir",
            str(state_dir),
        ]
        gateway = subprocess.Popen(
            gateway_command(*serve),
            start_new_session=True,  # Ctrl-C reaches us only; we stop the gateway gracefully ourselves
        )
        if not wait_listening(args.port, gateway) or not wait_listening(args.admin_port, gateway):
            print(f"the gateway did not start listening on port {args.port}", file=sys.stderr)
            return 1
        if not deploy(args.routes, archived_versions(routes), log_dir / "archives", admin, state_dir):
            print("deploying the example archives failed; see above", file=sys.stderr)
            return 1
        for backend, server in zip(backends, servers, strict=True):
            targets = ", ".join(f"{m}/{n}" for m, n in backend.targets)
            print(f"  backend {backend.name}: {targets} at {server.url}")
        print(f"\ngateway: http://127.0.0.1:{args.port}  (e.g. POST /v2/models/fraud-detector/infer)")
        print(f"gRPC:    127.0.0.1:{args.grpc_port}  (tritonclient.grpc, KServe v2 GRPCInferenceService)")
        print(f"admin:   {admin}/api/status  (metrics: /metrics, API: /openapi.json)")
        print(f"         token: $GATEWAY_ADMIN_TOKEN, or the file {state_dir / 'admin-token'}")
        connect = f"--admin {admin} --state-dir {state_dir}"
        print(f"         try: .venv/bin/gateway versions list fraud-detector {connect}")
        print(f"dashboard: {dashboard_url(admin, state_dir)}")
        print("           (`make demo` in another terminal sends traffic, then makes the canary fail)")
        print("press Ctrl-C to stop\n", flush=True)
        while not stop.wait(0.5):
            if gateway.poll() is not None:
                print(f"the gateway exited with {gateway.returncode}", file=sys.stderr)
                return 1
            if dead := [s for s in servers if not s.alive()]:
                print(f"{dead[0]!r} exited; last log lines:\n{dead[0].logs()}", file=sys.stderr)
                return 1
        return 0
    finally:
        print("stopping ...", flush=True)
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
