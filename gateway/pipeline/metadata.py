"""Metadata, readiness and health: the KServe v2 GET endpoints.

Readiness has one source, the health checker (gateway.routing.health), whose results are in the routing
snapshot: `/v2/health/ready` and the model ready endpoints say what routing believes, and never ask the
backends a second time. A version not checked yet is not ready; while the first round of checks is
running (just after start or a reload) the ready endpoints wait for it, at most `SETTLE_TIMEOUT`.

Metadata and config are the backend's, fetched with aiohttp (rare, off the hot path), and may decode
JSON: model metadata is renamed to the public model and versions and extended with the gateway's own
version metadata (training data, metrics, commit).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from gateway import __version__
from gateway.pipeline.snapshot import RoutingSnapshot
from gateway.routing.decisions import Endpoint
from gateway.routing.health import CHECK_TIMEOUT, reason_of
from gateway.routing.table import Backend, Model, Version, triton_model_path

Answer = tuple[int, dict[str, Any]]
METADATA_TIMEOUT = 5.0  # seconds; a backend slow to describe a model must not hold the caller for long
SETTLE_TIMEOUT = CHECK_TIMEOUT + 0.5  # a round of checks takes at most one check timeout
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
NOT_CHECKED = "not checked yet"


def public_metadata(
    model: Model, version: Version, registered: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The gateway's view of a version, added to the backend's model metadata; `registered` is what the
    version registry says of it (gateway.artifacts.registry.summary)."""
    return {
        "version": version.id,
        "aliases": sorted(alias for alias, target in model.aliases.items() if target == version.id),
        "metadata": dict(version.metadata),
        "backend": version.backend,
        "target": f"{version.triton_model}/{version.triton_version}".rstrip("/"),
        "archive": version.archive or None,
        "registry": dict(registered) if registered is not None else None,
    }


def primary_version(model: Model, snapshot: RoutingSnapshot) -> Version:
    """The version that answers for the model as a whole: the one with the most traffic."""
    split = snapshot.split_of(model.name)
    if split:
        return model.versions[max(split, key=lambda item: item[1])[0]]
    return next(iter(model.versions.values()))


def version_ready(snapshot: RoutingSnapshot, model: str, version: str) -> tuple[bool, str]:
    health = snapshot.health.get((model, version))
    if health is None:
        return False, NOT_CHECKED
    return health.ready, health.detail


def model_ready(snapshot: RoutingSnapshot, model: Model, pinned: Version | None) -> Answer:
    """Ready when the pinned version is, or when any version that takes traffic is."""
    if pinned is not None:
        candidates = [pinned.id]
    else:
        candidates = [v for v, weight in snapshot.split_of(model.name) if weight > 0]
    results = [version_ready(snapshot, model.name, v) for v in candidates]
    if any(ready for ready, _ in results):
        return 200, {"name": model.name, "ready": True}
    reasons = "; ".join(f"{v}: {why}" for v, (_, why) in zip(candidates, results, strict=True))
    return 503, {"name": model.name, "ready": False, "error": reasons or "no version takes traffic"}


def server_ready(snapshot: RoutingSnapshot) -> Answer:
    """Ready when a table is loaded and every model has a version taking traffic that is ready.

    Anyone may ask (load balancers and Kubernetes probes have no key), so the answer names no model
    and no backend; the admin API has the details.
    """
    models = snapshot.table.models.values()
    failing = sum(1 for model in models if model_ready(snapshot, model, None)[0] != 200)
    if failing:
        error = (
            f"{failing} of {len(models)} model(s) have no ready version taking traffic (see the admin API)"
        )
        return 503, {"ready": False, "error": error}
    return 200, {"ready": True}


class Metadata:
    """Answers the GET endpoints against the current snapshot (`current()`)."""

    def __init__(
        self,
        current: Callable[[], RoutingSnapshot],
        settled: Callable[[float], Awaitable[None]],
        registry: Callable[[str, str], Mapping[str, Any] | None] = lambda model, version: None,
    ) -> None:
        self._current = current
        self._settled = settled  # waits until every version of the table has been checked once
        self._registry = registry  # what the version registry says of (model, version), as last read
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def answer(self, endpoint: Endpoint, model_name: str, pin: str) -> Answer:
        if endpoint is Endpoint.SERVER_METADATA:
            return 200, {"name": "model-gateway", "version": __version__, "extensions": EXTENSIONS}
        if endpoint is Endpoint.HEALTH_LIVE:
            return 200, {"live": True}
        if endpoint in (Endpoint.HEALTH_READY, Endpoint.MODEL_READY):
            await self._settled(SETTLE_TIMEOUT)
        snapshot = self._current()
        if endpoint is Endpoint.HEALTH_READY:
            return server_ready(snapshot)
        model = snapshot.table.models.get(model_name)
        if model is None:
            return 404, {"error": f"unknown model {model_name!r}"}
        version = model.resolve(pin) if pin else primary_version(model, snapshot)
        if version is None:
            return 404, {"error": f"model {model.name} has no version or alias {pin!r}"}
        if endpoint is Endpoint.MODEL_READY:
            return model_ready(snapshot, model, version if pin else None)
        backend = snapshot.table.backends[version.backend]
        suffix = "/config" if endpoint is Endpoint.MODEL_CONFIG else ""
        try:
            status, payload = await self._get(backend, triton_model_path(version) + suffix)
        except ConnectionError as exc:
            return 503, {"error": str(exc)}
        if status != 200 or not isinstance(payload, dict):
            error = payload.get("error") if isinstance(payload, dict) else None
            return (status if status >= 400 else 502), {"error": error or f"backend answered {status}"}
        if endpoint is Endpoint.MODEL_METADATA:
            payload = {
                **payload,
                "name": model.name,
                "versions": [version.id] if pin else list(model.versions),
                "gateway": public_metadata(model, version, self._registry(model.name, version.id)),
            }
        return 200, payload

    async def _get(self, backend: Backend, path: str) -> tuple[int, Any]:
        """GET a backend path; (status, JSON or None). Raises ConnectionError when it cannot."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=METADATA_TIMEOUT))
        url = f"http://{backend.host}:{backend.port}{path}"
        try:
            async with self._session.get(url) as response:
                data = await response.read()
                try:
                    payload = await response.json(content_type=None) if data else None
                except ValueError:
                    payload = None
                return response.status, payload
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ConnectionError(f"backend {backend.name} is unavailable: {reason_of(exc)}") from exc
