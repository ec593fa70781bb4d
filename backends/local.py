"""Real Triton servers on the CPU for `make run` and the tests: one process per model version.

One PyTriton process cannot host two versions of one model name (the second fails with "Address already in
use"), so each version gets its own process with its own HTTP, gRPC and metrics ports, as production
deployments often do anyway. Each process runs in its own session, so stopping or killing it reaches
tritonserver and the Python backend stubs too and nothing is left behind.

    with start_version("fraud_detector", 3, free_port()) as v3:
        tritonclient.http.InferenceServerClient(v3.url.removeprefix("http://")) ...

Command line: `python -m backends.local serve-version ...` hosts one version in the foreground,
`python -m backends.local up --routes routes.yaml` hosts every local backend a routes file names.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from backends.example import MODELS
from backends.knobs import Knobs, KnobsSource

LOG = logging.getLogger("backends.local")
REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 10.0
LEFTOVER_GRACE_S = 2.0  # after tritonserver exits, for its stubs to follow it
_handed_out: set[int] = set()
_running: set[TritonProcess] = set()


class StartError(RuntimeError):
    """A version did not become ready; the message ends with the tail of its log."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (and not handed out earlier by this process)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers bind: connections lingering in TIME_WAIT after a restart do not make a port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class VersionSpec:
    """One process to start: the versions it hosts (normally one), its ports and its fault knobs."""

    targets: tuple[tuple[str, int], ...]
    http_port: int
    grpc_port: int | None = None  # None: any free port
    metrics_port: int | None = None
    delay_ms: float = 0.0
    error_rate: float = 0.0
    knobs_file: str | os.PathLike[str] | None = None
    log_path: str | os.PathLike[str] | None = None  # None: a temporary file, removed on stop

    @classmethod
    def one(
        cls,
        model: str,
        version: int,
        http_port: int,
        *,
        delay_ms: float = 0.0,
        error_rate: float = 0.0,
        knobs_file: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> VersionSpec:
        """The usual case: a process hosting one version, with gRPC and metrics on any free port."""
        return cls(
            targets=((model, version),),
            http_port=http_port,
            delay_ms=delay_ms,
            error_rate=error_rate,
            knobs_file=knobs_file,
            log_path=log_path,
        )


class TritonProcess:
    """A running `serve-version` process. Use `start_version`/`start_versions` to get one that is ready."""

    def __init__(self, spec: VersionSpec) -> None:
        Knobs(delay_ms=spec.delay_ms, error_rate=spec.error_rate)  # fail here, not in the child
        unknown = sorted({m for m, _ in spec.targets} - set(MODELS))
        if unknown:
            raise StartError(f"unknown model(s) {unknown}; this launcher serves: {', '.join(MODELS)}")
        for port in (spec.http_port, spec.grpc_port, spec.metrics_port):
            if port is not None and not port_is_free(port):
                raise StartError(f"port {port} is already in use on 127.0.0.1")
        self.targets = spec.targets
        self.http_port = spec.http_port
        self.grpc_port = spec.grpc_port or free_port()
        self.metrics_port = spec.metrics_port or free_port()
        self._workdir = Path(tempfile.mkdtemp(prefix="triton-local-"))
        self.log_path = Path(spec.log_path) if spec.log_path else self._workdir / "triton.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._last_log = "(no log)"
        self._proc = self._spawn(spec)
        _running.add(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def _spawn(self, spec: VersionSpec) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "backends.local", "serve-version", "--exit-with-parent"]
        for model, version in spec.targets:
            cmd += ["--target", f"{model}/{version}"]
        cmd += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        cmd += ["--metrics-port", str(self.metrics_port), "--workspace", str(self._workdir / "workspace")]
        cmd += ["--delay-ms", str(spec.delay_ms), "--error-rate", str(spec.error_rate)]
        if spec.knobs_file is not None:
            cmd += ["--knobs-file", os.fspath(spec.knobs_file)]
        env = dict(os.environ)
        # The stub needs libpython's directory (see serve.ensure_libdir_on_library_path); the child sets it
        # too, this just makes the environment right from the first exec.
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )

    def _ready(self) -> bool:
        paths = ["/v2/health/ready"] + [f"/v2/models/{m}/versions/{v}/ready" for m, v in self.targets]
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=2.0)
        try:
            for path in paths:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    return False
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready():
            if not self.alive():
                code = self._proc.returncode
                self.kill()
                raise StartError(f"{self._name()} exited with code {code} while starting\n{self.logs()}")
            if time.monotonic() > deadline:
                self.kill()
                raise StartError(f"{self._name()} not ready after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.05)

    def logs(self, lines: int = 40) -> str:
        """The last lines of the process's log (tritonserver's and PyTriton's output)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = self._last_log
        return "\n".join(text.splitlines()[-lines:])

    def _name(self) -> str:
        return f"Triton {', '.join(f'{m}/{v}' for m, v in self.targets)} on port {self.http_port}"

    def signal_stop(self) -> None:
        """Ask the process to stop (SIGTERM) without waiting; `stop()` then waits."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """Stop gracefully (SIGTERM: Triton unloads and exits, about 4 s); SIGKILL after `timeout`."""
        self.signal_stop()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            LOG.warning("%s did not stop within %.0f s, killing it", self._name(), timeout)
        else:
            # The Python stubs exit just after tritonserver does: give them a moment before calling
            # them left behind (one reading, so the warning names what was really still there).
            deadline = time.monotonic() + LEFTOVER_GRACE_S
            while (left := self.leftovers()) and time.monotonic() < deadline:
                time.sleep(0.02)
            if left:
                LOG.warning("%s left processes %s behind, killing them", self._name(), left)
        self.kill()

    def kill(self) -> None:
        """Kill the whole process group at once, like a crash; also reaps and cleans up after it."""
        shared = self._shared_memory() if self.alive() else set()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        # SIGKILL is delivered asynchronously: wait until the port and memory are really released.
        deadline = time.monotonic() + 5.0
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._cleanup(shared)

    def leftovers(self) -> list[int]:
        """Live processes of this version's process group (tritonserver, stubs); [] once it is stopped.

        Zombies do not count: they hold no port or memory, and where PID 1 does not reap orphans (some
        sandboxes) they would otherwise look alive forever.
        """
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # Fields after the command name, which may itself contain spaces and parentheses.
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self._proc.pid and fields[0] not in ("Z", "X"):
                    found.append(int(stat.parent.name))
        return found

    def _shared_memory(self) -> set[Path]:
        """PyTriton's and the Python backend's shared memory segments, found through the group's mappings:
        a graceful stop removes them, a SIGKILL does not."""
        found = set()
        for pid in self.leftovers():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                    path = line.split(maxsplit=5)[-1]
                    if path.startswith(("/dev/shm/psm_", "/dev/shm/pytrtion")):
                        found.add(Path(path.removesuffix(" (deleted)")))
        return found

    def _cleanup(self, shared: set[Path]) -> None:
        _running.discard(self)
        for segment in shared:
            segment.unlink(missing_ok=True)
        if self.log_path.parent == self._workdir:
            self._last_log = self.logs(200)  # the temporary log goes with the directory; keep its tail
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> TritonProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<TritonProcess {self._name()} pid={self.pid} alive={self.alive()}>"


def start_versions(specs: Sequence[VersionSpec], *, ready_timeout: float = 120.0) -> list[TritonProcess]:
    """Start several processes at once and wait until all are ready; on failure none is left running.

    Starting in parallel overlaps the processes' start-up waits, so two versions take little longer than one.
    """
    procs: list[TritonProcess] = []
    try:
        for spec in specs:
            procs.append(TritonProcess(spec))
        for proc in procs:
            proc.wait_ready(ready_timeout)
    except BaseException:
        stop_all(procs)
        raise
    return procs


def start_version(
    model: str,
    version: int,
    http_port: int,
    *,
    delay_ms: float = 0.0,
    error_rate: float = 0.0,
    knobs_file: str | os.PathLike[str] | None = None,
    ready_timeout: float = 120.0,
) -> TritonProcess:
    """Start one version in its own Triton process and wait until it is ready to infer."""
    spec = VersionSpec.one(
        model, version, http_port, delay_ms=delay_ms, error_rate=error_rate, knobs_file=knobs_file
    )
    return start_versions([spec], ready_timeout=ready_timeout)[0]


def stop_all(procs: Iterable[TritonProcess], timeout: float = STOP_GRACE_S) -> None:
    """Stop several processes in parallel: all get SIGTERM first, so their shutdowns overlap."""
    procs = list(procs)
    for proc in procs:
        proc.signal_stop()
    for proc in procs:
        proc.stop(timeout)


@atexit.register
def _stop_forgotten() -> None:
    # The children also stop when they notice this process is gone; this just makes it quicker.
    stop_all(list(_running), timeout=5.0)


def _parse_target(text: str) -> tuple[str, int]:
    model, sep, version = text.rpartition("/")
    if not sep or not model or not version.isdigit():
        raise argparse.ArgumentTypeError(f"expected MODEL/VERSION such as fraud_detector/3, got {text!r}")
    return model, int(version)


def _serve_version(args: argparse.Namespace) -> int:
    from backends.serve import ServeOptions, serve

    targets: list[tuple[str, int]] = list(args.target or [])
    if args.model is not None or args.version is not None:
        if args.model is None or args.version is None:
            raise SystemExit("--model and --version go together")
        targets.insert(0, (args.model, args.version))
    if not targets:
        raise SystemExit("name the version to serve: --model NAME --version N (or --target NAME/N)")
    names = [m for m, _ in targets]
    if unknown := sorted(set(names) - set(MODELS)):
        raise SystemExit(f"unknown model(s) {unknown}; this launcher serves: {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise SystemExit("one process cannot host two versions of one model name; start one per version")
    try:
        knobs = KnobsSource(Knobs(delay_ms=args.delay_ms, error_rate=args.error_rate), args.knobs_file)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    options = ServeOptions(
        targets=tuple(targets),
        http_port=args.http_port,
        grpc_port=args.grpc_port or args.http_port + 1,
        metrics_port=args.metrics_port or args.http_port + 2,
        host=args.host,
        workspace=args.workspace,
        exit_with_parent=args.exit_with_parent,
    )
    return serve(options, knobs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backends.local", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sv = commands.add_parser("serve-version", help="host one model version until SIGTERM/SIGINT")
    sv.add_argument("--model", help="Triton model name, e.g. fraud_detector")
    sv.add_argument("--version", type=int, help="Triton version number, e.g. 3")
    sv.add_argument("--target", type=_parse_target, action="append", help="NAME/N; repeatable (other names)")
    sv.add_argument("--http-port", type=int, required=True)
    sv.add_argument("--grpc-port", type=int, help="default: HTTP port + 1")
    sv.add_argument("--metrics-port", type=int, help="default: HTTP port + 2")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--delay-ms", type=float, default=0.0, help="extra latency per request")
    sv.add_argument("--error-rate", type=float, default=0.0, help="probability that a request fails (500)")
    sv.add_argument(
        "--knobs-file",
        help='JSON {"delay_ms": 0, "error_rate": 0.0, "hang": false}, re-read when it changes',
    )
    sv.add_argument("--workspace", type=Path, help="PyTriton workspace; must not exist yet")
    sv.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process dies")
    sv.set_defaults(func=_serve_version)

    from backends import up  # here, not at the top: up imports this module

    up.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("backends").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    # Run main() of the imported module rather than of this __main__ copy, so that the CLI and backends.up
    # share one module state (the set of running processes that atexit stops).
    from backends.local import main as _main

    sys.exit(_main())
