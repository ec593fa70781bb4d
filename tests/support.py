"""Helpers shared by the tests: free ports, a gateway subprocess, a raw HTTP/1.1 client."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


@dataclass
class GatewayProcess:
    """A `gateway serve` subprocess on a free port, with its routes file and log."""

    routes: str
    workers: int = 1
    extra_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    grpc_port: int = 0  # 0: no gRPC port (the default 8001 would clash between tests)
    admin_token: str = "test-admin-token"
    more_tokens: str = ""  # further GATEWAY_ADMIN_TOKEN entries, e.g. "viewer:viewer-secret:read"
    process: subprocess.Popen[bytes] | None = None
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gateway-test-")))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def routes_path(self) -> Path:
        return self.directory / "routes.yaml"

    @property
    def log_path(self) -> Path:
        return self.directory / "gateway.log"

    def start(self) -> GatewayProcess:
        self.routes_path.write_text(self.routes)
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(self.routes_path)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]
        argv += ["--admin-port", str(self.admin_port), "--state-dir", str(self.directory / "state")]
        argv += ["--grpc-port", str(self.grpc_port)]
        argv += self.extra_args
        tokens = ",".join(t for t in (f"tester:{self.admin_token}", self.more_tokens) if t)
        env = {**os.environ, "GATEWAY_ADMIN_TOKEN": tokens}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            wait_for_port(self.port, process=self.process)
            if self.grpc_port:
                wait_for_port(self.grpc_port, process=self.process)
            if "--no-admin" not in self.extra_args:
                wait_for_port(self.admin_port, process=self.process)
            if self.workers > 1:
                time.sleep(0.5)  # let every worker bind, not just the first
        except Exception:
            self.stop()
            raise RuntimeError(f"gateway did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def gateway(routes: str, workers: int = 1, extra_args: list[str] | None = None) -> Iterator[GatewayProcess]:
    process = GatewayProcess(routes, workers, extra_args or [])
    with process:
        yield process


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool = False

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}


class RawClient:
    """An HTTP/1.1 client over a plain socket, for sending exactly the bytes a test wants."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self._buffer += chunk
        return True

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            if not self._fill():
                raise ConnectionError(f"connection closed; got {self._buffer[:200]!r}")
        data, _, self._buffer = self._buffer.partition(marker)
        return data

    def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not self._fill():
                raise ConnectionError(f"connection closed after {len(self._buffer)} of {size} bytes")
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def read_interim(self) -> bytes:
        """Read a 1xx interim response head (e.g. 100 Continue)."""
        return self._read_until(b"\r\n\r\n")

    def read_response(self, head_request: bool = False) -> Response:
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = head.split("\r\n")
        _, status, reason = [*status_line.split(" ", 2), ""][:3]
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
        response = Response(int(status), reason, headers, b"")
        length = response.header("content-length")
        if head_request:
            return response
        if (response.header("transfer-encoding") or "").lower() == "chunked":
            response.chunked = True
            body = b""
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._read_until(b"\r\n")
                    break
                body += self._read_exactly(size)
                self._read_exactly(2)
            response.body = body
        elif length is not None:
            response.body = self._read_exactly(int(length))
        else:
            while self._fill():
                pass
            response.body, self._buffer = self._buffer, b""
        return response

    def is_closed(self, wait: float = 2.0) -> bool:
        """True if the server closed the connection (EOF) within `wait` seconds."""
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        self._buffer += chunk
        return chunk == b""


def request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, version: str = "1.1"
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: gateway"]
    all_headers = {"Content-Length": str(len(body))} if body or method == "POST" else {}
    all_headers.update(headers or {})
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def env_with_path() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env
