"""Running the gateway: one event loop per process, and a supervisor for `--workers N`.

Each worker binds its own listening socket with SO_REUSEPORT, so the kernel spreads connections over
the workers with no hand-off through the supervisor. The supervisor only starts workers, restarts one
that dies, and passes SIGTERM / SIGINT on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from gateway.deadlines import Deadlines, resolution_for
from gateway.http_server import ClientConnection
from gateway.proxy import Gateway
from gateway.table import RouteTable

log = logging.getLogger("gateway.server")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    config: str
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    reuse_port: bool = False
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM


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


def not_yet_enforced(table: RouteTable) -> list[str]:
    """Settings the file may hold that this build accepts but does not act on yet."""
    notes = []
    for model in table.models.values():
        if model.rollout is not None:
            notes.append(f"model {model.name}: rollout is not automated yet; the split in the file applies")
        if model.limit is not None:
            notes.append(f"model {model.name}: limit is not enforced yet")
    if table.keys.required:
        notes.append("keys.required is true and there is no key store yet: inference answers 401")
    if table.keys.default_limit is not None:
        notes.append("keys.default_limit is not enforced yet")
    return notes


async def serve_forever(table: RouteTable, options: ServeOptions) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let requests in flight finish."""
    loop = asyncio.get_running_loop()
    gateway = Gateway(table, loop)
    settings = table.server
    resolution = resolution_for(settings.header_timeout, settings.body_timeout, settings.keepalive_timeout)
    connections: Deadlines[ClientConnection] = Deadlines(loop, resolution)

    def connection() -> ClientConnection:
        return ClientConnection(gateway.handle, gateway.respond_error, settings, connections)

    for note in not_yet_enforced(table):
        log.warning("%s", note)
    sock = listen_socket(options.host, options.port, options.reuse_port)
    server = await loop.create_server(connection, sock=sock)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("serving %s on http://%s:%d (pid %d)", table.source, options.host, options.port, os.getpid())
    await stop.wait()

    log.info("shutting down: %d open connection(s)", len(connections))
    server.close()
    for conn in list(connections):
        conn.shutdown()
    deadline = loop.time() + options.shutdown_timeout
    while connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if connections:
        log.warning(
            "%d connection(s) still busy after %gs; closing them", len(connections), options.shutdown_timeout
        )
    connections.close()
    await gateway.close()


def run_worker(table: RouteTable, options: ServeOptions) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        asyncio.run(serve_forever(table, options))
    else:
        uvloop.run(serve_forever(table, options))
    return 0


def supervise(options: ServeOptions, worker_argv: list[str]) -> int:
    """Run `options.workers` worker processes sharing one port; restart any that dies on its own."""
    stopping = False
    workers: dict[int, subprocess.Popen[bytes]] = {}
    started: dict[int, float] = {}

    def start(index: int) -> None:
        argv = [sys.executable, "-m", "gateway", *worker_argv, "--workers", "1", "--reuse-port"]
        workers[index] = subprocess.Popen(argv)
        started[index] = time.monotonic()

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in workers.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(options.workers):
        start(index)
    status = 0
    while workers:
        time.sleep(0.2)
        for index, process in list(workers.items()):
            code = process.poll()
            if code is None:
                continue
            del workers[index]
            if stopping:
                status = status or code
            elif time.monotonic() - started[index] < 5:
                log.error("worker %d exited with %s right after starting; stopping", index, code)
                forward(signal.SIGTERM, None)
                status = code or 1
            else:
                log.error("worker %d exited with %s; restarting it", index, code)
                start(index)
    return status
