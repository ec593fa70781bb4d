"""Child processes for the benchmarks: start (optionally pinned to a core), wait for, account, clean up.

Every child is started in its own session, so a Ctrl-C at the terminal reaches only the benchmark,
which then stops its children in order instead of racing them; nginx workers and gateway workers stay
in their parent's process group, so one signal to the group reaches all of them. Output goes to files,
never to pipes: a chatty child writing into a pipe nobody reads would block and skew the measurement.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A port that was free a moment ago; the tiny race with other programs is acceptable here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def usable_cores() -> list[int]:
    """Cores this process may run on (respects cgroup cpusets and an outer taskset)."""
    return sorted(os.sched_getaffinity(0))


def pinned(argv: Sequence[str], core: int | None) -> list[str]:
    if core is None:
        return list(argv)
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("taskset not found (package util-linux); use --no-pin")
    return [taskset, "-c", str(core), *argv]


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Supervisor:
    """Owns every process the benchmark starts and stops them all, whatever way the run ends."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], core: int | None = None) -> Child:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                pinned(argv, core),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 3.0) -> None:
        # Descendants are collected before signalling: once the parent dies they are reparented
        # and could no longer be found through it.
        pids = [child.pid, *descendants(child.pid)]
        _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while child.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        _signal_group(child.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=grace)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        # Reverse start order: proxies go before the backend they talk to, so they do not log
        # upstream errors on the way down.
        for child in reversed(list(self.children)):
            self.stop(child)


def set_affinity(pids: Sequence[int], core: int) -> None:
    """Moves running processes, every thread of them, onto one core; threads they start later inherit it."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), {core})


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of the given processes (those that have exited count as zero)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def core_busy_seconds() -> dict[int, float]:
    """Per-core non-idle time since boot, from /proc/stat."""
    busy: dict[int, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in values[:7])
        # Steal (the hypervisor running someone else) is left out: this core did no work then.
        busy[int(name[3:])] = (user + nice + system + irq + softirq) / CLK_TCK
    return busy


@dataclass
class CpuUsage:
    """CPU seconds per wall second (1.0 = one core busy) during one measurement."""

    target: float = 0.0
    backend: float = 0.0
    loadgen: float = 0.0  # wrk, the only child process reaped during the measurement
    core_busy: dict[int, float] = field(default_factory=dict)  # everything, per core

    @property
    def others(self) -> float:
        """CPU used by processes that are not part of the benchmark (and kernel work charged to none).

        On a shared machine this is what disturbs a measurement; the report flags rounds where it is high.
        """
        return max(0.0, sum(self.core_busy.values()) - self.target - self.backend - self.loadgen)


def background_load(seconds: float = 1.0) -> float:
    """Cores' worth of CPU in use right now; called before the benchmark starts anything, it is what
    other programs take, which the results will suffer from."""
    start = core_busy_seconds()
    time.sleep(seconds)
    end = core_busy_seconds()
    return sum(end[c] - start.get(c, 0.0) for c in end) / seconds


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def cpu_meter(target_pids: Sequence[int], backend_pids: Sequence[int]) -> Iterator[CpuUsage]:
    """Measures the CPU share the target, the backend, wrk, and each core used during the block.

    The target's share tells whether it was the bottleneck (near 100% of one core) or was waiting for
    the load generator or the backend; per-core numbers show which side was saturated.
    """
    result = CpuUsage()
    start_wall = time.monotonic()
    start = (cpu_seconds(target_pids), cpu_seconds(backend_pids), _children_cpu())
    start_cores = core_busy_seconds()
    yield result
    wall = max(time.monotonic() - start_wall, 1e-9)
    end_cores = core_busy_seconds()
    result.target = (cpu_seconds(target_pids) - start[0]) / wall
    result.backend = (cpu_seconds(backend_pids) - start[1]) / wall
    result.loadgen = (_children_cpu() - start[2]) / wall
    result.core_busy = {c: (end_cores[c] - start_cores.get(c, 0.0)) / wall for c in end_cores}


def wait_for_port(port: int, child: Child, timeout: float) -> None:
    """Waits until something accepts on 127.0.0.1:port; fails early if the child has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise RuntimeError(
                f"{child.name} exited with status {child.popen.returncode} before listening on "
                f"port {port}; last output:\n{child.log_tail()}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{child.name} did not listen on port {port} within {timeout:.0f}s; last output:\n"
                f"{child.log_tail()}"
            )
        time.sleep(0.05)
