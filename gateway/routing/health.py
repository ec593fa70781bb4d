"""Active health checks: is each backend ready, and is each version's model ready on it?

Every few seconds each worker asks every backend for `/v2/health/ready` and every version for its
model's ready endpoint. A version whose check fails gets no split traffic until a check passes again;
pinned requests to it are answered 503 with the reason. The checks use aiohttp: they are rare and off
the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from gateway.routing.table import Backend, RouteTable, triton_model_path

log = logging.getLogger("gateway.routing.health")

CHECK_INTERVAL = 2.0  # seconds between rounds
CHECK_TIMEOUT = 1.5  # per request; a backend slower than this to say "ready" is not ready


@dataclass(frozen=True)
class Health:
    ready: bool
    detail: str  # why not, in words; "" when ready
    checked_at: float


def reason_of(exc: BaseException) -> str:
    """Why a request to a backend failed, in words that name no address (they reach clients)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    if isinstance(exc, OSError):
        # From the errno, not `strerror`: asyncio puts the address in that ("Connect call failed (...)").
        return os.strerror(exc.errno).lower() if exc.errno else "connection failed"
    return type(exc).__name__


class HealthChecker:
    """Checks all backends and versions of the current table; tells `on_change` when readiness flips."""

    def __init__(self, on_change: Callable[[], None], interval: float = CHECK_INTERVAL) -> None:
        self._on_change = on_change
        self._interval = interval
        self._table: RouteTable | None = None
        self.backends: dict[str, Health] = {}
        self.versions: dict[tuple[str, str], Health] = {}  # (model, version id)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._round: asyncio.Future[None] | None = None  # resolved when the running round ends

    def unchecked(self) -> bool:
        """Whether some version of the current table has no check result yet."""
        table = self._table
        return table is not None and any(
            (model.name, version) not in self.versions
            for model in table.models.values()
            for version in model.versions
        )

    async def settled(self, timeout: float) -> None:
        """Return once every version has been checked once, or after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.unchecked() and self._task is not None:
            if self._round is None:
                self._round = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._round), deadline - loop.time())
            except TimeoutError:
                return

    def set_table(self, table: RouteTable) -> None:
        self._table = table
        keep = {(m.name, v) for m in table.models.values() for v in m.versions}
        self.versions = {key: h for key, h in self.versions.items() if key in keep}
        self.backends = {name: h for name, h in self.backends.items() if name in table.backends}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._session is not None:
            await self._session.close()

    async def check_now(self) -> None:
        try:
            await self._check_round()
        finally:
            done, self._round = self._round, None
            if done is not None and not done.done():
                done.set_result(None)

    async def _check_round(self) -> None:
        table = self._table
        if table is None:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT))
        names = list(table.backends)
        probes = [self._probe(table.backends[name], "/v2/health/ready") for name in names]
        backends = dict(zip(names, await asyncio.gather(*probes), strict=True))
        keys = [(m.name, v.id) for m in table.models.values() for v in m.versions.values()]
        version_probes = []
        for model_name, version_id in keys:
            version = table.models[model_name].versions[version_id]
            backend_health = backends[version.backend]
            if not backend_health.ready:
                detail = f"backend {version.backend} is not ready: {backend_health.detail}"
                version_probes.append(self._known(detail))
            else:
                path = triton_model_path(version) + "/ready"
                version_probes.append(self._probe(table.backends[version.backend], path))
        versions = dict(zip(keys, await asyncio.gather(*version_probes), strict=True))
        if table is not self._table:
            return  # the table changed while we were asking; the next round checks the new one
        old = self.versions
        flipped = [
            key for key, health in versions.items() if key not in old or old[key].ready != health.ready
        ]
        self.backends, self.versions = backends, versions
        for model_name, version_id in flipped:
            health = versions[(model_name, version_id)]
            state = "ready" if health.ready else f"NOT ready: {health.detail}"
            log.info("version %s of %s is %s", version_id, model_name, state)
        if flipped:
            self._on_change()

    async def _known(self, detail: str) -> Health:
        return Health(False, detail, time.time())

    async def _probe(self, backend: Backend, path: str) -> Health:
        assert self._session is not None
        url = f"http://{backend.host}:{backend.port}{path}"
        try:
            async with self._session.get(url) as response:
                await response.read()
                if response.status == 200:
                    return Health(True, "", time.time())
                return Health(False, f"{path} answered {response.status}", time.time())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            reason = reason_of(exc)
            log.debug("cannot reach backend %s at %s:%d: %s", backend.name, backend.host, backend.port, exc)
            return Health(False, f"cannot reach backend {backend.name}: {reason}", time.time())

    async def _run(self) -> None:
        while True:
            try:
                await self.check_now()
            except Exception:  # a bug in a check must not stop the checking
                log.exception("health check round failed")
            await asyncio.sleep(self._interval)
