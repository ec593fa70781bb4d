"""The production path's speed: keys and exact limits against the bare gateway and nginx, in one run.

Run it with `make bench`, or `.venv/bin/python load_tests/bench_limits.py --rounds 5 --duration 5`
(after `load_tests/ensure_tools.sh`).

Four targets proxy to the same nginx fixed-response backend, each on one core of its own:
  nginx    nginx, 1 worker, with the same 90/10 split (load_tests/nginx.py): the C reference;
  bare     the gateway, 1 worker, keys.required false, no limits;
  memory   keys.required true, a key with its own limit and a per-model limit, memory store;
  redis    the same on Redis (a redis-server this script starts), every limit exact across processes.
The limits are far above the load, so every request is admitted and what is measured is the checking.
Every target gets the same request, Authorization header included. wrk measures them in interleaved
rounds (32 connections, pinned as in bench.py); the figures are medians of the rounds, the ratios
medians of each round's ratio. Redis's INFO commandstats gives the script calls (EVALSHA/EVAL: the
round trips that decide limits) per request; with token leases they fall far below one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
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
    for _ in range(50):  # the admin API answers 503 until the gateway's store is up
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return str(json.loads(response.read())["secret"])
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                raise
            time.sleep(0.2)
    raise RuntimeError(f"no key created on the admin port {admin_port}: still 503")


def script_calls(port: int) -> int:
    calls = redis_commands(port)
    return calls.get("evalsha", 0) + calls.get("eval", 0)


def routes(backend: int, limited: bool, store: str) -> str:
    limit = '    limit: {rate: "1000000/s", burst: 1000000}' if limited else ""
    return ROUTES.format(backend=backend, model_limit=limit, required=str(limited).lower(), store=store)


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
    redis_core = {"loadgen": loadgen, "target": target, "any": None}[args.redis_core]
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        sup = Supervisor(Path(tmp))
        try:
            redis_port = free_port()
            redis = sup.start(
                "redis",
                ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                redis_core,
            )
            wait_for_port(redis_port, redis, timeout=10)
            backend_port = free_port()
            nginx.start_nginx(sup, "backend", nginx.backend_conf(backend_port, 1), backend_port, loadgen)
            proxy_port = free_port()
            nginx.start_nginx(
                sup, "nginx-proxy", nginx.proxy_conf(proxy_port, backend_port), proxy_port, target
            )
            plain_port, _ = start_gateway(sup, "bare", routes(backend_port, False, "memory://"), target)
            memory_port, memory_admin = start_gateway(
                sup, "memory", routes(backend_port, True, "memory://"), target
            )
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            redis_gw, redis_admin = start_gateway(sup, "redis", routes(backend_port, True, redis_url), target)
            secrets = {"memory": create_key(memory_admin), "redis": create_key(redis_admin)}
            ports = {"nginx": proxy_port, "bare": plain_port, "memory": memory_port, "redis": redis_gw}
            scripts = {}
            for name in ports:
                # The same request everywhere: the header costs the targets that ignore it its parsing.
                secret = secrets.get(name, secrets["redis"])
                scripts[name] = Path(tmp) / f"infer-{name}.lua"
                scripts[name].write_text(
                    wrk.LUA_SCRIPT + f'\nwrk.headers["Authorization"] = "Bearer {secret}"\n'
                )
            url = "http://127.0.0.1:{}/v2/models/fraud-detector/infer"
            results: dict[str, list[float]] = {name: [] for name in ports}
            per_request: list[float] = []
            for name, port in ports.items():  # warm-up, unrecorded
                wrk.run(wrk.command(url.format(port), scripts[name], 1, args.connections, 1, loadgen), 60)
            for round_number in range(1, args.rounds + 1):
                for name, port in ports.items():
                    before = script_calls(redis_port)
                    argv = wrk.command(
                        url.format(port), scripts[name], 1, args.connections, args.duration, loadgen
                    )
                    result = wrk.run(argv, args.duration + 30)
                    if result.errors:
                        print(f"!! {name}: {result.errors} errors (non-2xx or socket)", file=sys.stderr)
                    results[name].append(result.rps)
                    extra = ""
                    if name == "redis":
                        calls = script_calls(redis_port) - before
                        per_request.append(calls / max(1, result.requests))
                        extra = f"  {per_request[-1]:.4f} script calls/request"
                    line = f"{result.rps:>10,.0f} req/s  p50 {result.p50_us:,.0f} us{extra}"
                    print(f"round {round_number} {name:8s} {line}", flush=True)
                    time.sleep(0.5)
            report(results, per_request, args)
            print(f"Redis commandstats:     {redis_commands(redis_port)}")
        finally:
            sup.stop_all()
    return 0


def report(results: dict[str, list[float]], per_request: list[float], args: argparse.Namespace) -> None:
    def ratio(top: str, bottom: str) -> str:
        each = [a / b for a, b in zip(results[top], results[bottom], strict=True)]
        return f"{statistics.median(each):.2f} [{min(each):.2f}..{max(each):.2f}]"

    print(f"\nmedians of {args.rounds} rounds x {args.duration}s, {args.connections} connections:")
    labels = {
        "nginx": "nginx proxy, 1 worker",
        "bare": "gateway, no keys/limits",
        "memory": "keys + limits, memory",
        "redis": "keys + limits, Redis",
    }
    for name, label in labels.items():
        print(f"  {label:<26} {statistics.median(results[name]):>10,.0f} req/s")
    print(f"  bare / nginx               {ratio('bare', 'nginx')}")
    print(f"  memory / bare              {ratio('memory', 'bare')}")
    print(f"  redis / bare               {ratio('redis', 'bare')}")
    calls = statistics.median(per_request)
    print(f"  Redis script calls/request {calls:.4f} (median; max {max(per_request):.4f})")


if __name__ == "__main__":
    sys.exit(main())
