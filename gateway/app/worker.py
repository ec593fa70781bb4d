"""One gateway worker process: the data plane, plus what keeps its routing current.

The worker watches routes.yaml and the operators' overrides file, reloads on a content change or on
SIGHUP, runs the backend health checks, and publishes a snapshot of its state and statistics about once
a second (and right after each reload) for the control plane to read. A file that fails validation
changes nothing: the last good table keeps serving, and the errors are logged and published.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.access.admission import Admission
from gateway.artifacts.guard import VersionGuard
from gateway.grpc.server import GrpcPort
from gateway.grpc.service import GrpcFrontDoor
from gateway.pipeline.flow import Pipeline
from gateway.pipeline.http import HttpFrontDoor
from gateway.pipeline.metadata import Metadata
from gateway.rollout.controller import RolloutController, Weights
from gateway.routing import config
from gateway.routing.health import Health, HealthChecker
from gateway.routing.table import RouteTable, model_digest
from gateway.routing.watch import FileWatcher
from gateway.state import files as snapshots
from gateway.state import records
from gateway.stats.counters import Stats
from gateway.store import Store, StoreUnavailable, open_store
from gateway.store.base import redacted
from gateway.wire.deadlines import Deadlines, resolution_for
from gateway.wire.http_server import ClientConnection
from gateway.wire.request import BodyBudget

log = logging.getLogger("gateway.app.worker")

PUBLISH_INTERVAL = 1.0
RELOAD_HISTORY = 50


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    config: str
    state_dir: Path
    index: int = 0
    shutdown_timeout: float = 30.0
    stats: bool = True


class Worker:
    def __init__(self, table: RouteTable, options: WorkerOptions, store: Store | None = None) -> None:
        self.options = options
        self.loop = asyncio.get_running_loop()
        self.stats = Stats(enabled=options.stats)
        # The store is opened once: a reload that changes store.url takes effect at the next restart.
        self.store = store if store is not None else open_store(table.store.url, table.store.timeout)
        self.admission = Admission(self.store, table.store.on_error)
        self.pipeline = Pipeline(table, self.loop, self.stats, self.admission)
        self._rollout_weights: Weights = {}
        self.rollouts = RolloutController(
            self.store,
            self.admission.process_id,
            self.stats,
            self._version_ready,
            self._follow_rollouts,
            self._audit_rollout,
            hold=lambda model: self.versions.hold_rollout(self.table, model),
        )
        self.health = HealthChecker(self._apply_routing)
        self.health.set_table(table)
        # The version registry and the schema gate; audited as "gateway" (what it let through).
        self.versions = VersionGuard(
            self.store, lambda what, details: self.audit_log.append("gateway", what, details)
        )
        self._admitting: asyncio.Task[None] | None = None  # the reloaded table being checked
        self.front_door = HttpFrontDoor(
            self.pipeline,
            Metadata(lambda: self.pipeline.snapshot, self.health.settled, self.versions.describe),
        )
        self.grpc: GrpcPort | None = None  # the gRPC port, once serve_grpc opened it
        settings = table.server
        resolution = resolution_for(
            settings.header_timeout, settings.body_timeout, settings.keepalive_timeout
        )
        self.connections: Deadlines[ClientConnection] = Deadlines(self.loop, resolution)
        self.budget = BodyBudget(settings.max_buffered_bytes)  # request bodies held, all connections
        self.reloads: deque[records.ReloadEvent] = deque(maxlen=RELOAD_HISTORY)
        self.reload_counts = {"ok": 0, "failed": 0}
        self.started = time.time()
        self.audit_log = snapshots.AuditLog(options.state_dir)  # the controller's decisions
        self._stop = asyncio.Event()
        self._watcher = FileWatcher(
            [options.config, options.state_dir / snapshots.OVERRIDES], self._on_file_change
        )
        self._record_reload("start", table, [], 0.0)

    def connection(self) -> ClientConnection:
        """A protocol for a new client connection, with the current table's server limits."""
        return ClientConnection(self.front_door, self.table.server, self.connections, self.budget)

    async def serve_grpc(self, host: str, port: int, reuse_port: bool) -> int:
        """Open the gRPC port on the same pipeline as HTTP; returns the port bound."""
        settings = self.table.server
        # A request message is an HTTP request's head and body at once: it gets both their times.
        first_message = settings.header_timeout + settings.body_timeout
        front_door = GrpcFrontDoor(
            self.pipeline, self.front_door.metadata, first_message, settings.keepalive_timeout
        )
        self.grpc = GrpcPort(front_door, settings, reuse_port)
        return await self.grpc.start(host, port)

    @property
    def table(self) -> RouteTable:
        """The table the data plane serves now."""
        return self.pipeline.snapshot.table

    async def run(self, servers: list[asyncio.AbstractServer]) -> None:
        """Serve until SIGTERM or SIGINT, then stop accepting and let requests in flight finish."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._stop.set)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self.reload("signal"))
        await self._watcher.start()
        await self.admission.start()
        self._apply_routing()
        self.health.start()
        publisher = self.loop.create_task(self._publish_forever())
        controller = self.loop.create_task(self._control_forever())
        tracker = self.loop.create_task(self._track_versions_forever())
        await self._stop.wait()

        log.info("shutting down: %d open connection(s)", len(self.connections))
        for server in servers:
            server.close()
        grpc_stopped = self.grpc.stop(self.options.shutdown_timeout) if self.grpc is not None else None
        grpc_stopping = self.loop.create_task(grpc_stopped) if grpc_stopped is not None else None
        for conn in self.connections:
            conn.shutdown()
        deadline = self.loop.time() + self.options.shutdown_timeout
        while len(self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if len(self.connections):
            log.warning(
                "%d connection(s) still busy after %gs; closing",
                len(self.connections),
                self.options.shutdown_timeout,
            )
        if grpc_stopping is not None:
            await grpc_stopping
        self._watcher.stop()
        publisher.cancel()
        controller.cancel()
        tracker.cancel()
        self.publish()
        self.connections.close()
        await self.health.stop()
        await self.admission.stop()
        await self.front_door.close()
        await self.versions.close()

    # -- reload ------------------------------------------------------------------------------------

    def reload(self, trigger: str) -> None:
        """Load the file again; swap the table once it validates and passes the version registry and the
        schema gate (asked asynchronously: the old table serves meanwhile); keep the old one if not."""
        started = time.perf_counter()
        try:
            table = config.load_table(self.options.config)
        except config.ConfigError as exc:
            self._refuse(trigger, [str(issue) for issue in exc.issues], started)
            return
        if self._admitting is not None:
            self._admitting.cancel()  # a newer file supersedes the one being checked
        self._admitting = self.loop.create_task(self._admit(table, trigger, started))

    async def _admit(self, table: RouteTable, trigger: str, started: float) -> None:
        try:
            errors = await self.versions.admit(self.table, self.pipeline.snapshot.split_of, table)
        except Exception:
            log.exception("checking %s against the version registry failed", self.options.config)
            errors = ["the reload could not be checked against the version registry (see the gateway's log)"]
        if errors:
            self._refuse(trigger, errors, started)
        else:
            self._swap(table, trigger, started)

    def _refuse(self, trigger: str, errors: list[str], started: float) -> None:
        for error in errors:
            log.error("reload refused, still serving revision %s: %s", self.table.revision[:12], error)
        self._record_reload(trigger, None, errors, time.perf_counter() - started)
        self.publish()

    def _swap(self, table: RouteTable, trigger: str, started: float) -> None:
        if table.store.url != self.table.store.url:
            log.warning("store.url changed in %s; it takes effect at the next restart", self.options.config)
        self.admission.on_error = table.store.on_error
        self.pipeline.set_table(table)
        self.budget.limit = table.server.max_buffered_bytes
        self.health.set_table(table)
        self._apply_routing()
        self._record_reload(trigger, table, [], time.perf_counter() - started)
        log.info("reloaded %s (%s): revision %s", self.options.config, trigger, table.revision[:12])
        self.publish()
        self.loop.create_task(self.health.check_now())  # new versions get checked now, not in 2 s

    def _on_file_change(self, path: str) -> None:
        if path == str(self.options.state_dir / snapshots.OVERRIDES):
            self._apply_routing()
            self.publish()
        else:
            self.reload("file")

    def _record_reload(
        self, trigger: str, table: RouteTable | None, errors: list[str], seconds: float
    ) -> None:
        ok = table is not None
        self.reload_counts["ok" if ok else "failed"] += 1
        revision = table.revision if table is not None else None
        self.reloads.append(
            records.ReloadEvent(time.time(), ok, revision, trigger, tuple(errors), round(seconds * 1000, 3))
        )

    def _version_ready(self, model: str, version: str) -> bool:
        health = self.health.versions.get((model, version))
        return health is None or health.ready  # not checked yet is not evidence of anything

    def _audit_rollout(self, model: str, event: dict[str, Any]) -> None:
        self.versions.rollout_event(self.table.models.get(model), event)
        if event.get("by", "controller") != "controller":
            return  # an operator's action, applied now: the admin API audited it when it was asked for
        details = {"model": model, "weight": event["weight"]}
        reason = event.get("evidence", {}).get("reason")
        if reason:
            details["reason"] = reason
        self.audit_log.append("controller", f"rollout.{event['action']}", details)

    def _follow_rollouts(self, weights: Weights) -> None:
        if weights != self._rollout_weights:
            self._rollout_weights = weights
            self._apply_routing()

    async def _control_forever(self) -> None:
        down = False
        while True:
            try:
                await self.rollouts.tick(self.table)
                down = False
            except StoreUnavailable as exc:
                if not down:
                    log.error("rollout control paused, the store is unavailable: %s", exc)
                down = True
            except Exception:  # a bug in one round must not end rollout control for good
                log.exception("rollout control round failed")
            await asyncio.sleep(1.0)

    async def _track_versions_forever(self) -> None:
        """Served marks and registrations for the version registry (best effort, like the audit log)."""
        while True:
            served = {key: sum(v.statuses) for key, v in self.stats.snapshot().versions.items()}
            try:
                await self.versions.track(self.table, served)
            except StoreUnavailable:
                pass  # the rollout loop reports the store being down; the marks wait for it
            except Exception:
                log.exception("version registry round failed")
            await asyncio.sleep(1.0)

    def _apply_routing(self) -> None:
        """Re-derive every model's live weights from the table, rollouts, operators' overrides and readiness.

        An operator's override wins over a rollout's weights, which win over the file's split.
        """
        table = self.table
        overrides = {name: w for name, w in self._rollout_weights.items() if name in table.models}
        for name, override in snapshots.read_overrides(self.options.state_dir).items():
            model = table.models.get(name)
            if model is not None and override.model_digest == model_digest(model):
                overrides[name] = override.weights  # an override lapses once the file changes the model
        self.pipeline.set_routing(overrides, dict(self.health.versions))

    # -- publishing --------------------------------------------------------------------------------

    def snapshot(self) -> records.WorkerSnapshot:
        snapshot, admission, mirrors = self.pipeline.snapshot, self.admission, self.front_door.mirrors
        grpc = self.grpc.front_door if self.grpc is not None else None
        grpc_mirrors = (grpc.mirrors.in_flight, grpc.mirrors.skipped) if grpc is not None else (0, 0)
        grpc_errors = grpc.internal_errors if grpc is not None else 0

        def health(h: Health) -> records.HealthEntry:
            return records.HealthEntry(h.ready, h.detail, h.checked_at)

        return records.WorkerSnapshot(
            pid=os.getpid(),
            worker=self.options.index,
            started=self.started,
            time=time.time(),
            revision=snapshot.table.revision,
            source=self.options.config,
            reloads=tuple(self.reloads),
            reload_counts=records.ReloadCounts(self.reload_counts["ok"], self.reload_counts["failed"]),
            health=records.HealthView(
                {name: health(h) for name, h in self.health.backends.items()},
                {f"{m}/{v}": health(h) for (m, v), h in self.health.versions.items()},
            ),
            splits={name: dict(snapshot.split_of(name)) for name in snapshot.table.models},
            stats=self.stats.snapshot(),
            mirrors=records.Mirrors(
                mirrors.in_flight + grpc_mirrors[0],
                mirrors.skipped + grpc_mirrors[1],
                mirrors.comparer.figures(),
            ),
            connections=len(self.connections),
            admission=records.AdmissionView(
                store_url=redacted(self.store.url),
                store_up=admission.store_up,
                on_error=admission.on_error,
                live_processes=admission.live_processes,
                store_errors=admission.stats.store_errors,
                fail_open=admission.stats.fail_open,
                fail_closed=admission.stats.fail_closed,
                outcomes=tuple(
                    records.AdmissionOutcome(key, model, outcome, n)
                    for (key, model, outcome), n in admission.stats.outcomes.items()
                ),
            ),
            rollouts=records.RolloutsView(self.rollouts.leader, dict(self.rollouts.records)),
            internal_errors=self.front_door.internal_errors + grpc_errors,
            audit_failures=self.audit_log.failures,
            schema_gate=self.versions.view(),
        )

    def publish(self) -> None:
        try:
            snapshots.write_snapshot(self.options.state_dir, self.snapshot())
        except OSError as exc:
            log.warning("cannot write the worker snapshot: %s", exc)

    async def _publish_forever(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(PUBLISH_INTERVAL)
