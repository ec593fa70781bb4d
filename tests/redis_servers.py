"""Real Redis for tests: servers that the tests start and stop themselves, on free ports, in temp dirs.

- `RedisServer`: one `redis-server` (no persistence; optionally a password, or TLS with a self-signed
  certificate made by `openssl`). `stop()` and `start()` again on the same port simulate
  an outage; `freeze()`/`thaw()` (SIGSTOP/SIGCONT) simulate a Redis that accepts nothing and answers nothing.
- `RedisClusterNodes`: three cluster-enabled servers joined with `redis-cli --cluster create`, no replicas.
- `SentinelSetup`: one master and one sentinel monitoring it as service `gw`.

Every helper raises `RedisStartError` with the server's log when it cannot start, so a broken environment
fails loudly instead of skipping.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
_handed_out: set[int] = set()


class RedisStartError(RuntimeError):
    pass


def free_port(bus: bool = False) -> int:
    """A port free on 127.0.0.1 now; with `bus`, port + 10000 (the cluster bus) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port in _handed_out or (bus and (port + 10000 > 65535 or not _is_free(port + 10000))):
            continue
        _handed_out.add(port)
        return port
    raise RedisStartError("no free port")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies without cleaning up (Linux; elsewhere a no-op).
    Linux ties this to the thread that started the server: start servers from a long-lived thread."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def cli(port: int, *args: str, timeout: float = 5.0) -> str:
    """Run `redis-cli -p port args...` and return its output (raises on failure)."""
    done = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return done.stdout


class RedisServer:
    """One redis-server process; `start()` may be called again after `stop()` (same port, same dir)."""

    def __init__(
        self,
        port: int | None = None,
        args: tuple[str, ...] = (),
        bus: bool = False,
        password: str | None = None,
        tls: bool = False,
    ) -> None:
        self.port = port or free_port(bus=bus)
        self.dir = Path(tempfile.mkdtemp(prefix=f"redis-{self.port}-"))
        self.args = args + (("--requirepass", password) if password else ())
        self.password = password
        self.tls = tls
        self.log = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> Path:
        return self.dir / "cert.pem"  # self-signed: the certificate is its own CA

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        command = [REDIS_SERVER, "--bind", "127.0.0.1", "--dir", str(self.dir)]
        command += ["--save", "", "--appendonly", "no", "--logfile", str(self.log), *self.args]
        if self.tls:
            if not self.ca_file.exists():
                self._make_certificate()
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            command += ["--tls-cert-file", str(self.ca_file), "--tls-key-file", str(self.dir / "key.pem")]
        else:
            command += ["--port", str(self.port)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        self._wait_ready(timeout)
        return self

    def _make_certificate(self) -> None:
        files = ["-keyout", str(self.dir / "key.pem"), "-out", str(self.ca_file)]
        subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *files, *subject],
            capture_output=True,
            check=True,
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RedisStartError(f"redis-server on {self.port} exited: {self.read_log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as raw:
                sock = raw
                if self.tls:
                    context = ssl.create_default_context(cafile=self.ca_file)
                    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return
            time.sleep(0.01)
        raise RedisStartError(f"redis-server on {self.port} not ready in {timeout}s: {self.read_log()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); waits until it is gone and its port is closed."""
        if self.process is None:
            return
        self.thaw()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def freeze(self) -> None:
        """Suspend the process: connections stay open but nothing is answered (a hung Redis)."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def read_log(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else "(no log)"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterNodes:
    """Three masters, no replicas, slots split by `redis-cli --cluster create`."""

    def __init__(self, size: int = 3) -> None:
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        args += ("--cluster-node-timeout", "2000")
        self.nodes = [RedisServer(args=args, bus=True) for _ in range(size)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterNodes:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            cli(
                self.nodes[0].port,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
                timeout=timeout,  # it waits for the nodes to agree: seconds, longer on a busy machine
            )
            deadline = time.monotonic() + timeout
            while not all("cluster_state:ok" in cli(n.port, "CLUSTER", "INFO") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RedisStartError("cluster_state never became ok")
                time.sleep(0.05)
        except (subprocess.SubprocessError, RedisStartError) as exc:
            logs = "\n".join(f"--- node {n.port}:\n{n.read_log()}" for n in self.nodes)
            output = getattr(exc, "stdout", "") or ""
            self.cleanup()
            raise RedisStartError(f"cluster did not start: {exc}\n{output}\n{logs}") from exc
        return self

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class SentinelSetup:
    """A master and one sentinel monitoring it (quorum 1) as service `gw`."""

    SERVICE = "gw"

    def __init__(self) -> None:
        self.master = RedisServer()
        self.sentinel_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"sentinel-{self.sentinel_port}-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.SERVICE}/0"

    def start(self, timeout: float = 10.0) -> SentinelSetup:
        self.master.start()
        conf = self.dir / "sentinel.conf"  # sentinel rewrites its config file, so it must be writable
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"logfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 5000\n"
        )
        self.process = subprocess.Popen(
            [REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.SubprocessError):
                out = cli(self.sentinel_port, "SENTINEL", "get-master-addr-by-name", self.SERVICE, timeout=1)
                if str(self.master.port) in out:
                    return self
            time.sleep(0.05)
        log = (self.dir / "sentinel.log").read_text(errors="replace") if self.dir.exists() else ""
        self.cleanup()
        raise RedisStartError(f"sentinel did not start: {log[-4000:]}")

    def cleanup(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(5)
            self.process = None
        self.master.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)
