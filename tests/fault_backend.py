"""FAKE BACKEND, named as such: a raw HTTP/1.1 server that misbehaves on demand.

Real Triton cannot be made to answer chunked, to cut a response in half, or to send garbage, so the
conformance tests use this server for exactly those faults, and for echoing what the gateway sent
upstream. Everything else is tested against real Triton.

Readiness probes (`/v2/health/ready`, `.../ready`) are always answered 200, as a healthy Triton would.
The behaviour of inference requests is chosen by the Triton model name in the path the gateway forwards to,
`/v2/models/<behaviour>/versions/<n>/infer`:

- `echo`: 200 with JSON {"path", "headers", "body"} describing the request as received
- `chunked`: 200, the request body sent back with Transfer-Encoding: chunked in three pieces
- `cut`: promises 1000 bytes, sends 10, closes
- `drop`: closes without answering
- `garbage`: answers bytes that are not HTTP
- `hang`: never answers
- `hop`: 200 with hop-by-hop headers that a proxy must not pass on
- `big`: 200 with as many bytes as the request body's decimal number says
- `upgrade`: 101 Switching Protocols, as a backend that wants another protocol would
- `afterbytes`: 200, then, a moment later, stray bytes on the now idle connection
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    request_line, *lines = head[:-4].split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return request_line.split(" ")[1], headers, body


def _ok(body: bytes, extra: str = "") -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra}content-length: {len(body)}\r\n\r\n"
    return head.encode() + body


Received = list[tuple[str, dict[str, str], bytes]]


async def _serve(received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            path, headers, body = await _read_request(reader)
            received.append((path, headers, body))
            behaviour = path.split("/")[3] if path.count("/") >= 3 else "echo"
            if path.startswith("/v2/health/") or path.endswith("/ready"):
                writer.write(_ok(b"{}"))  # the gateway's health checks: every behaviour is "ready"
            elif behaviour == "echo":
                writer.write(
                    _ok(
                        json.dumps(
                            {"path": path, "headers": headers, "body": body.decode("latin-1")}
                        ).encode()
                    )
                )
            elif behaviour == "chunked":
                pieces = [
                    body[: len(body) // 3],
                    body[len(body) // 3 : 2 * len(body) // 3],
                    body[2 * len(body) // 3 :],
                ]
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n")
                writer.write(b"transfer-encoding: chunked\r\n\r\n")
                for piece in pieces:
                    if piece:
                        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        await writer.drain()
                        await asyncio.sleep(0.01)
                writer.write(b"0\r\n\r\n")
            elif behaviour == "cut":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                await writer.drain()
                break
            elif behaviour == "drop":
                break
            elif behaviour == "garbage":
                writer.write(b"THIS IS NOT HTTP\r\n\r\n")
                await writer.drain()
                break
            elif behaviour == "hang":
                await asyncio.sleep(3600)
            elif behaviour == "hop":
                extra = (
                    "connection: keep-alive, x-hop-secret\r\nkeep-alive: timeout=5\r\nx-hop-secret: 1\r\n"
                    "proxy-authenticate: Basic\r\nupgrade: h2c\r\nx-end-to-end: kept\r\n"
                )
                writer.write(_ok(b"{}", extra))
            elif behaviour == "big":
                writer.write(_ok(b"x" * int(body or b"0")))
            elif behaviour == "upgrade":
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: Upgrade\r\n\r\n"
                )
                await writer.drain()
                await asyncio.sleep(1)
                break
            elif behaviour == "afterbytes":
                writer.write(_ok(b"{}"))
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")  # answers nothing asked
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class FaultBackend:
    """Runs the fake backend on its own event loop in a background thread."""

    def __init__(self) -> None:
        self.port = 0
        self.received: Received = []  # every request, as (path, headers, body), in arrival order
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(functools.partial(_serve, self.received), "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def inference_requests(self) -> Received:
        """What was received, less the gateway's readiness probes."""
        return [r for r in self.received if not (r[0].startswith("/v2/health/") or r[0].endswith("/ready"))]

    def start(self) -> FaultBackend:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        """Cancel the handlers still waiting (hang, idle keep-alive) while the loop runs, then stop it.

        Handlers left suspended would be finalized after the loop is closed and raise "Event loop is
        closed" as unraisable exceptions at an arbitrary later point of the test run.
        """

        def quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            # asyncio's stream server reports a cancelled handler as an error; here it is intended.
            if not isinstance(context.get("exception"), asyncio.CancelledError):
                loop.default_exception_handler(context)

        async def cancel_all() -> None:
            asyncio.get_running_loop().set_exception_handler(quiet)
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@contextmanager
def fault_backend() -> Iterator[FaultBackend]:
    backend = FaultBackend().start()
    try:
        yield backend
    finally:
        backend.stop()
