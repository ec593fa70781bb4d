"""What the admin API shows and does, independent of HTTP.

The control plane runs in one process per machine (the supervisor, or the only worker). It reads the
workers' snapshots (`gateway.state.files`), keeps a minute of merged totals for live rates and latency
quantiles, writes operators' weight overrides and the audit log, and asks the workers to reload.
Workers never wait for it: they publish and watch files.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.routing import config
from gateway.routing.table import RouteTable, model_digest
from gateway.shadow.compare import merge_all
from gateway.state import files as snapshots
from gateway.state.files import Override
from gateway.state.records import ReloadEvent, WorkerSnapshot
from gateway.stats.counters import OUTCOMES, STATUS_CLASSES, Totals
from gateway.stats.kinds import CHOICES
from gateway.stats.records import VersionStats

WINDOW = 60.0  # seconds of live statistics
HISTORY = 300.0  # seconds of samples kept for the dashboard's charts
CHART_WINDOW = 10.0  # seconds each chart point covers: short enough to show a canary start failing
CHART_STEP = 2.0  # seconds between chart points
ReloadTrigger = Callable[[], Awaitable[None]]


class OverrideError(ValueError):
    """An override the control plane refuses, with the reason in words."""


@dataclass(frozen=True, slots=True)
class WorkerRestart:
    """A worker process the supervisor found dead and starts again."""

    worker: int  # its index
    pid: int
    exit_code: int  # negative: killed by that signal
    uptime_s: float
    delay_s: float  # waited before starting it again: grows while it keeps dying
    time: float


class ControlPlane:
    def __init__(self, config_path: str, state_dir: Path, trigger_reload: ReloadTrigger) -> None:
        self.config_path = config_path
        self.state_dir = state_dir
        self._trigger_reload = trigger_reload
        self._history: deque[tuple[float, dict[str, Totals]]] = deque()
        self._table: RouteTable | None = None
        self._table_fingerprint: tuple[int, int, int] | None = None
        snapshots.prepare(state_dir)
        self.audit_log = snapshots.AuditLog(state_dir)
        self.worker_restarts = 0  # by the supervisor in this process, for metrics and status
        self.recent_restarts: deque[WorkerRestart] = deque(maxlen=20)

    # -- reading -----------------------------------------------------------------------------------

    def workers(self) -> list[WorkerSnapshot]:
        return snapshots.read_snapshots(self.state_dir)

    def live_workers(self) -> list[WorkerSnapshot]:
        return [w for w in self.workers() if w.alive]

    def table(self) -> RouteTable | None:
        """The table the file holds now, if it is valid (workers may still be on an older one)."""
        try:
            stat = os.stat(self.config_path)
        except OSError:
            return None
        fingerprint = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if fingerprint != self._table_fingerprint:
            try:
                self._table = config.load_table(self.config_path)
            except (config.ConfigError, OSError):
                self._table = None
            self._table_fingerprint = fingerprint
        return self._table

    def merged_totals(self, workers: list[WorkerSnapshot] | None = None) -> dict[str, Totals]:
        """Cumulative totals per "model/version", summed over every worker that ever reported."""
        parts: dict[str, list[VersionStats]] = {}
        for worker in self.workers() if workers is None else workers:
            for key, counters in worker.stats.versions.items():
                parts.setdefault(key, []).append(counters)
        return {key: Totals.merge(values) for key, values in parts.items()}

    def sample(self) -> None:
        """Remember the merged totals now; call about once a second for live windows."""
        now = time.monotonic()
        self._history.append((now, self.merged_totals()))
        while self._history and now - self._history[0][0] > HISTORY + CHART_WINDOW:
            self._history.popleft()

    def window(self) -> tuple[float, dict[str, Totals]]:
        """(seconds covered, per-version totals) for the last minute or what there is of it."""
        if not self._history:
            self.sample()
        now, latest = self._history[-1]
        start, earliest = self._history[0]
        for at, totals in self._history:
            if now - at <= WINDOW:
                start, earliest = at, totals
                break
        empty = Totals.merge([])
        return now - start, {key: totals.minus(earliest.get(key, empty)) for key, totals in latest.items()}

    def history_view(self) -> dict[str, Any]:
        """Per version, points every CHART_STEP over the last HISTORY seconds, each over CHART_WINDOW:
        what the dashboard's charts draw, so a page opened now shows the last minutes at once."""
        samples = list(self._history)
        now_mono, now_wall = time.monotonic(), time.time()
        empty = Totals.merge([])
        series: dict[str, dict[str, list[Any]]] = {}
        first, last_at = 0, -float("inf")
        for at, totals in samples:
            if at - last_at < CHART_STEP or now_mono - at > HISTORY:
                continue
            while samples[first][0] < at - CHART_WINDOW:
                first += 1
            start, base = samples[first]
            if at - start < CHART_STEP:
                continue
            last_at = at
            wall = round(now_wall - (now_mono - at), 3)
            for key, total in totals.items():
                recent = total.minus(base.get(key, empty))
                model, _, version = key.partition("/")
                point = series.setdefault(model, {}).setdefault(version, [])
                point.append(
                    {
                        "t": wall,
                        "rps": round(recent.requests / (at - start), 3),
                        "error_rate": round(recent.failures / recent.requests, 6) if recent.requests else 0.0,
                        **{
                            q: _ms(recent.quantile(p))
                            for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
                        },
                    }
                )
        return {"window_seconds": CHART_WINDOW, "models": series}

    def versions_view(self) -> dict[str, Any]:
        seconds, window = self.window()
        totals = self.merged_totals()
        workers = self.live_workers()
        live_totals = self.merged_totals(workers)  # in-flight counts only where a process is still alive
        table = self.table()
        models: dict[str, Any] = {}
        keys = set(totals)
        if table is not None:
            keys |= {f"{m.name}/{v}" for m in table.models.values() for v in m.versions}
        for key in sorted(keys):
            model, _, version = key.partition("/")
            recent = window.get(key, Totals.merge([]))
            total = totals.get(key, Totals.merge([]))
            ready = [w.health.versions.get(key) for w in workers]
            known = [r for r in ready if r is not None]
            models.setdefault(model, {})[version] = {
                "window_seconds": round(seconds, 1),
                "requests": recent.requests,
                "rps": round(recent.requests / seconds, 3) if seconds > 0 else 0.0,
                "error_rate": round(recent.failures / recent.requests, 6) if recent.requests else 0.0,
                "latency_ms": {
                    q: _ms(recent.quantile(p)) for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
                },
                "in_flight": live_totals[key].in_flight if key in live_totals else 0,
                "total": {
                    "requests": total.requests,
                    "by_status": dict(zip(STATUS_CLASSES, total.statuses, strict=True)),
                    "by_outcome": dict(zip(OUTCOMES, total.outcomes, strict=True)),
                    # Split and sticky are a rollout's evidence, pinned and shadow are not; caller
                    # faults (4xx, 499) are in no count of requests.
                    "by_choice": {
                        choice: {
                            "requests": t.requests,
                            "failures": t.failures,
                            "caller_faults": t.caller_faults,
                        }
                        for choice, t in zip(CHOICES, total.choices, strict=True)
                    },
                },
                "ready": all(r.ready for r in known) if known else None,
                "not_ready_reason": next((r.detail for r in known if not r.ready), ""),
            }
        return {"models": models}

    def routes_view(self) -> dict[str, Any]:
        table = self.table()
        workers = self.live_workers()
        revisions = {str(w.pid): w.revision for w in workers}
        overrides = snapshots.read_overrides(self.state_dir)
        view: dict[str, Any] = {
            "source": self.config_path,
            "file_valid": table is not None,
            "revision": table.revision if table is not None else None,
            "worker_revisions": revisions,
            "consistent": len(set(revisions.values())) <= 1,
            "backends": {},
            "models": {},
        }
        if table is None:
            return view
        for name, backend in table.backends.items():
            view["backends"][name] = {
                "url": f"http://{backend.host}:{backend.port}",
                "timeout_s": backend.timeout,
                "health": {str(w.pid): _health_json(w, name) for w in workers},
            }
        for model in table.models.values():
            override = overrides.get(model.name)
            active = override is not None and override.model_digest == model_digest(model)
            live = _live_split(workers, model.name)
            view["models"][model.name] = {
                "versions": {
                    v.id: {
                        "backend": v.backend,
                        "target": f"{v.triton_model}/{v.triton_version}".rstrip("/"),
                        "metadata": dict(v.metadata),
                    }
                    for v in model.versions.values()
                },
                "aliases": dict(model.aliases),
                "split_in_file": dict(model.split),
                "split_live": live,
                "override": {**override.to_json(), "active": active} if override is not None else None,
                "sticky_header": model.sticky_header,
                "mirror": {"to": model.mirror.to, "percent": model.mirror.percent} if model.mirror else None,
            }
        return view

    def reloads_view(self) -> dict[str, Any]:
        events = [(event, worker.pid) for worker in self.workers() for event in worker.reloads]
        events.sort(key=lambda e: e[0].time, reverse=True)
        # The newest refusal, as long as some live worker's latest reload is still a refusal.
        failing = [w for w in self.live_workers() if w.reloads and not w.reloads[-1].ok]
        last_error = next((_event_json(e, pid) for e, pid in events if not e.ok), None) if failing else None
        return {"events": [_event_json(e, pid) for e, pid in events[:200]], "last_error": last_error}

    def backends_view(self) -> dict[str, Any]:
        return {str(w.pid): {"alive": w.alive, **w.health.to_json()} for w in self.workers()}

    def store_view(self) -> dict[str, Any]:
        """Each worker's view of the store: reachable or not, and what it did while it was not."""
        return {str(w.pid): {"alive": w.alive, **w.admission.summary_json()} for w in self.workers()}

    def shadow_view(self) -> dict[str, Any]:
        """Shadow comparisons per version pair, summed over every worker that ever reported."""
        merged = merge_all(w.mirrors.comparisons for w in self.workers())
        pairs = [
            {"model": model, "primary": primary, "shadow": shadow, **stats.summary()}
            for (model, primary, shadow), stats in sorted(merged.items())
        ]
        return {"pairs": pairs}

    def restarts_view(self) -> dict[str, Any]:
        return {"total": self.worker_restarts, "recent": [asdict(r) for r in reversed(self.recent_restarts)]}

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.audit_log.read(limit)

    # -- acting ------------------------------------------------------------------------------------

    def record_restart(self, restart: WorkerRestart) -> None:
        self.worker_restarts += 1
        self.recent_restarts.append(restart)

    async def reload(self, who: str, wait: float = 3.0) -> dict[str, Any]:
        """Make every worker reload the file now; wait for each to report, and say how it went."""
        started = time.time()
        await self._trigger_reload()
        deadline = time.monotonic() + wait
        results: dict[str, ReloadEvent] = {}
        while time.monotonic() < deadline:
            results = {}
            for worker in self.live_workers():
                recent = [e for e in worker.reloads if e.time >= started - 0.001]
                if recent:
                    results[str(worker.pid)] = recent[-1]
            if results and len(results) >= len(self.live_workers()):
                break
            await asyncio.sleep(0.05)
        missing = sorted(str(w.pid) for w in self.live_workers() if str(w.pid) not in results)
        ok = bool(results) and not missing and all(r.ok for r in results.values())
        workers = {pid: event.to_json() for pid, event in results.items()}
        outcome = {"ok": ok, "workers": workers, "missing": missing}
        self.audit_log.append(who, "reload", {"ok": ok})
        return outcome

    def set_override(
        self, model_name: str, weights: dict[str, int], who: str, reason: str = ""
    ) -> dict[str, Any]:
        table = self.table()
        if table is None:
            raise OverrideError(f"{self.config_path} does not validate now; fix it before overriding weights")
        model = table.models.get(model_name)
        if model is None:
            raise OverrideError(f"unknown model {model_name!r}")
        resolved: dict[str, int] = {}
        for name, weight in weights.items():
            version = model.resolve(name)
            if version is None:
                raise OverrideError(f"model {model_name} has no version or alias {name!r}")
            if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
                raise OverrideError(f"weight for {name} must be a whole number from 0 to 100, not {weight!r}")
            if version.id in resolved:
                raise OverrideError(f"version {version.id} is named twice")
            resolved[version.id] = weight
        if sum(resolved.values()) != 100:
            raise OverrideError(f"weights add up to {sum(resolved.values())}, not 100")
        override = Override(
            model_name, tuple(resolved.items()), model_digest(model), who, time.time(), reason
        )
        overrides = snapshots.read_overrides(self.state_dir)
        overrides[model_name] = override
        snapshots.write_overrides(self.state_dir, overrides)
        self.audit_log.append(
            who, "override.set", {"model": model_name, "weights": resolved, "reason": reason}
        )
        return override.to_json()

    def clear_override(self, model_name: str, who: str) -> bool:
        overrides = snapshots.read_overrides(self.state_dir)
        if overrides.pop(model_name, None) is None:
            return False
        snapshots.write_overrides(self.state_dir, overrides)
        self.audit_log.append(who, "override.clear", {"model": model_name})
        return True


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _event_json(event: ReloadEvent, pid: int) -> dict[str, Any]:
    return {**event.to_json(), "pid": pid}


def _health_json(worker: WorkerSnapshot, backend: str) -> dict[str, Any] | None:
    health = worker.health.backends.get(backend)
    return health.to_json() if health is not None else None


def _split_json(worker: WorkerSnapshot, model: str) -> dict[str, int] | None:
    split = worker.splits.get(model)
    return dict(split) if split is not None else None


def _live_split(workers: list[WorkerSnapshot], model: str) -> dict[str, Any] | None:
    """The split the workers follow now (override and readiness applied), or each worker's if they differ."""
    splits = {str(w.pid): _split_json(w, model) for w in workers}
    known = [s for s in splits.values() if s is not None]
    if not known:
        return None
    if all(s == known[0] for s in known):
        return dict(known[0])
    return {"workers_disagree": splits}
