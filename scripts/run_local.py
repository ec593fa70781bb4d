"""`make run`: local Triton versions (CPU) plus the gateway on routes.yaml; Ctrl-C stops everything."""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from backends.local import VersionSpec, start_versions, stop_all
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--routes", default="routes.yaml")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--admin-port", type=int, default=8081)
    parser.add_argument("--log-dir", default=str(REPO / "run"))
    args = parser.parse_args()
    state_dir = Path(args.log_dir) / "state"

    check = subprocess.run([sys.executable, "-m", "gateway", "validate", args.routes])
    if check.returncode != 0:
        return check.returncode
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    backends = local_backends(load_routes(args.routes))
    specs = [VersionSpec(b.targets, b.port, log_path=log_dir / f"{b.name}.log") for b in backends]
    print(
        f"starting {len(specs)} local Triton server(s), one per version (logs in {log_dir}/) ...", flush=True
    )
    triton = start_versions(specs)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            args.routes,
            "--port",
            str(args.port),
            "--admin-port",
            str(args.admin_port),
            "--state-dir",
            str(state_dir),
        ],
        start_new_session=True,  # Ctrl-C reaches us only; we stop the gateway gracefully ourselves
    )
    try:
        if not wait_listening(args.port, gateway):
            print(f"the gateway did not start listening on port {args.port}", file=sys.stderr)
            return 1
        for backend, process in zip(backends, triton, strict=True):
            targets = ", ".join(f"{m}/{n}" for m, n in backend.targets)
            print(f"  backend {backend.name}: {targets} at {process.url}")
        print(f"\ngateway: http://127.0.0.1:{args.port}  (e.g. POST /v2/models/fraud-detector/infer)")
        print(
            f"admin:   http://127.0.0.1:{args.admin_port}/api/status  (metrics: /metrics, API: /openapi.json)"
        )
        print(f"         token: $GATEWAY_ADMIN_TOKEN, or the file {state_dir / 'admin-token'}")
        status_command = f".venv/bin/gateway status --admin http://127.0.0.1:{args.admin_port}"
        print(f"         try: {status_command} --state-dir {state_dir}")
        print("press Ctrl-C to stop\n", flush=True)
        while not stop.wait(0.5):
            if gateway.poll() is not None:
                print(f"the gateway exited with {gateway.returncode}", file=sys.stderr)
                return 1
        return 0
    finally:
        print("stopping ...", flush=True)
        if gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
        stop_all(triton)


if __name__ == "__main__":
    sys.exit(main())
