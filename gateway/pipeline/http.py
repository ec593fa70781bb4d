"""The HTTP/1.1 front door: drives the pipeline from the HTTP server's callbacks.

One object per worker process, handed to every `ClientConnection`. For an inference request it takes
the current snapshot once, resolves the target, asks the pipeline for a plan (key, limits, version)
and forwards the planned request; the GET endpoints go to `Metadata`. It is also the exception
boundary's reporter: a bug in any step is logged once with the request id and counted in
`internal_errors`, and the client gets a 500, or a closed connection if its answer had started.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from typing import Any

from gateway.pipeline import steps
from gateway.pipeline.errors import Refusal
from gateway.pipeline.flow import Pipeline, Plan
from gateway.pipeline.forward import Mirrors, ProxyExchange, upstream_request
from gateway.pipeline.http_answer import JSON, send_error
from gateway.pipeline.metadata import Metadata
from gateway.pipeline.snapshot import ModelRoute
from gateway.routing.decisions import Endpoint, Target
from gateway.wire.headers import Headers
from gateway.wire.http_server import ClientConnection, Request

log = logging.getLogger("gateway.http")

# Endpoints that describe one model: when keys are required they need a key allowed to call the model.
MODEL_ENDPOINTS = frozenset((Endpoint.MODEL_METADATA, Endpoint.MODEL_READY, Endpoint.MODEL_CONFIG))


class HttpFrontDoor:
    def __init__(self, pipeline: Pipeline, metadata: Metadata) -> None:
        self.pipeline = pipeline
        self.metadata = metadata
        self.mirrors = Mirrors()
        self.internal_errors = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def captured_headers(self) -> frozenset[bytes]:
        return self.pipeline.captured_headers

    # -- RequestHandler ----------------------------------------------------------------------------

    def handle(self, request: Request, conn: ClientConnection) -> None:
        request_id = steps.request_id(request.header(b"x-request-id"))
        try:
            self._handle(request, conn, request_id)
        except Exception as exc:
            self._crashed(conn, request, request_id, exc)

    def refuse(
        self, conn: ClientConnection, status: int, message: str, headers: Headers | None = None
    ) -> None:
        """An answer the gateway gives without a version (malformed HTTP, limits of the server)."""
        self._refuse(conn, Refusal(status, message, headers))

    def crashed(self, conn: ClientConnection, request: Request | None, exc: BaseException) -> None:
        given = request.header(b"x-request-id") if request is not None else None
        self._report(given or b"-", exc)

    # -- the request path --------------------------------------------------------------------------

    def _handle(self, request: Request, conn: ClientConnection, request_id: bytes) -> None:
        snapshot = self.pipeline.snapshot  # the one snapshot this request sees, whatever reloads meanwhile
        target = steps.resolve_target(request.method, request.path)
        if isinstance(target, Refusal):
            self._refuse(conn, target)
            return

        def crashed(exc: BaseException) -> None:
            self._crashed(conn, request, request_id, exc)

        if target.endpoint in MODEL_ENDPOINTS and snapshot.table.keys.required:

            def authorized(result: ModelRoute | Refusal) -> None:
                if not conn.is_active(request):
                    return
                if isinstance(result, Refusal):
                    self._refuse(conn, result)
                else:
                    self._spawn(self._serve_metadata(request, conn, target, request_id))

            self.pipeline.authorize(snapshot, target, request, authorized, crashed)
            return
        if target.endpoint is not Endpoint.INFER:
            self._spawn(self._serve_metadata(request, conn, target, request_id))
            return

        def planned(result: Plan | Refusal) -> None:
            if not conn.is_active(request):
                return  # answered meanwhile (its body timed out or was too large), or the client left
            if isinstance(result, Refusal):
                self._refuse(conn, result)
                return

            if request.complete:  # the common case: no closure to wait for the body with
                self._forward(request, conn, result, request_id)
            else:  # when the body is in (and after a 100 Continue if the client waits for one)
                conn.read_body(request, lambda: self._forward(request, conn, result, request_id))

        self.pipeline.plan(snapshot, target, request, planned, crashed)

    def _forward(self, request: Request, conn: ClientConnection, plan: Plan, request_id: bytes) -> None:
        pair = self.mirrors.pair(plan.version, plan.shadow) if plan.shadow is not None else None
        exchange = ProxyExchange(
            conn, plan.version, request_id, plan.headers, self._report, plan.choice, pair
        )
        exchange.start(upstream_request(request, plan.version, request_id))
        if plan.shadow is not None:
            self.mirrors.send(request, plan.shadow, request_id, pair)

    def _refuse(self, conn: ClientConnection, refusal: Refusal) -> None:
        self.pipeline.stats.unrouted[refusal.counts_as] += 1
        send_error(conn, refusal.status, refusal.message, refusal.headers)

    def _crashed(
        self, conn: ClientConnection, request: Request, request_id: bytes, exc: BaseException
    ) -> None:
        self._report(request_id, exc)
        conn.fail_internal([(b"x-request-id", request_id)])

    def _report(self, request_id: bytes, exc: BaseException) -> None:
        self.internal_errors += 1
        log.error("internal error (request %s)", request_id.decode("latin-1"), exc_info=exc)

    # -- metadata, readiness and health (rare; through aiohttp) ------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_metadata(
        self, request: Request, conn: ClientConnection, target: Target, request_id: bytes
    ) -> None:
        try:
            status, payload = await self.metadata.answer(target.endpoint, target.model, target.version)
        except Exception as exc:  # a bug here must not leave the client hanging
            self._report(request_id, exc)
            status, payload = 500, {"error": "internal error"}
        if conn.closed:
            return
        body = json.dumps(payload).encode()  # for HEAD only its length is sent
        conn.respond(status, [JSON, (b"x-request-id", request_id)], body)

    async def close(self) -> None:
        self.pipeline.close()
        await self.metadata.close()
