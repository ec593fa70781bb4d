"""What API keys and rate limits cost: the gateway with and without them, in one run.

Run it with `.venv/bin/python load_tests/bench_limits.py` (after `load_tests/ensure_tools.sh`).

Two gateways (1 worker each) proxy to the same nginx fixed-response backend:
  plain    keys.required false, no limits (the data-plane benchmark's gateway);
  limited  keys.required true, a key with its own limit and a per-model limit, both checked in Redis
           (a redis-server this script starts) on every request; the limits are far above the load,
           so every request is admitted and what is measured is the checking.
wrk measures both in interleaved rounds (32 connections, pinned as in bench.py), and Redis's
INFO commandstats gives the Redis commands per request, which fall under load because requests of
the same moment share one script call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nginx
import wrk
from procs import Supervisor, free_port, usable_cores, wait_for_port

REPO = Path(__file__).resolve().parent.parent
GATEWAY = REPO / ".venv" / "bin" / "gateway"
ROUTES = """\
backends:
  bench-backend: {{url: "http://127.0.0.1:{backend}", timeout: 10s}}
models:
  fraud-detector:
    versions:
      "2.1.3": {{backend: bench-backend, target: fraud_detector/3}}
      "2.2.0": {{backend: bench-backend, target: fraud_detector/4}}
    split: {{"2.1.3": 90, "2.2.0": 10}}
{model_limit}
keys: {{required: {required}}}
store: {{url: "{store}", on_error: fail_closed}}
"""
ADMIN_TOKEN = "bench-admin-token"


def redis_commands(port: int) -> dict[str, int]:
    """Calls per command from INFO commandstats."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "INFO", "commandstats"], capture_output=True, text=True
    )
    calls = {}
    for line in out.stdout.splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            calls[name.removeprefix("cmdstat_")] = int(fields.split(",")[0].split("=")[1])
    return calls


def start_gateway(sup: Supervisor, name: str, routes: str, core: int | None) -> tuple[int, int]:
    path = sup.workdir / f"{name}.yaml"
    path.write_text(routes)
    port, admin = free_port(), free_port()
    argv = [str(GATEWAY), "serve", "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--grpc-port", "0", "--admin-port", str(admin)]
    argv += ["--state-dir", str(sup.workdir / f"state-{name}")]
    child = sup.start(name, ["env", f"GATEWAY_ADMIN_TOKEN=bench:{ADMIN_TOKEN}", *argv], core)
    wait_for_port(port, child, timeout=20)
    wait_for_port(admin, child, timeout=20)
    return port, admin


def create_key(admin_port: int) -> str:
    body = json.dumps({"name": "bench", "rate": "1000000/s", "burst": 1000000}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}/api/keys",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["secret"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--redis-core",
        choices=["loadgen", "target", "any"],
        default="loadgen",
        help="where redis-server runs: with wrk and the backend (default), with the gateway, or unpinned",
    )
    args = parser.parse_args()
    cores = usable_cores()
    loadgen, target = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        sup = Supervisor(Path(tmp))
        try:
            redis_port = free_port()
            redis = sup.start(
                "redis",
                ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                loadgen,
            )
            wait_for_port(redis_port, redis, timeout=10)
            backend_port = free_port()
            nginx.start_nginx(sup, "backend", nginx.backend_conf(backend_port, 1), backend_port, loadgen)
            limit = '    limit: {rate: "1000000/s", burst: 1000000}'
            plain_port, _ = start_gateway(
                sup,
                "plain",
                ROUTES.format(backend=backend_port, model_limit="", required="false", store="memory://"),
                target,
            )
            limited_routes = ROUTES.format(
                backend=backend_port,
                model_limit=limit,
                required="true",
                store=f"redis://127.0.0.1:{redis_port}/0",
            )
            limited_port, limited_admin = start_gateway(sup, "limited", limited_routes, target)
            secret = create_key(limited_admin)
            script = Path(tmp) / "infer.lua"
            script.write_text(wrk.LUA_SCRIPT + f'\nwrk.headers["Authorization"] = "Bearer {secret}"\n')
            url = "http://127.0.0.1:{}/v2/models/fraud-detector/infer"
            results: dict[str, list[float]] = {"plain": [], "limited": []}
            per_request: list[float] = []
            for round_number in range(1, args.rounds + 1):
                for name, port in (("plain", plain_port), ("limited", limited_port)):
                    before = redis_commands(redis_port)
                    argv = wrk.command(url.format(port), script, 1, args.connections, args.duration, loadgen)
                    result = wrk.run(argv, args.duration + 30)
                    if result.errors:
                        print(f"!! {name}: {result.errors} errors (non-2xx or socket)", file=sys.stderr)
                    results[name].append(result.rps)
                    if name == "limited":
                        after = redis_commands(redis_port)
                        commands = sum(after.values()) - sum(before.values()) - 1  # less our own INFO
                        per_request.append(commands / max(1, result.requests))
                    line = f"{result.rps:>10,.0f} req/s  p50 {result.p50_us:,.0f} us"
                    print(f"round {round_number} {name:8s} {line}")
                    time.sleep(0.5)
            ratios = [lim / plain for lim, plain in zip(results["limited"], results["plain"], strict=True)]
            plain_rps, limited_rps = (
                statistics.median(results["plain"]),
                statistics.median(results["limited"]),
            )
            print(f"\nplain gateway:          {plain_rps:,.0f} req/s (median of {args.rounds} rounds)")
            print(f"keys + limits (Redis):  {limited_rps:,.0f} req/s")
            spread = f"[{min(ratios):.2f}..{max(ratios):.2f}]"
            print(f"ratio limited / plain:  {statistics.median(ratios):.2f} {spread}")
            per = statistics.median(per_request)
            print(f"Redis commands/request: {per:.3f} at {args.connections} conns (incl. inside scripts)")
            print(f"Redis commandstats:     {redis_commands(redis_port)}")
        finally:
            sup.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
