"""Prometheus text for `GET /metrics` on the admin port, built from the workers' snapshots.

Workers never touch prometheus_client on the hot path: they count in plain lists (`gateway.stats`) and
publish a snapshot once a second. At scrape time this module merges every snapshot into metric
families in a fresh registry, so the numbers add up exactly across processes without
prometheus_client's multiprocess mode and its mmap files.

Counters include workers that are gone: their requests happened, and dropping them would make a
counter go down, which Prometheus reads as a reset. Gauges (in flight, readiness, revision) describe
the present, so they come from live workers only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString as _float_to_go

from gateway import __version__
from gateway.admin.control_plane import ControlPlane
from gateway.admin.shadow import shadow_metrics
from gateway.admin.versions import schema_gate_metrics
from gateway.rollout.records import PHASES, RolloutRecord
from gateway.state.records import WorkerSnapshot
from gateway.stats.counters import LATENCY_BUCKETS, OUTCOMES, STATUS_CLASSES, Outcome, Totals
from gateway.stats.kinds import CHOICES, EXPORTED_BUCKETS
from gateway.stats.records import VersionStats

# Not prometheus_client's CONTENT_TYPE_LATEST: newer releases moved that to 1.0.0, and scrapers
# negotiate 0.0.4 text everywhere.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Outcomes that are the upstream's fault, reported as gateway_upstream_errors_total{kind}.
UPSTREAM_ERROR_KINDS = (Outcome.TIMEOUT, Outcome.UPSTREAM_ERROR, Outcome.SERVER_ERROR)

# The `le` text prometheus_client's own histograms write ("0.001", "30.0"); the helper is untyped.
_le_text: Callable[[float], str] = _float_to_go


def render(plane: ControlPlane) -> bytes:
    """The exposition text for every worker that has published a snapshot in the plane's state dir."""
    table = plane.table()
    revision = table.revision if table is not None else None
    return render_snapshots(plane.workers(), revision, plane.audit_log.failures, plane.worker_restarts)


def render_snapshots(
    workers: list[WorkerSnapshot], table_revision: str | None, audit_failures: int = 0, restarts: int = 0
) -> bytes:
    """The exposition text for these snapshots; `table_revision` is the file's revision if it validates,
    `audit_failures` and `restarts` what the admin process itself counted."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(workers, table_revision, audit_failures, restarts))
    return generate_latest(registry)


def _split_key(key: str) -> tuple[str, str]:
    model, _, version = key.partition("/")
    return model, version


class SnapshotCollector:
    """Yields the gateway's metric families from one set of worker snapshots."""

    def __init__(
        self,
        workers: list[WorkerSnapshot],
        table_revision: str | None,
        audit_failures: int = 0,
        restarts: int = 0,
    ) -> None:
        self.workers = workers
        self.live = [w for w in workers if w.alive]
        self.table_revision = table_revision
        self.audit_failures = audit_failures
        self.restarts = restarts

    def collect(self) -> Iterable[Metric]:
        yield from self._requests()
        yield from self._unrouted()
        yield from self._reloads()
        yield from self._health()
        yield from self._admission()
        yield from self._rollouts()
        yield from schema_gate_metrics(self.workers)
        yield from shadow_metrics(self.workers)
        yield from self._process()

    # -- per version -------------------------------------------------------------------------------

    def _requests(self) -> Iterator[Metric]:
        everyone: dict[str, list[VersionStats]] = {}
        present: dict[str, list[VersionStats]] = {}
        for worker in self.workers:
            for key, counters in worker.stats.versions.items():
                everyone.setdefault(key, []).append(counters)
                if worker.alive:
                    present.setdefault(key, []).append(counters)

        requests = CounterMetricFamily(
            "gateway_requests",
            "Responses sent for requests routed to a version, by status class.",
            labels=["model", "version", "code"],
        )
        duration = HistogramMetricFamily(
            "gateway_request_duration_seconds",
            "Seconds from sending a request to its version's backend to its last byte (or the failure), "
            "less any time reading it waited on a slow client.",
            labels=["model", "version"],
        )
        upstream = CounterMetricFamily(
            "gateway_upstream_errors",
            "Requests a version failed: timeout, upstream_error (connection failed), server_error (5xx).",
            labels=["model", "version", "kind"],
        )
        in_flight = GaugeMetricFamily(
            "gateway_requests_in_flight",
            "Requests routed to a version and not yet answered, over live workers.",
            labels=["model", "version"],
        )
        by_choice = CounterMetricFamily(
            "gateway_routed_answers",
            "Answers per version by how it was chosen (only split answers are rollout evidence; "
            "sticky, pinned and shadow are not) and outcome (client_error and abandoned are the "
            "caller's, never evidence).",
            labels=["model", "version", "choice", "outcome"],
        )
        bounds = [_le_text(LATENCY_BUCKETS[i]) for i in EXPORTED_BUCKETS] + ["+Inf"]
        exported = frozenset(EXPORTED_BUCKETS)
        for key in sorted(everyone):
            model, version = _split_key(key)
            totals = Totals.merge(everyone[key])
            for code, count in zip(STATUS_CLASSES, totals.statuses, strict=True):
                requests.add_metric([model, version, code], count)
            cumulative: list[tuple[str, float]] = []
            running = 0
            for i, count in enumerate(totals.buckets[:-1]):
                running += count
                if i in exported:
                    cumulative.append((bounds[len(cumulative)], float(running)))
            cumulative.append(("+Inf", float(running + totals.buckets[-1])))
            duration.add_metric([model, version], cumulative, totals.latency_sum)
            for kind in UPSTREAM_ERROR_KINDS:
                upstream.add_metric([model, version, OUTCOMES[kind]], totals.outcomes[kind])
            # A version only gone workers served still gets a 0, so the series does not vanish.
            in_flight.add_metric([model, version], Totals.merge(present.get(key, [])).in_flight)
            for choice, tally in zip(CHOICES, totals.choices, strict=True):
                for outcome, count in zip(OUTCOMES, tally.outcomes, strict=True):
                    by_choice.add_metric([model, version, choice, outcome], count)
        yield from (requests, duration, upstream, in_flight, by_choice)

    def _unrouted(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "gateway_unrouted_responses",
            "Responses given without routing to a version (unknown model, auth, bad request), by class.",
            labels=["code"],
        )
        totals = [0] * len(STATUS_CLASSES)
        for worker in self.workers:
            for i, count in enumerate(worker.stats.unrouted[: len(totals)]):
                totals[i] += count
        for code, count in zip(STATUS_CLASSES, totals, strict=True):
            family.add_metric([code], count)
        yield family

        mirrors = CounterMetricFamily(
            "gateway_mirror_skipped", "Shadow copies not sent because too many were in flight."
        )
        mirrors.add_metric([], sum(w.mirrors.skipped for w in self.workers))
        yield mirrors
        yield GaugeMetricFamily(
            "gateway_mirror_in_flight",
            "Shadow copies sent and not yet answered, over live workers.",
            value=sum(w.mirrors.in_flight for w in self.live),
        )
        internal = CounterMetricFamily(
            "gateway_internal_errors",
            "Requests answered 500 or aborted because of a bug in the gateway (logged with the request id).",
        )
        internal.add_metric([], sum(w.internal_errors for w in self.workers))
        yield internal
        yield GaugeMetricFamily(
            "gateway_client_connections",
            "Open client connections, over live workers.",
            value=sum(w.connections for w in self.live),
        )

    # -- keys, limits and the store ---------------------------------------------------------------

    def _admission(self) -> Iterator[Metric]:
        outcomes = CounterMetricFamily(
            "gateway_admission",
            "Admission outcomes by API key name (empty: anonymous), model and outcome (admitted, "
            "limited, no_key, denied_<reason>, lookup_throttled_client|process, store_unavailable).",
            labels=["key", "model", "outcome"],
        )
        totals: dict[tuple[str, str, str], int] = {}
        for worker in self.workers:
            for o in worker.admission.outcomes:
                totals[(o.key, o.model, o.outcome)] = totals.get((o.key, o.model, o.outcome), 0) + o.count
        for labels, count in sorted(totals.items()):
            outcomes.add_metric(list(labels), count)
        yield outcomes
        errors = CounterMetricFamily("gateway_store_errors", "Store operations that failed or timed out.")
        errors.add_metric([], sum(w.admission.store_errors for w in self.workers))
        yield errors
        fallback = CounterMetricFamily(
            "gateway_store_fallback",
            "Requests decided without the store, by store.on_error mode (fail_open: local limits; "
            "fail_closed: answered 503).",
            labels=["mode"],
        )
        fallback.add_metric(["fail_open"], sum(w.admission.fail_open for w in self.workers))
        fallback.add_metric(["fail_closed"], sum(w.admission.fail_closed for w in self.workers))
        yield fallback
        up = GaugeMetricFamily("gateway_store_up", "1 while this worker reaches the store.", labels=["pid"])
        for worker in self.live:
            up.add_metric([str(worker.pid)], 1.0 if worker.admission.store_up else 0.0)
        yield up

    def _rollouts(self) -> Iterator[Metric]:
        weight = GaugeMetricFamily(
            "gateway_rollout_canary_weight",
            "The canary's weight in percent, as the rollout set it.",
            labels=["model"],
        )
        phase = GaugeMetricFamily(
            "gateway_rollout_phase", "1 for the phase each rollout is in.", labels=["model", "phase"]
        )
        decisions = GaugeMetricFamily(
            "gateway_rollout_decisions",
            "Decisions so far in the current rollout, by action.",
            labels=["model", "action"],
        )
        newest: dict[str, RolloutRecord] = {}
        for worker in self.live:
            for model, record in worker.rollouts.records.items():
                if model not in newest or record.updated > newest[model].updated:
                    newest[model] = record
        for model, record in sorted(newest.items()):
            weight.add_metric([model], float(record.state.weight))
            for name in PHASES:
                phase.add_metric([model, name], 1.0 if record.state.phase == name else 0.0)
            actions: dict[str, int] = {}
            for event in record.history:
                actions[event.action] = actions.get(event.action, 0) + 1
            for action, count in sorted(actions.items()):
                decisions.add_metric([model, action], float(count))
        yield from (weight, phase, decisions)

    # -- configuration -----------------------------------------------------------------------------

    def _reloads(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "gateway_config_reloads",
            "Attempts to load the routes file, by result, summed over every worker that ever ran.",
            labels=["result"],
        )
        ok = sum(w.reload_counts.ok for w in self.workers)
        failed = sum(w.reload_counts.failed for w in self.workers)
        reloads.add_metric(["success"], ok)
        reloads.add_metric(["failure"], failed)
        yield reloads

        revision = GaugeMetricFamily(
            "gateway_config_revision_info",
            "The routes file revision (sha256 of its bytes) each live worker serves; always 1.",
            labels=["revision", "pid"],
        )
        last_ok = GaugeMetricFamily(
            "gateway_config_last_reload_success",
            "1 if a live worker's latest reload attempt loaded the file, 0 if it was refused.",
            labels=["pid"],
        )
        last_time = GaugeMetricFamily(
            "gateway_config_last_reload_timestamp_seconds",
            "When a live worker last tried to load the routes file.",
            labels=["pid"],
        )
        for worker in self.live:
            pid = str(worker.pid)
            revision.add_metric([worker.revision, pid], 1)
            if worker.reloads:
                last_ok.add_metric([pid], 1 if worker.reloads[-1].ok else 0)
                last_time.add_metric([pid], worker.reloads[-1].time)
        yield from (revision, last_ok, last_time)

        yield GaugeMetricFamily(
            "gateway_config_file_valid",
            "1 if the routes file on disk validates now, 0 if the workers keep serving an older table.",
            value=0 if self.table_revision is None else 1,
        )
        if self.table_revision is not None:
            file_revision = GaugeMetricFamily(
                "gateway_config_file_revision_info",
                "The revision of the routes file on disk now; always 1.",
                labels=["revision"],
            )
            file_revision.add_metric([self.table_revision], 1)
            yield file_revision
        # One number to alert on: a worker stuck on an old table shows here, whatever the reason.
        served = {w.revision for w in self.live}
        target = {self.table_revision} if self.table_revision is not None else served
        yield GaugeMetricFamily(
            "gateway_config_in_sync",
            "1 if every live worker serves the file's revision (while the file is invalid: the same one).",
            value=1 if len(served) <= 1 and served <= target else 0,
        )

    # -- health ------------------------------------------------------------------------------------

    def _health(self) -> Iterator[Metric]:
        backends = GaugeMetricFamily(
            "gateway_backend_ready",
            "1 if a live worker's last health check found the backend ready.",
            labels=["backend", "pid"],
        )
        seen: dict[str, list[bool]] = {}
        for worker in self.live:
            for name, state in sorted(worker.health.backends.items()):
                backends.add_metric([name, str(worker.pid)], 1 if state.ready else 0)
            for key in worker.health.versions:
                seen.setdefault(key, [])
        # Every live worker must see the version ready: one that does not (or has not checked yet)
        # sends no split traffic to it, so the version is not fully serving.
        versions = GaugeMetricFamily(
            "gateway_version_ready",
            "1 if every live worker sees the version ready, else 0.",
            labels=["model", "version"],
        )
        for key in sorted(seen):
            states = [w.health.versions.get(key) for w in self.live]
            ready = all(state is not None and state.ready for state in states)
            versions.add_metric(list(_split_key(key)), 1 if ready else 0)
        yield from (backends, versions)

        workers = GaugeMetricFamily(
            "gateway_workers",
            "Worker processes that published a snapshot, by whether they still do.",
            labels=["state"],
        )
        workers.add_metric(["alive"], len(self.live))
        workers.add_metric(["gone"], len(self.workers) - len(self.live))
        yield workers
        restarts = CounterMetricFamily(
            "gateway_worker_restarts", "Worker processes the supervisor found dead and started again."
        )
        restarts.add_metric([], self.restarts)
        yield restarts
        audit = CounterMetricFamily(
            "gateway_audit_write_failures",
            "Audit log lines that could not be written (the actions themselves went ahead; see the log).",
        )
        audit.add_metric([], self.audit_failures + sum(w.audit_failures for w in self.workers))
        yield audit

    def _process(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "gateway_build_info", "The gateway's version; always 1.", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build
        starts = [w.started for w in self.live]
        if starts:
            yield GaugeMetricFamily(
                "gateway_start_time_seconds",
                "Unix time the oldest live worker started.",
                value=min(starts),
            )
