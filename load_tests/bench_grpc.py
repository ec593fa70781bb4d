"""The gRPC port's benchmark: the gateway vs nginx `grpc_pass` vs the backend, same backend, one run.

    .venv/bin/python load_tests/bench_grpc.py [--rounds 3] [--seconds 4] [--clients 2] [--concurrency 32]

Targets, measured in interleaved rounds (round 1 of each, then round 2, ...) so a drift of the machine
touches all alike:
- **backend**: a tiny grpcio asyncio server answering every ModelInfer with one fixed, pre-serialized
  ModelInferResponse (no tensor work at all), the stand-in for a Triton that costs nothing;
- **nginx**: nginx 1 worker, `grpc_pass` to it over HTTP/2 (the C reference; it routes blindly, no split);
- **gateway**: `gateway serve --workers 1 --grpc-port`, routes.yaml splitting `fraud-detector` 90/10
  between two versions on that backend, `keys.required: false`.

The load generator is Python (ghz is not packaged in Debian or PyPI): `--clients` processes, each one
grpc.aio channel keeping `--concurrency` ModelInfer calls in flight with the same 1x4 FP32 request.
The figures are requests/s, the median of the rounds, and the ratio to nginx. On a small machine the
generator, the backend and the proxy share the cores: the backend's own rate says how much headroom
the generator has, and every ratio is within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from nginx import backend_conf, nginx_binary, start_nginx
from procs import Supervisor, cpu_seconds, descendants, free_port, wait_for_port
from tritonclient.grpc import service_pb2

REPO = Path(__file__).resolve().parent.parent
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def request_bytes(model: str, version: str = "") -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name="INPUT__0", datatype="FP32")
    tensor.shape.extend([1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return bytes(request.SerializeToString())


def response_bytes() -> bytes:
    response = service_pb2.ModelInferResponse(model_name="fraud_detector", model_version="3")
    output = response.outputs.add(name="OUTPUT__0", datatype="FP32")
    output.shape.extend([1, 1])
    response.raw_output_contents.append(np.array([33.0], dtype=np.float32).tobytes())
    return bytes(response.SerializeToString())


# -- the fast backend ------------------------------------------------------------------------------


async def serve_backend(port: int) -> None:
    answer = response_bytes()

    async def infer(request: bytes, context: object) -> bytes:
        return answer

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- the load generator ----------------------------------------------------------------------------


async def _drive(address: str, payload: bytes, seconds: float, concurrency: int) -> tuple[int, float]:
    """Calls one process completed, and over how many seconds (its own measured window)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)
        await call(payload, timeout=10)  # connected and answering before the clock starts
        done = 0
        started = time.monotonic()
        stop = started + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await call(payload, timeout=10)
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, time.monotonic() - started


def _drive_process(args: tuple[str, bytes, float, int]) -> tuple[int, float]:
    return asyncio.run(_drive(*args))


def measure(
    pool: multiprocessing.pool.Pool, address: str, payload: bytes, pids: list[int], args: argparse.Namespace
) -> tuple[float, float]:
    """Requests/s through the target, and the target's own CPU microseconds per request.

    The CPU figure does not depend on how busy the machine is: it is what limits a target that has a
    core to itself.
    """
    work = [(address, payload, float(args.seconds), int(args.concurrency))] * args.clients
    cpu_before = cpu_seconds(pids)
    results: list[tuple[int, float]] = pool.map(_drive_process, work)
    cpu = cpu_seconds(pids) - cpu_before
    calls = sum(count for count, _ in results)
    return sum(count / seconds for count, seconds in results), 1e6 * cpu / max(calls, 1)


# -- the targets -----------------------------------------------------------------------------------


def nginx_grpc_conf(port: int, backend_port: int) -> str:
    return f"""
worker_processes 1;
pid nginx.pid;
error_log logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    http2_max_requests 1000000;
    upstream grpc_backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} http2;
        location /inference.GRPCInferenceService/ {{ grpc_pass grpc://grpc_backend; }}
    }}
}}
"""


def gateway_routes(http_port: int, grpc_port: int) -> str:
    return f"""
backends:
  bench: {{url: "http://127.0.0.1:{http_port}", grpc_url: "127.0.0.1:{grpc_port}", timeout: 10s}}
models:
  fraud-detector:
    versions:
      2.1.3: {{backend: bench, target: fraud_detector/3}}
      2.2.0: {{backend: bench, target: fraud_detector/4}}
    split: {{2.1.3: 90, 2.2.0: 10}}
keys: {{required: false}}
"""


def wait_answering(address: str, payload: bytes, timeout: float = 20.0) -> None:
    """Until the target answers one ModelInfer (the gateway waits for its first health checks)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)
        while True:
            try:
                call(payload, timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight per process")
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_backend:
        asyncio.run(serve_backend(args.serve_backend))
        return 0
    nginx_binary()  # fails early, with the hint, when nginx is missing
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        sup = Supervisor(Path(tmp))
        try:
            return run(sup, Path(tmp), args)
        finally:
            sup.stop_all()


def run(sup: Supervisor, workdir: Path, args: argparse.Namespace) -> int:
    backend_port, health_port, nginx_port = free_port(), free_port(), free_port()
    gateway_port, gateway_http, admin_port = free_port(), free_port(), free_port()
    backend = sup.start("backend", [sys.executable, __file__, "--serve-backend", str(backend_port)])
    wait_for_port(backend_port, backend, timeout=20)
    # The gateway's health checks read a backend's HTTP readiness: a fixed-answer nginx gives it.
    start_nginx(sup, "health", backend_conf(health_port, 1), health_port, None)
    proxy = start_nginx(sup, "nginx-grpc", nginx_grpc_conf(nginx_port, backend_port), nginx_port, None)
    routes = workdir / "routes.yaml"
    routes.write_text(gateway_routes(health_port, backend_port))
    argv = [str(REPO / ".venv/bin/gateway"), "serve", "--config", str(routes), "--host", "127.0.0.1"]
    argv += ["--port", str(gateway_http), "--grpc-port", str(gateway_port), "--workers", "1"]
    argv += ["--admin-port", str(admin_port), "--state-dir", str(workdir / "state"), "--log-level", "warning"]
    gateway = sup.start("gateway", argv)
    wait_for_port(gateway_port, gateway, timeout=30)

    private, public = request_bytes("fraud_detector", "3"), request_bytes("fraud-detector")
    targets = {
        "backend": (f"127.0.0.1:{backend_port}", private, backend.pid),
        "nginx": (f"127.0.0.1:{nginx_port}", private, proxy.child.pid),
        "gateway": (f"127.0.0.1:{gateway_port}", public, gateway.pid),
    }
    for address, payload, _ in targets.values():
        wait_answering(address, payload)
    rates: dict[str, list[float]] = {name: [] for name in targets}
    costs: dict[str, list[float]] = {name: [] for name in targets}
    print(
        f"bench_grpc: {args.rounds} round(s) x {args.seconds:g}s per target, {args.clients} client "
        f"process(es) x {args.concurrency} calls in flight (Python grpc.aio load generator)",
        flush=True,
    )
    with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
        for number in range(1, args.rounds + 1):
            for name, (address, payload, pid) in targets.items():
                rate, cost = measure(pool, address, payload, [pid, *descendants(pid)], args)
                rates[name].append(rate)
                costs[name].append(cost)
                print(f"  round {number} {name:8s} {rate:9.0f} req/s {cost:7.0f} us CPU/req", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu = {name: statistics.median(values) for name, values in costs.items()}
    print("\ntarget     req/s (median)   vs nginx   CPU us/req (median)   vs nginx")
    for name, value in medians.items():
        ratio, cost_ratio = value / medians["nginx"], cpu[name] / cpu["nginx"]
        print(f"{name:10s} {value:14.0f}   {ratio:6.2f}x   {cpu[name]:19.0f}   {cost_ratio:6.2f}x")
    if gateway.alive() is False:
        print("THE GATEWAY DIED during the run; see its log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
