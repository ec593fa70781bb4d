"""Running wrk and reading its report.

wrk's text report is the interface here (it is stable across wrk 4.x): times carry units (us, ms, s,
m, h), and error lines appear only when there were errors, so a missing error line means zero, while
a missing headline (requests, Requests/sec, the latency distribution) means the output was not
understood, and that is an error, never a silent zero.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from procs import pinned

INFER_BODY = '{"inputs":[{"name":"INPUT__0","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'

LUA_SCRIPT = f"""-- POSTs one small KServe v2 JSON request; wrk adds Content-Length itself.
wrk.method = "POST"
wrk.body = '{INFER_BODY}'
wrk.headers["Content-Type"] = "application/json"
"""

_TIME_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}

_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", re.M)
_RPS = re.compile(r"^Requests/sec:\s*([\d.]+)", re.M)
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_LATENCY_AVG = re.compile(r"^\s*Latency\s+([\d.]+)(us|ms|s|m|h)\s", re.M)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s*(\d+)", re.M)
_SOCKET = re.compile(r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M)


class WrkError(RuntimeError):
    pass


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    latency_avg_us: float
    p50_us: float
    p75_us: float
    p90_us: float
    p99_us: float
    non_2xx: int  # wrk counts status > 399 here; 3xx would be fine for it, and never happens here
    socket_errors: dict[str, int]

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _to_us(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_US[unit]


def parse(output: str) -> WrkResult:
    """Reads a wrk --latency report; raises WrkError if a figure we rely on is missing."""
    requests = _REQUESTS.search(output)
    rps = _RPS.search(output)
    avg = _LATENCY_AVG.search(output)
    percentiles = {int(m[1]): _to_us(m[2], m[3]) for m in _PERCENTILE.finditer(output)}
    missing = [
        name
        for name, found in (
            ("'N requests in T'", requests),
            ("'Requests/sec'", rps),
            ("'Latency' average", avg),
            ("'Latency Distribution' (was --latency passed?)", len(percentiles) == 4),
        )
        if not found
    ]
    if missing or requests is None or rps is None or avg is None:
        raise WrkError(f"could not read {', '.join(missing)} from wrk's output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    socket = _SOCKET.search(output)
    socket_errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if socket:
        socket_errors = dict(zip(socket_errors, (int(g) for g in socket.groups()), strict=True))
    return WrkResult(
        requests=int(requests[1]),
        duration_s=_to_us(requests[2], requests[3]) / 1e6,
        rps=float(rps[1]),
        latency_avg_us=_to_us(avg[1], avg[2]),
        p50_us=percentiles[50],
        p75_us=percentiles[75],
        p90_us=percentiles[90],
        p99_us=percentiles[99],
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=socket_errors,
    )


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk not found; run load_tests/ensure_tools.sh")
    return found


def write_script(directory: Path) -> Path:
    path = directory / "infer.lua"
    path.write_text(LUA_SCRIPT)
    return path


def command(
    url: str, script: Path, threads: int, connections: int, duration_s: int, core: int | None
) -> list[str]:
    # --latency prints the percentiles. A request left unanswered for 5 s counts as a timeout error,
    # which fails the run, so a proxy that stalls cannot pass as merely slow.
    argv = [wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    return pinned([*argv, "--timeout", "5s", "-s", str(script), url], core)


def run(argv: list[str], timeout_s: float) -> WrkResult:
    """Runs wrk in its own session, so that a Ctrl-C is handled by the benchmark, which kills it."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise WrkError(f"wrk exited with status {proc.returncode}:\n{output}")
    return parse(output)
