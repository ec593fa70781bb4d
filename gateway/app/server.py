"""Running the gateway: sockets, processes, the admin port.

With one worker, everything runs in one process and one event loop. With `--workers N` a supervisor
starts N worker processes that each bind the client port with SO_REUSEPORT (the kernel spreads
connections, no hand-off through the supervisor), restarts one that dies, passes signals on, and serves
the admin port itself; the workers and the supervisor share state through files in the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.admin.app import build_admin_app
from gateway.admin.auth import AdminToken, TokenError, parse_tokens
from gateway.admin.control_plane import ControlPlane, WorkerRestart
from gateway.app.worker import Worker, WorkerOptions
from gateway.routing.table import RouteTable
from gateway.state import files as snapshots
from gateway.store import Store, open_store

log = logging.getLogger("gateway.app.server")

RESTART_DELAY = 0.5  # seconds before a dead worker is started again, doubling while it keeps dying
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 60.0  # a worker up this long starts again from RESTART_DELAY when it dies


@dataclass(frozen=True, slots=True)
class ServeOptions:
    config: str
    host: str = "0.0.0.0"
    port: int = 8080
    grpc_port: int = 8001  # Triton's; 0: no gRPC port
    workers: int = 1
    reuse_port: bool = False
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    admin_host: str = "127.0.0.1"
    admin_port: int | None = 8081  # None: no admin port (the supervisor serves it for its workers)
    state_dir: str | None = None
    worker_index: int = 0
    stats: bool = True

    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else snapshots.default_state_dir(self.port)


class AdminRefused(Exception):
    """The admin port may not start as configured."""


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_tokens(state_dir: Path, host: str) -> tuple[AdminToken, ...]:
    """The admin tokens, from GATEWAY_ADMIN_TOKEN (`secret`, `name:secret` or `name:secret:role`, comma
    separated; see `gateway.admin.auth.parse_tokens`).

    Without one the admin port stays on loopback only, with a random operate token written to the state
    directory (mode 0600) for the CLI to read.
    """
    configured = os.environ.get("GATEWAY_ADMIN_TOKEN", "").strip()
    if configured:
        try:
            return parse_tokens(configured)
        except TokenError as exc:
            raise AdminRefused(str(exc)) from None
    if not is_loopback(host):
        raise AdminRefused(
            f"refusing to serve the admin port on {host} without GATEWAY_ADMIN_TOKEN; "
            "set a token or bind it to 127.0.0.1"
        )
    secret = secrets.token_urlsafe(32)
    path = state_dir / snapshots.ADMIN_TOKEN
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    log.info("admin token written to %s (set GATEWAY_ADMIN_TOKEN to choose one)", path)
    return (AdminToken("local-admin", secret),)


async def start_admin(plane: ControlPlane, options: ServeOptions, store: Store) -> web.AppRunner | None:
    """Serve the admin API; returns the runner to clean up, or None without an admin port."""
    if options.admin_port is None:
        return None
    tokens = admin_tokens(plane.state_dir, options.admin_host)
    runner = web.AppRunner(build_admin_app(plane, tokens, store), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, options.admin_host, options.admin_port).start()
    log.info("admin API on http://%s:%d", options.admin_host, options.admin_port)
    return runner


async def _stop_admin(runner: web.AppRunner | None) -> None:
    if runner is not None:
        await runner.cleanup()


def _fresh_state(state_dir: Path) -> None:
    """A new gateway starts with no worker snapshots from an earlier run (overrides and audit stay)."""
    snapshots.prepare(state_dir)
    for stale in (state_dir / snapshots.WORKERS).glob("*.json"):
        stale.unlink(missing_ok=True)


async def serve_single(table: RouteTable, options: ServeOptions) -> None:
    """One worker process; in `--workers 1` it also serves the admin port."""
    state_dir = options.state_path()
    if options.admin_port is not None:
        _fresh_state(state_dir)
    else:
        snapshots.prepare(state_dir)
    worker = Worker(
        table,
        WorkerOptions(
            options.config, state_dir, options.worker_index, options.shutdown_timeout, options.stats
        ),
    )
    sock = listen_socket(options.host, options.port, options.reuse_port)
    server = await worker.loop.create_server(worker.connection, sock=sock)
    log.info("serving %s on http://%s:%d (pid %d)", options.config, options.host, options.port, os.getpid())
    if options.grpc_port:
        try:
            bound = await worker.serve_grpc(options.host, options.grpc_port, options.reuse_port)
        except OSError:
            server.close()
            raise
        log.info("serving gRPC (KServe v2) on %s:%d (pid %d)", options.host, bound, os.getpid())

    async def reload_here() -> None:
        worker.reload("admin")

    runner = None
    if options.admin_port is not None:
        plane = ControlPlane(options.config, state_dir, reload_here)
        try:
            # The same store object as the data plane: with the memory store, keys live in this process.
            runner = await start_admin(plane, options, worker.store)
        except (AdminRefused, OSError):
            server.close()
            raise
    try:
        await worker.run([server])
    finally:
        await _stop_admin(runner)


@dataclass
class _Slot:
    """One worker index under the supervisor, across the processes that have served it."""

    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    starts: int = 0
    delay: float = 0.0  # before the latest restart; doubles while the worker keeps dying
    restart_at: float | None = None  # monotonic time to start it again


async def supervise(options: ServeOptions, worker_argv: list[str]) -> int:
    """Run `options.workers` worker processes on one port and the admin port; restart dead workers.

    A worker that dies is started again after a delay that doubles while it keeps dying (RESTART_DELAY
    to MAX_RESTART_DELAY, back to the start once one has stayed up STABLE_AFTER), so a crash loop costs
    little and the other workers keep serving. Only a worker that exits before it ever served (a bad
    routes file, a port taken) stops the gateway, with that worker's exit status: restarting would
    fail the same way.
    """
    loop = asyncio.get_running_loop()
    state_dir = options.state_path()
    _fresh_state(state_dir)
    slots = [_Slot(index) for index in range(options.workers)]
    stopping = asyncio.Event()

    async def start(slot: _Slot) -> None:
        argv = [sys.executable, "-m", "gateway", *worker_argv, "--workers", "1", "--reuse-port"]
        argv += ["--worker-index", str(slot.index), "--state-dir", str(state_dir), "--no-admin"]
        slot.process = await asyncio.create_subprocess_exec(*argv)
        slot.started = time.monotonic()
        slot.starts += 1

    def forward(signum: int) -> None:
        for slot in slots:
            if slot.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)

    def stop(signum: int) -> None:
        stopping.set()
        forward(signum)

    async def reload_all() -> None:
        forward(signal.SIGHUP)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    loop.add_signal_handler(signal.SIGHUP, forward, signal.SIGHUP)
    for slot in slots:
        await start(slot)
    plane = ControlPlane(options.config, state_dir, reload_all)
    table = plane.table()
    store = open_store(table.store.url, table.store.timeout) if table is not None else open_store("memory://")
    try:
        runner = await start_admin(plane, options, store)
    except (AdminRefused, OSError):
        stop(signal.SIGTERM)
        for slot in slots:
            if slot.process is not None:
                await slot.process.wait()
        raise
    status = 0
    try:
        while any(slot.process is not None or slot.restart_at is not None for slot in slots):
            await asyncio.sleep(0.1)
            for slot in slots:
                if slot.process is None:
                    if slot.restart_at is not None and stopping.is_set():
                        slot.restart_at = None
                    elif slot.restart_at is not None and time.monotonic() >= slot.restart_at:
                        slot.restart_at = None
                        await start(slot)
                    continue
                process = slot.process
                if process.returncode is None:
                    continue
                slot.process = None
                code = process.returncode
                if stopping.is_set():
                    status = status or code
                elif slot.starts == 1 and not snapshots.has_snapshot(state_dir, process.pid):
                    log.error("worker %d exited with %s before it served; stopping", slot.index, code)
                    stop(signal.SIGTERM)
                    status = code or 1
                else:
                    _schedule_restart(slot, code, process.pid, plane)
    finally:
        await _stop_admin(runner)
        await store.close()
    return status


def _schedule_restart(slot: _Slot, code: int, pid: int, plane: ControlPlane) -> None:
    now = time.monotonic()
    uptime = now - slot.started
    stable = uptime >= STABLE_AFTER or slot.delay == 0
    slot.delay = RESTART_DELAY if stable else min(MAX_RESTART_DELAY, slot.delay * 2)
    slot.restart_at = now + slot.delay
    plane.record_restart(WorkerRestart(slot.index, pid, code, round(uptime, 3), slot.delay, time.time()))
    log.error(
        "worker %d (pid %d) exited with %s after %.1fs; restarting it in %.1fs (%d restart(s) so far)",
        slot.index,
        pid,
        code,
        uptime,
        slot.delay,
        plane.worker_restarts,
    )


def shared_state_problem(table: RouteTable, workers: int) -> str | None:
    """Why this table cannot run on this many workers, if it cannot."""
    if workers <= 1 or not table.store.url.startswith("memory:"):
        return None
    needs = table.keys.required or table.keys.default_limit is not None
    needs = needs or any(
        model.limit is not None or model.rollout is not None for model in table.models.values()
    )
    # The registry a version's archive is checked against must be the one the admin API registers in.
    needs = needs or any(v.archive for model in table.models.values() for v in model.versions.values())
    if not needs:
        return None
    return (
        f"--workers {workers} with the memory store: keys, limits, rollouts and the version registry "
        "would not be shared between the workers; set store.url to a Redis URL "
        "(REDIS_URL=redis://127.0.0.1:6379/0) or use one worker"
    )


def run(table: RouteTable, options: ServeOptions, worker_argv: list[str]) -> int:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        runner = asyncio.run  # type: ignore[assignment]
    problem = shared_state_problem(table, options.workers)
    if problem is not None:
        print(f"gateway: refusing to start: {problem}", file=sys.stderr)
        return 1
    try:
        if options.workers > 1:
            return runner(supervise(options, worker_argv))
        runner(serve_single(table, options))
        return 0
    except AdminRefused as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except snapshots.UnsafeStateDir as exc:
        print(f"gateway: refusing to start: {exc}", file=sys.stderr)
        return 1
