"""A plain `tritonserver` in explicit model-control mode: models arrive through its repository API.

nvidia-pytriton ships the binary, its libraries and Python backend stubs per interpreter version; this
starts that binary directly (no PyTriton in between) with the Python backend, so archives of Python
backend models can be loaded into it with `gateway archive deploy`, as into any production Triton.

    with start_repository_server(free_port()) as triton:
        ... POST {triton.url}/v2/repository/models/NAME/load ...

Two facts of this machine apply (DESIGN.md section 5): the Python stub needs the interpreter's LIBDIR on
LD_LIBRARY_PATH, and a model name hosts one version per process when each load replaces the model's
files, so run one server per version of a model name, as `make run` does.

Command line: `python -m backends.repository_server --http-port 8010 [--repository DIR]`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import http.client
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from backends.local import free_port, port_is_free

STOP_GRACE_S = 10.0
KNOBS_ENV = "FRAUD_DETECTOR_KNOBS"  # read by backends/python_repository/fraud_detector/*/model.py
EXIT_TIMEOUT_S = 3  # Triton's own wait for in-flight requests and unloads when told to stop
_running: set[RepositoryServer] = set()


class StartError(RuntimeError):
    """The server did not come up; the message ends with the tail of its log."""


def _distribution() -> tuple[Path, Path]:
    """(pytriton's tritonserver directory, the directory of its shared libraries)."""
    spec = importlib.util.find_spec("pytriton")  # its location only: importing it costs a second
    if spec is None or spec.origin is None:
        raise StartError("nvidia-pytriton is not installed; it carries the tritonserver binary")
    root = Path(spec.origin).resolve().parent
    libs = root.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():  # an editable PyTriton keeps them inside the package
        libs = root / "tritonserver" / "external_libs"
    return root / "tritonserver", libs


def _die_with_parent() -> None:
    # Linux: SIGTERM when the process that started us dies, so a killed test run leaves no server behind.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RepositoryServer:
    """A running tritonserver; use `start_repository_server` to get one that is live."""

    def __init__(
        self,
        http_port: int,
        *,
        grpc_port: int | None = None,
        repository: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        knobs_file: str | os.PathLike[str] | None = None,
    ) -> None:
        for port in (http_port, grpc_port):
            if port is not None and not port_is_free(port):
                raise StartError(f"port {port} is already in use on 127.0.0.1")
        self.http_port = http_port
        self.grpc_port = grpc_port or free_port()
        self._workdir = Path(tempfile.mkdtemp(prefix="triton-repository-"))
        self.repository = Path(repository) if repository is not None else self._workdir / "models"
        self.repository.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_path) if log_path else self._workdir / "triton.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._shm_prefix = f"gw{os.getpid()}p{http_port}_"
        # The example models' fault knobs (backends/knobs.py): their model.py reads this file's path from
        # KNOBS_ENV, so `make demo` can make the canary fail while it serves.
        self.knobs_file = Path(knobs_file) if knobs_file is not None else None
        self._proc = self._spawn()
        _running.add(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def _backends(self, dist: Path) -> Path:
        """Triton's backend directory with the Python backend stub built for this interpreter."""
        python = self._workdir / "backends" / "python"
        python.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy(dist / "backends" / "python" / name, python / name)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise StartError(f"nvidia-pytriton has no Python backend stub for Python {version}")
        shutil.copy(stub, python / "triton_python_backend_stub")
        return python.parent

    def _spawn(self) -> subprocess.Popen[bytes]:
        dist, libs = _distribution()
        cmd = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={self._backends(dist)}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            "--log-verbose=0",
        ]
        env = dict(os.environ)
        env.pop(KNOBS_ENV, None)
        if self.knobs_file is not None:
            env[KNOBS_ENV] = str(self.knobs_file.resolve())
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH")) if p
        )
        # The stub starts an interpreter that finds its packages (numpy) through the python on PATH.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _live(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=2.0)
        try:
            conn.request("GET", "/v2/health/live")
            response = conn.getresponse()
            response.read()
            return response.status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def wait_live(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._live():
            if not self.alive() or time.monotonic() > deadline:
                why = (
                    f"exited with code {self._proc.returncode}"
                    if not self.alive()
                    else f"not live after {timeout:g} s"
                )
                logs = self.logs()
                self.kill()
                raise StartError(f"tritonserver on port {self.http_port} {why}\n{logs}")
            time.sleep(0.05)

    def logs(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """SIGTERM (Triton unloads its models and exits), SIGKILL for the whole group after `timeout`."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)  # the stubs too
        self._proc.wait()
        _running.discard(self)
        for segment in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            segment.unlink(missing_ok=True)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> RepositoryServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RepositoryServer port {self.http_port} pid={self.pid} alive={self.alive()}>"


def start_repository_server(
    http_port: int,
    *,
    grpc_port: int | None = None,
    repository: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    knobs_file: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> RepositoryServer:
    """Start tritonserver (explicit model control, no model loaded) and wait until it is live."""
    server = RepositoryServer(
        http_port, grpc_port=grpc_port, repository=repository, log_path=log_path, knobs_file=knobs_file
    )
    server.wait_live(timeout)
    return server


@atexit.register
def _stop_forgotten() -> None:
    for server in list(_running):
        server.stop(timeout=5.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backends.repository_server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, help="default: any free port")
    parser.add_argument("--repository", help="model repository to load from by name (default: an empty one)")
    args = parser.parse_args(argv)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    with start_repository_server(
        args.http_port, grpc_port=args.grpc_port, repository=args.repository
    ) as server:
        print(f"tritonserver (explicit model control) at {server.url}; logs in {server.log_path}", flush=True)
        while not stop and server.alive():
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
