"""The inside of one local Triton process: PyTriton hosting example model versions, with fault knobs.

Run through `python -m backends.local serve-version`; this module imports PyTriton, which the test process
that only starts and stops versions never needs to import.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import random
import signal
import sys
import sysconfig
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from backends import example
from backends.example import Array
from backends.knobs import HANG_SECONDS, KnobsSource

LOG = logging.getLogger("backends.serve")

# How long Triton waits for in-flight requests and model unload when told to stop. Unloading the Python
# model takes about 2 s, so 3 lets Triton exit cleanly, while its default of 30 s would make every stop
# of a version with a hung request take half a minute.
EXIT_TIMEOUT_S = 3
# How often the hang and delay loops look at the stop flag and the knobs file.
TICK_S = 0.05

InferFn = Callable[[list[Any]], Awaitable[list[dict[str, Array]]]]


class InjectedError(RuntimeError):
    """Raised on purpose by the error-rate knob; Triton answers the request with HTTP 500."""


@dataclass(frozen=True)
class ServeOptions:
    targets: tuple[tuple[str, int], ...]  # (Triton model name, version number)
    http_port: int
    grpc_port: int
    metrics_port: int
    host: str = "127.0.0.1"
    workspace: Path | None = None
    exit_with_parent: bool = False


def ensure_libdir_on_library_path() -> None:
    """The Python backend stub links against libpython; without the interpreter's LIBDIR on
    LD_LIBRARY_PATH model load fails with an `_recursion_count` AttributeError. tritonserver and the stub
    inherit this process's environment, so setting it here is early enough."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


def make_infer(
    version: int,
    compute: Callable[[int, Array], dict[str, Array]],
    knobs: KnobsSource,
    stopping: threading.Event,
) -> InferFn:
    """An async infer function: PyTriton runs it on its event loop, so the sleeps below can be cancelled
    when the server shuts down instead of pinning a thread for an hour."""

    async def sleep_unless_stopping(seconds: float, *, while_hanging: bool = False) -> None:
        deadline = time.monotonic() + seconds
        while not stopping.is_set() and (remaining := deadline - time.monotonic()) > 0:
            # A hang ends early when the knobs file turns it off, so a test can release stuck requests.
            if while_hanging and not knobs.current().hang:
                return
            await asyncio.sleep(min(TICK_S, remaining))

    async def infer(requests: list[Any]) -> list[dict[str, Array]]:
        # Knobs act per call, and with dynamic batching one call can carry several requests: an injected
        # error fails them all, which keeps the expected share of failed requests equal to error_rate.
        k = knobs.current()
        if k.hang:
            await sleep_unless_stopping(HANG_SECONDS, while_hanging=True)
            k = knobs.current()
        if k.delay_ms > 0:
            await sleep_unless_stopping(k.delay_ms / 1000.0)
        if stopping.is_set():
            raise InjectedError("the server is shutting down")
        if k.error_rate > 0 and random.random() < k.error_rate:
            raise InjectedError(f"injected error (error_rate={k.error_rate})")
        return [compute(version, request[example.INPUT_NAME]) for request in requests]

    return infer


def _bind(
    triton: Triton, targets: Sequence[tuple[str, int]], knobs: KnobsSource, stopping: threading.Event
) -> None:
    for model, version in targets:
        compute = example.MODELS.get(model)
        if compute is None:
            raise SystemExit(f"unknown model {model!r}; this launcher serves: {', '.join(example.MODELS)}")
        triton.bind(
            model_name=model,
            model_version=version,
            infer_func=make_infer(version, compute, knobs, stopping),
            inputs=[Tensor(name=t.name, dtype=t.dtype, shape=t.shape) for t in example.INPUTS],
            outputs=[Tensor(name=t.name, dtype=t.dtype, shape=t.shape) for t in example.OUTPUTS],
            config=ModelConfig(max_batch_size=example.MAX_BATCH_SIZE, batcher=DynamicBatcher()),
            strict=True,
        )


def _wait_live(host: str, port: int, timeout: float) -> None:
    """Poll Triton's liveness quickly: PyTriton's own wait sleeps a whole second between polls, which is
    a third of the start-up time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, port, timeout=1.0)
        try:
            conn.request("GET", "/v2/health/live")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.02)


def _start(triton: Triton, host: str, port: int) -> None:
    # _run_server is private; if a PyTriton release renames it, run() alone still works, one second slower.
    run_server = getattr(triton, "_run_server", None)
    if callable(run_server):
        run_server()
        _wait_live("127.0.0.1" if host in ("0.0.0.0", "") else host, port, timeout=60.0)
    triton.run()


def serve(options: ServeOptions, knobs: KnobsSource) -> int:
    """Host the versions until SIGTERM or SIGINT (or the parent's death, if asked); returns the exit code."""
    ensure_libdir_on_library_path()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        LOG.info("%s received, stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()

    config = TritonConfig(
        http_address=options.host,
        http_port=options.http_port,
        grpc_address=options.host,
        grpc_port=options.grpc_port,
        metrics_address=options.host,
        metrics_port=options.metrics_port,
        allow_gpu_metrics=False,
        exit_timeout_secs=EXIT_TIMEOUT_S,
        log_verbose=0,
    )
    triton = Triton(config=config, workspace=options.workspace)
    try:
        _bind(triton, options.targets, knobs, stopping)
        _start(triton, options.host, options.http_port)
        names = ", ".join(f"{m}/{v}" for m, v in options.targets)
        print(f"serving {names} on http://{options.host}:{options.http_port}", flush=True)
        while not stopping.wait(0.2):
            if not triton.is_alive():
                LOG.error("tritonserver exited on its own")
                return 1
            if options.exit_with_parent and os.getppid() != parent:
                LOG.warning("parent process %d is gone, stopping", parent)
                break
        return 0
    finally:
        stopping.set()
        triton.stop()
        sys.stdout.flush()
