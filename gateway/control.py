"""Metadata, readiness and health: the KServe v2 GET endpoints, answered by asking the backends.

These are rare compared with inference, so they use aiohttp's client rather than the hand-written pool,
and they may decode JSON: model metadata is the backend's, renamed to the public model and versions and
extended with the gateway's own version metadata (training data, metrics, commit).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from gateway import __version__
from gateway.routing import Endpoint, Router
from gateway.table import Backend, Model, RouteTable, Version

Answer = tuple[int, dict[str, Any]]
CONTROL_TIMEOUT = 5.0  # seconds; metadata and readiness must not hang a health checker
READY_CACHE_SECONDS = 1.0
EXTENSIONS = ["binary_tensor_data", "model_configuration"]


def triton_model_path(version: Version) -> str:
    if version.triton_version:
        return f"/v2/models/{version.triton_model}/versions/{version.triton_version}"
    return f"/v2/models/{version.triton_model}"


def public_metadata(model: Model, version: Version) -> dict[str, Any]:
    """The gateway's view of a version, added to the backend's model metadata."""
    return {
        "version": version.id,
        "aliases": sorted(alias for alias, target in model.aliases.items() if target == version.id),
        "metadata": dict(version.metadata),
        "backend": version.backend,
        "target": f"{version.triton_model}/{version.triton_version}".rstrip("/"),
    }


def primary_version(model: Model, router: Router) -> Version:
    """The version that answers for the model as a whole: the one with the most traffic."""
    split = router.split_of(model.name)
    if split:
        return model.versions[max(split, key=lambda item: item[1])[0]]
    return next(iter(model.versions.values()))


class Control:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._ready_at = 0.0
        self._ready_answer: Answer | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get(self, backend: Backend, path: str) -> tuple[int, Any]:
        """GET a backend path; (status, JSON or None). Raises OSError-like errors as ConnectionError."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT))
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
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
            raise ConnectionError(f"backend {backend.name} is unavailable: {reason}") from exc

    async def version_ready(self, table: RouteTable, version: Version) -> tuple[bool, str]:
        try:
            status, _ = await self._get(
                table.backends[version.backend], triton_model_path(version) + "/ready"
            )
        except ConnectionError as exc:
            return False, str(exc)
        return status == 200, "" if status == 200 else f"backend {version.backend} says not ready ({status})"

    async def answer(
        self, table: RouteTable, router: Router, endpoint: Endpoint, model_name: str, pin: str
    ) -> Answer:
        if endpoint is Endpoint.SERVER_METADATA:
            return 200, {"name": "model-gateway", "version": __version__, "extensions": EXTENSIONS}
        if endpoint is Endpoint.HEALTH_LIVE:
            return 200, {"live": True}
        if endpoint is Endpoint.HEALTH_READY:
            return await self._server_ready(table, router)
        model = table.models.get(model_name)
        if model is None:
            return 404, {"error": f"unknown model {model_name!r}"}
        version = model.resolve(pin) if pin else primary_version(model, router)
        if version is None:
            return 404, {"error": f"model {model.name} has no version or alias {pin!r}"}
        if endpoint is Endpoint.MODEL_READY:
            return await self._model_ready(table, router, model, version if pin else None)
        backend = table.backends[version.backend]
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
                "gateway": public_metadata(model, version),
            }
        return 200, payload

    async def _model_ready(
        self, table: RouteTable, router: Router, model: Model, version: Version | None
    ) -> Answer:
        if version is not None:
            candidates = [version]
        else:
            candidates = [model.versions[v] for v, weight in router.split_of(model.name) if weight > 0]
        results = await asyncio.gather(*(self.version_ready(table, v) for v in candidates))
        if any(ready for ready, _ in results):
            return 200, {"name": model.name, "ready": True}
        reasons = "; ".join(f"{v.id}: {why}" for v, (_, why) in zip(candidates, results, strict=True))
        return 503, {"name": model.name, "ready": False, "error": reasons or "no version takes traffic"}

    async def _server_ready(self, table: RouteTable, router: Router) -> Answer:
        now = time.monotonic()
        if self._ready_answer is not None and now - self._ready_at < READY_CACHE_SECONDS:
            return self._ready_answer
        answers = await asyncio.gather(
            *(self._model_ready(table, router, model, None) for model in table.models.values())
        )
        problems = [
            f"model {name}: {body['error']}"
            for name, (status, body) in zip(table.models, answers, strict=True)
            if status != 200
        ]
        answer: Answer = (
            (503, {"ready": False, "error": "; ".join(problems)}) if problems else (200, {"ready": True})
        )
        self._ready_at, self._ready_answer = now, answer
        return answer
