"""The gRPC front door: `inference.GRPCInferenceService` (KServe v2, as Triton serves it) and its refusals.

Inference (infer.py) passes bytes through; the other RPCs are rare and use Triton's generated messages:
liveness and readiness from the routing snapshot (the same answers as HTTP's, from pipeline/metadata.py),
model metadata and config from the version's backend, renamed to the public model and version. The
model endpoints need a key allowed to call the model when keys are required, as over HTTP.
Repository, shared-memory, trace and log RPCs change or reveal the backends, which is operators' work
through the admin API: they are refused with PERMISSION_DENIED.

Every handler is an exception boundary: a refusal is the status it maps to (statuses.py) with the
pipeline's message and, for a limit, `retry-after` and the rate-limit policy in the trailing metadata;
a bug is logged once with the request id, counted in `internal_errors`, and answered INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from tritonclient.grpc import service_pb2

from gateway import __version__
from gateway.grpc import statuses
from gateway.grpc.caller import GrpcCaller, settled
from gateway.grpc.channels import SERVICE, Channels
from gateway.grpc.infer import Inference, Mirrors
from gateway.pipeline import steps
from gateway.pipeline.errors import Refusal
from gateway.pipeline.flow import Pipeline
from gateway.pipeline.metadata import EXTENSIONS, METADATA_TIMEOUT, Metadata, primary_version
from gateway.pipeline.snapshot import ModelRoute
from gateway.routing.decisions import Endpoint, Target
from gateway.routing.table import Model, Version

log = logging.getLogger("gateway.grpc")

REFUSED = {
    "RepositoryIndex": "the model repository",
    "RepositoryModelLoad": "the model repository",
    "RepositoryModelUnload": "the model repository",
    "SystemSharedMemoryStatus": "shared memory",
    "SystemSharedMemoryRegister": "shared memory",
    "SystemSharedMemoryUnregister": "shared memory",
    "CudaSharedMemoryStatus": "shared memory",
    "CudaSharedMemoryRegister": "shared memory",
    "CudaSharedMemoryUnregister": "shared memory",
    "TraceSetting": "tracing",
    "LogSettings": "logging",
    "ModelStatistics": "Triton's statistics",
}


class GrpcFrontDoor:
    def __init__(
        self, pipeline: Pipeline, metadata: Metadata, first_message_timeout: float, idle_timeout: float
    ) -> None:
        self.pipeline = pipeline
        self.metadata = metadata
        self.channels = Channels()
        self.internal_errors = 0
        self.inference = Inference(pipeline, self.channels, self.abort, first_message_timeout, idle_timeout)

    @property
    def mirrors(self) -> Mirrors:
        return self.inference.mirrors

    # -- refusals and the exception boundary -------------------------------------------------------

    async def abort(self, context: Any, refusal: Refusal, request_id: bytes) -> NoReturn:
        """End the call with the refusal's status; raises (grpc's AbortError)."""
        self.pipeline.stats.unrouted[refusal.counts_as] += 1
        trailing = [(name.decode(), value.decode("latin-1")) for name, value in refusal.headers or ()]
        if request_id != b"-":
            trailing.append(("x-request-id", request_id.decode("latin-1")))
        await context.abort(
            statuses.code_for(refusal.status), refusal.message, trailing_metadata=tuple(trailing)
        )
        raise AssertionError("context.abort raises")  # pragma: no cover

    def _crashed(self, context: Any, exc: BaseException) -> Awaitable[None]:
        self.internal_errors += 1
        request_id = GrpcCaller(context.invocation_metadata(), context.peer()).header(b"x-request-id")
        log.error("internal error (gRPC request %s)", (request_id or b"-").decode("latin-1"), exc_info=exc)
        return context.abort(grpc.StatusCode.INTERNAL, "internal error")  # type: ignore[no-any-return]

    def _guarded(self, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(handler)
        async def guarded(request: Any, context: Any) -> Any:
            try:
                return await handler(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._crashed(context, exc)

        return guarded

    def _guarded_stream(
        self, handler: Callable[[Any, Any], AsyncIterator[bytes]]
    ) -> Callable[[Any, Any], AsyncIterator[bytes]]:
        async def guarded(requests: Any, context: Any) -> AsyncIterator[bytes]:
            try:
                async for response in handler(requests, context):
                    yield response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._crashed(context, exc)

        return guarded

    # -- the service -------------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        typed = grpc.unary_unary_rpc_method_handler
        pb = service_pb2

        def unary(name: str, fn: Callable[[Any, Any], Awaitable[Any]]) -> grpc.RpcMethodHandler:
            request, response = getattr(pb, name + "Request"), getattr(pb, name + "Response")
            return typed(
                self._guarded(fn),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )

        methods = {
            # Bytes through: no (de)serializer, infer.py reads only the names.
            "ModelInfer": grpc.stream_unary_rpc_method_handler(self._guarded(self.inference.unary)),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self._guarded_stream(self.inference.stream)
            ),
            "ServerLive": unary("ServerLive", self.server_live),
            "ServerReady": unary("ServerReady", self.server_ready),
            "ServerMetadata": unary("ServerMetadata", self.server_metadata),
            "ModelReady": unary("ModelReady", self.model_ready),
            "ModelMetadata": unary("ModelMetadata", self.model_metadata),
            "ModelConfig": unary("ModelConfig", self.model_config),
        }
        for name, what in REFUSED.items():
            methods[name] = grpc.unary_unary_rpc_method_handler(functools.partial(self._refused, what))
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    async def _refused(self, what: str, request: bytes, context: Any) -> None:
        message = f"the gateway does not expose {what} of its backends; operators use the admin API"
        await self.abort(context, Refusal(403, message), b"-")

    async def server_live(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Any) -> Any:
        status, _ = await self.metadata.answer(Endpoint.HEALTH_READY, "", "")
        return service_pb2.ServerReadyResponse(ready=status == 200)

    async def server_metadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(
            name="model-gateway", version=__version__, extensions=EXTENSIONS
        )

    async def model_ready(self, request: Any, context: Any) -> Any:
        await self._authorize(context, Target(Endpoint.MODEL_READY, request.name, request.version))
        status, payload = await self.metadata.answer(Endpoint.MODEL_READY, request.name, request.version)
        if status == 404:
            await self.abort(context, Refusal(404, payload["error"]), b"-")
        return service_pb2.ModelReadyResponse(ready=status == 200)

    async def model_metadata(self, request: Any, context: Any) -> Any:
        model, version, channel = await self._backend_of(context, Endpoint.MODEL_METADATA, request)
        ask = service_pb2.ModelMetadataRequest(name=version.triton_model, version=version.triton_version)
        answer = await self._ask(context, model, version, channel.metadata(ask, timeout=METADATA_TIMEOUT))
        answer.name = model.name
        del answer.versions[:]
        answer.versions.extend([version.id] if request.version else list(model.versions))
        return answer

    async def model_config(self, request: Any, context: Any) -> Any:
        model, version, channel = await self._backend_of(context, Endpoint.MODEL_CONFIG, request)
        ask = service_pb2.ModelConfigRequest(name=version.triton_model, version=version.triton_version)
        answer = await self._ask(context, model, version, channel.config(ask, timeout=METADATA_TIMEOUT))
        answer.config.name = model.name
        return answer

    # -- helpers of the model RPCs -----------------------------------------------------------------

    async def _authorize(self, context: Any, target: Target) -> None:
        """With keys required, the same key checks as inference (401 / 403 / 404), without the limits."""
        snapshot = self.pipeline.snapshot
        if not snapshot.table.keys.required:
            return
        caller = GrpcCaller(context.invocation_metadata(), context.peer())
        result: ModelRoute | Refusal = await settled(
            lambda then, crashed: self.pipeline.authorize(snapshot, target, caller, then, crashed)
        )
        if isinstance(result, Refusal):
            await self.abort(context, result, steps.request_id(caller.header(b"x-request-id")))

    async def _backend_of(self, context: Any, endpoint: Endpoint, request: Any) -> tuple[Model, Version, Any]:
        await self._authorize(context, Target(endpoint, request.name, request.version))
        snapshot = self.pipeline.snapshot
        model = snapshot.table.models.get(request.name)
        if model is None:
            await self.abort(context, Refusal(404, f"unknown model {request.name!r}"), b"-")
        version = model.resolve(request.version) if request.version else primary_version(model, snapshot)
        if version is None:
            versions = ", ".join(model.versions)
            message = f"model {model.name} has no version or alias {request.version!r}; versions: {versions}"
            await self.abort(context, Refusal(404, message), b"-")
        backend = snapshot.table.backends[version.backend]
        if not backend.grpc_address:
            message = (
                f"version {version.id} of model {model.name} is served by backend {backend.name}, which has "
                "no grpc_url in routes.yaml; ask over HTTP, or give the backend a grpc_url"
            )
            await self.abort(context, Refusal(501, message), b"-")
        return model, version, self.channels.get(backend.grpc_address)

    async def _ask(self, context: Any, model: Model, version: Version, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            what = f"version {version.id} of model {model.name}"
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                message = f"{what}: backend {version.backend} is unavailable: {exc.details()}"
                await self.abort(context, Refusal(503, message), b"-")
            await context.abort(exc.code(), f"{what}: {exc.details()}")

    async def close(self) -> None:
        await self.channels.close()
