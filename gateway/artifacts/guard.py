"""A worker's side of the registry and the schema gate: the I/O around the decisions of `registry` and `gate`.

The worker asks `admit` before it swaps in a reloaded table (the old table serves meanwhile), the
rollout controller asks `hold_rollout` before it starts a rollout, and `track` runs about once a second
to mark which versions served and to refresh what the metadata endpoint says about registrations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import aiohttp

from gateway.artifacts import registry
from gateway.artifacts.gate import (
    RECENT,
    Check,
    GateView,
    Refusal,
    Split,
    Verdict,
    count_key,
    judge,
    reload_checks,
    rollout_check,
)
from gateway.artifacts.schema import Schema, from_metadata
from gateway.routing.table import Model, RouteTable, triton_model_path
from gateway.store.base import Store, StoreUnavailable
from gateway.store.factory import open_store
from gateway.typed_json import RecordError

log = logging.getLogger("gateway.artifacts")

METADATA_TIMEOUT = 2.0  # seconds; the admin API waits 3 s for a reload's answer
TRACK_EVERY = 10.0  # seconds between "served" marks (and registry refreshes) per worker
START_TIMEOUT = 2.0  # seconds per store call for the check before serving
RECHECK_HELD = 10.0  # seconds before a held rollout's versions are asked again
HOLD_SHOWN = 5.0  # seconds a hold stays in the snapshot without being confirmed
ROLLOUT_ACTIONS = {"start": "started", "promote": "promoted", "rollback": "rolled_back"}
Audit = Callable[[str, dict[str, Any]], object]  # (action, details) for the audit log


class SchemaUnavailable(Exception):
    """A version's metadata could not be read; the gate cannot judge it."""


async def registry_errors(store: Store, table: RouteTable) -> list[str]:
    """What in the table contradicts the registry, as file:line:column messages.

    Only versions that name an archive are checked, so a table naming none costs no store round trip
    (and reloads while the store is down as fast as ever). With the store down, a table that names
    archives is refused under `store.on_error: fail_closed`: its promise (these ids are these builds)
    cannot be checked.
    """
    names = [m.name for m in table.models.values() if any(v.archive for v in m.versions.values())]
    if not names:
        return []
    # Together: while the store hangs, a reload waits one store timeout, not one per model.
    found = await asyncio.gather(
        *(registry.registered(store, name) for name in names), return_exceptions=True
    )
    failed = next((f for f in found if isinstance(f, BaseException)), None)
    if isinstance(failed, StoreUnavailable):
        if table.store.on_error == "fail_closed":
            return [
                f"{table.source}:1:1: the version registry is unavailable ({failed}); the file names "
                "archives, so it is refused until the registry answers (store.on_error: fail_closed)"
            ]
        log.warning(
            "the version registry is unavailable, not checking %s against it: %s", table.source, failed
        )
        return []
    if failed is not None:
        raise failed
    records = {name: f for name, f in zip(names, found, strict=True) if not isinstance(f, BaseException)}
    return [str(issue) for issue in registry.contradictions(table, records)]


def check_at_start(table: RouteTable) -> list[str]:
    """`registry_errors` for `gateway serve`, before it serves (a fresh memory store has no registry)."""
    if table.store.url.partition("://")[0] == "memory":
        return []

    async def check() -> list[str]:
        # Patient: a first connection (TLS, a sentinel) takes longer than a store call may.
        store = open_store(table.store.url, max(table.store.timeout, START_TIMEOUT))
        try:
            return await registry_errors(store, table)
        finally:
            await store.close()

    return asyncio.run(check())


class VersionGuard:
    def __init__(self, store: Store, audit: Audit) -> None:
        self.store = store
        self._audit = audit
        self._session: aiohttp.ClientSession | None = None
        self._held: dict[str, tuple[str, float]] = {}  # model -> (why, when last confirmed)
        self._recent: deque[Refusal] = deque(maxlen=RECENT)
        self._refused: Counter[str] = Counter()
        self._allowed: Counter[str] = Counter()
        self._rollouts: dict[str, tuple[str, float, str | None]] = {}  # model -> (spec, when asked, why held)
        self._described: dict[tuple[str, str], dict[str, Any]] = {}
        self._served: dict[str, int] = {}
        self._tracked_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def view(self) -> GateView:
        # A hold is confirmed at every controller round of the lease holder; one no longer confirmed
        # (the lease moved, the rollout left the file) is not this worker's to show.
        now = time.monotonic()
        held = {model: why for model, (why, at) in self._held.items() if now - at < HOLD_SHOWN}
        return GateView(held, tuple(self._recent), dict(self._refused), dict(self._allowed))

    def describe(self, model: str, version: str) -> Mapping[str, Any] | None:
        """What the registry says of a version, as last read (at most TRACK_EVERY old)."""
        return self._described.get((model, version))

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- reloads -----------------------------------------------------------------------------------

    async def admit(
        self, serving: RouteTable, live: Callable[[str], Split], candidate: RouteTable
    ) -> list[str]:
        """Why `candidate` may not replace `serving`: registry contradictions, then schema gate refusals."""
        errors = await registry_errors(self.store, candidate)
        if errors:
            return errors
        checks = reload_checks(serving, candidate, live)
        verdicts = await asyncio.gather(*(self._judge(c, serving, candidate) for c in checks))
        for check, verdict in zip(checks, verdicts, strict=True):
            if isinstance(verdict, str):
                message = f"schema gate: {verdict}; the reload is refused until it can compare them"
            elif not verdict.passes:
                message = verdict.message()
            else:
                if verdict.problems:
                    self._allow(verdict, "reload")
                continue
            self._refuse(check, "reload", message)
            errors.append(self._at(candidate, check, message))
        return errors

    def _at(self, table: RouteTable, check: Check, message: str) -> str:
        version = table.models[check.model].versions[check.version]
        line, column = version.positions.get("version", (1, 1))
        return f"{table.source}:{line}:{column}: {message}"

    # -- rollouts ----------------------------------------------------------------------------------

    async def hold_rollout(self, table: RouteTable, model: Model) -> str | None:
        """Why the rollout of `model` may not start now (None: it may). A held rollout's versions are asked
        again every RECHECK_HELD seconds, so fixing the canary's backend lets it start."""
        check = rollout_check(model)
        if check is None or model.rollout is None:
            return None
        spec = repr((model.rollout, model.versions[check.baseline], model.versions[check.version]))
        known = self._rollouts.get(model.name)
        now = time.monotonic()
        if known is not None and known[0] == spec and (known[2] is None or now - known[1] < RECHECK_HELD):
            reason = known[2]
        else:
            reason = await self._rollout_reason(check, table, first=known is None or known[0] != spec)
            self._rollouts[model.name] = (spec, now, reason)
        if reason is None:
            self._held.pop(model.name, None)
        else:
            self._held[model.name] = (reason, now)
        return reason

    async def _rollout_reason(self, check: Check, table: RouteTable, first: bool) -> str | None:
        judged = await self._judge(check, table, table)
        if isinstance(judged, str):
            reason = f"schema gate: {judged}; the rollout waits until it can compare them"
        elif not judged.passes:
            reason = judged.message()
        else:
            if judged.problems and first:
                self._allow(judged, "rollout")
            return None
        if first or check.model not in self._held:  # once per hold, not at every recheck
            self._refuse(check, "rollout", reason)
        return reason

    def rollout_event(self, model: Model | None, event: Mapping[str, Any]) -> None:
        """Put a rollout's start and outcome into both versions' histories."""
        action = ROLLOUT_ACTIONS.get(str(event.get("action")))
        if model is None or model.rollout is None or action is None:
            return
        rollout = model.rollout
        for version, role, peer in (
            (rollout.canary, "canary", rollout.baseline),
            (rollout.baseline, "baseline", rollout.canary),
        ):
            entry = registry.event(
                "rollout",
                float(event.get("time", time.time())),
                action=action,
                role=role,
                peer=peer,
                weight=event.get("weight"),
                by=event.get("by", "controller"),
                reason=(event.get("evidence") or {}).get("reason", ""),
            )
            self._spawn(registry.add_event(self.store, model.name, version, entry))

    # -- served marks and what the metadata endpoint shows -------------------------------------------

    async def track(self, table: RouteTable, served: Mapping[str, int]) -> None:
        """Mark versions that answered requests since the last mark, and re-read their registrations."""
        now = time.time()
        if now - self._tracked_at < TRACK_EVERY:
            return
        self._tracked_at = now
        for key, count in served.items():
            name, _, version_id = key.partition("/")
            if count > self._served.get(key, 0) and name in table.models:
                await registry.add_event(
                    self.store, name, version_id, registry.event("served", now, since=now)
                )
        self._served = dict(served)
        described = {}
        for model in table.models.values():
            records = await registry.registered(self.store, model.name)
            for version in model.versions.values():
                events = await registry.history(self.store, model.name, version.id)
                described[(model.name, version.id)] = registry.summary(records.get(version.id), events)
        self._described = described

    # -- plumbing ----------------------------------------------------------------------------------

    async def _judge(self, check: Check, serving: RouteTable, candidate: RouteTable) -> Verdict | str:
        """The verdict, or why there is none (a version's metadata could not be read)."""
        try:
            baseline, version = await asyncio.gather(
                self._schema(serving, check.model, check.baseline),
                self._schema(candidate, check.model, check.version),
            )
        except SchemaUnavailable as exc:
            return str(exc)
        allow = candidate.models[check.model].versions[check.version].allow_schema_change
        return judge(check, baseline, version, allow)

    async def _schema(self, table: RouteTable, model: str, version_id: str) -> Schema:
        version = table.models[model].versions[version_id]
        backend = table.backends[version.backend]
        url = f"http://{backend.host}:{backend.port}{triton_model_path(version)}"
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=METADATA_TIMEOUT))
        where = f"cannot read the metadata of {model} {version_id} from backend {backend.name}"
        try:
            async with self._session.get(url) as response:
                payload = await response.json(content_type=None)
                if response.status != 200:
                    error = payload.get("error") if isinstance(payload, dict) else None
                    raise SchemaUnavailable(
                        f"{where}: it answered {response.status} ({error or 'no reason'})"
                    )
                return from_metadata(payload)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise SchemaUnavailable(f"{where}: {reason}") from None

    def _refuse(self, check: Check, where: str, message: str) -> None:
        log.error("%s", message)
        self._recent.append(Refusal(time.time(), check.model, check.version, where, message))
        self._refused[count_key(check.model, check.version, where)] += 1
        self._spawn(
            registry.add_event(
                self.store,
                check.model,
                check.version,
                registry.event("schema_refused", where=where, message=message),
            )
        )

    def _allow(self, verdict: Verdict, where: str) -> None:
        check = verdict.check
        log.warning("%s (let through: allow_schema_change is set)", verdict.message())
        self._allowed[count_key(check.model, check.version, where)] += 1
        details = {
            "model": check.model,
            "version": check.version,
            "baseline": check.baseline,
            "where": where,
            "differences": list(verdict.problems),
        }
        self._audit("schema_change.allowed", details)
        entry = registry.event(
            "schema_change_allowed", baseline=check.baseline, where=where, differences=list(verdict.problems)
        )
        self._spawn(registry.add_event(self.store, check.model, check.version, entry))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except (StoreUnavailable, RecordError) as exc:  # history is best effort, like the audit log
                log.warning("could not write to the version registry: %s", exc)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
