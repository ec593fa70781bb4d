"""ModelInfer and ModelStreamInfer: the pipeline's plan, then the request's bytes to the chosen backend.

Each call goes through the same head steps as an HTTP request (`Pipeline.plan`: key, limits, version
by pin, alias, `x-model-version`, sticky metadata or the split), then the request bytes go to the
version's backend with only `model_name` and `model_version` rewritten to Triton's (protowire), over
the backend's shared channel, with the caller's deadline (or the backend's timeout, if sooner). The
answer comes back renamed to the public model and version; `x-model-version` and `x-request-id` are
sent in the answer's trailing metadata (a stream's: initial), with the rate-limit headers admission
gave.

What is recorded for the version is the backend's doing only, as over HTTP: the time from the request
sent to the answer received; a caller that cancels is `Outcome.ABANDONED`; a backend status that
blames the request (INVALID_ARGUMENT...) is the caller's. A version that does not answer within the
caller's deadline has timed out (`Outcome.TIMEOUT`), not been abandoned: gRPC callers nearly always set
deadlines, and a canary slower than them must count as failing, or it would look perfect. Split
traffic meets the same deadlines on every version, so the comparison stays fair.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.access.admission import AdmissionDecision
from gateway.grpc import protowire, statuses
from gateway.grpc.caller import GrpcCaller, settled
from gateway.grpc.channels import BackendChannel, Channels
from gateway.pipeline import steps
from gateway.pipeline.errors import Refusal
from gateway.pipeline.flow import Pipeline, Plan
from gateway.pipeline.snapshot import ModelRoute, VersionRoute
from gateway.routing.decisions import Endpoint, Target
from gateway.routing.table import Backend
from gateway.stats.counters import Choice, Outcome

log = logging.getLogger("gateway.grpc")

DEADLINE_SLACK = 0.9
MAX_MIRRORS_IN_FLIGHT = 128  # shadow copies beyond this are skipped: a slow mirror must not pile up
Abort = Callable[[Any, Refusal, bytes], Awaitable[None]]  # (context, refusal, request id); raises


class StreamIdle(Exception):
    """A stream's caller sent nothing for the idle timeout while no answer was outstanding."""


@dataclass(frozen=True, slots=True)
class Routed:
    """A planned call: where it goes and what its answer carries."""

    plan: Plan
    backend: Backend
    channel: BackendChannel
    request_id: bytes
    to_backend: bytes  # name_fields for Triton's model and version
    to_caller: bytes  # name_fields for the public model and version
    metadata: tuple[tuple[str, str], ...]  # what the answer's metadata carries
    shadow_backend: Backend | None  # where the mirror's copy goes, from the same snapshot

    @property
    def route(self) -> VersionRoute:
        return self.plan.version

    def timeout(self, remaining: float | None) -> tuple[float, bool]:
        """Seconds the backend gets, and whether that is the caller's deadline rather than its timeout."""
        limit = self.backend.timeout
        if remaining is not None and remaining < limit:
            return max(remaining, 0.0), True
        return limit, False


class Mirrors:
    """Shadow copies over gRPC in flight and skipped, for this process."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.skipped = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, channels: Channels, backend: Backend, route: VersionRoute, payload: bytes) -> None:
        if self.in_flight >= MAX_MIRRORS_IN_FLIGHT or not backend.grpc_address:
            self.skipped += 1
            return
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._shadow(channels, backend, route, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(
        self, channels: Channels, backend: Backend, route: VersionRoute, payload: bytes
    ) -> None:
        started = time.perf_counter()
        metadata = (("x-gateway-shadow", "1"),)
        try:
            await channels.get(backend.grpc_address).infer(
                payload, timeout=backend.timeout, metadata=metadata
            )
            status, outcome = 200, Outcome.OK
        except grpc.aio.AioRpcError as exc:
            status, outcome = statuses.recorded(exc.code())
        finally:
            self.in_flight -= 1
        steps.record(route, Choice.SHADOW, status, outcome, time.perf_counter() - started)


class Inference:
    def __init__(
        self,
        pipeline: Pipeline,
        channels: Channels,
        abort: Abort,
        first_message_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.pipeline = pipeline
        self.idle_timeout = idle_timeout  # a stream idle this long (nothing outstanding) is closed
        self.channels = channels
        self.mirrors = Mirrors()
        self._abort = abort
        self.first_message_timeout = first_message_timeout
        self._table: object = None  # the table the channels were last pruned for

    # -- the head steps ----------------------------------------------------------------------------

    async def first(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        """The call's first request message; a caller that sends none in time is cut off."""
        try:
            async with asyncio.timeout(self.first_message_timeout):  # a timer, not a task as wait_for
                return await anext(requests)
        except TimeoutError:
            message = f"no request message within {self.first_message_timeout:g}s of the call's start"
            await self._abort(context, Refusal(504, message), b"-")
        except StopAsyncIteration:
            await self._abort(context, Refusal(400, "the call ended without a request message"), b"-")
        raise AssertionError("abort raises")  # pragma: no cover

    async def route(self, request: bytes, context: Any, caller: GrpcCaller, request_id: bytes) -> Routed:
        """Plan a call from its (first) request, or abort it with the refusal's status."""
        snapshot = self.pipeline.snapshot  # the one snapshot this call sees, whatever reloads meanwhile
        if snapshot.table is not self._table:  # a reload: channels to backends no table names are closed
            self._table = snapshot.table
            self.channels.keep_only(b.grpc_address for b in snapshot.table.backends.values())
        try:
            head = protowire.infer_head(request)
        except protowire.WireError as exc:
            await self._abort(
                context, Refusal(400, f"the request is not a valid ModelInferRequest: {exc}"), request_id
            )
        if not head.model_name:
            await self._abort(
                context, Refusal(400, "the request names no model (model_name is empty)"), request_id
            )
        result = await self._plan(
            snapshot, Target(Endpoint.INFER, head.model_name, head.model_version), caller
        )
        if isinstance(result, Refusal):
            await self._abort(context, result, request_id)
            raise AssertionError("abort raises")  # pragma: no cover
        version = result.version.version
        backend = snapshot.table.backends[version.backend]
        if not backend.grpc_address:
            message = (
                f"version {version.id} of model {result.version.model} is served by backend {backend.name}, "
                "which has no grpc_url in routes.yaml; call it over HTTP, or give the backend a grpc_url"
            )
            await self._abort(context, Refusal(501, message), request_id)
        own = [("x-model-version", version.id), ("x-request-id", request_id.decode("latin-1"))]
        own += [(name.decode(), value.decode("latin-1")) for name, value in result.headers or ()]
        return Routed(
            result,
            backend,
            self.channels.get(backend.grpc_address),
            request_id,
            protowire.name_fields(version.triton_model, version.triton_version),
            protowire.name_fields(result.version.model, version.id),
            tuple(own),
            snapshot.table.backends[result.shadow.version.backend] if result.shadow is not None else None,
        )

    def _plan(self, snapshot: Any, target: Target, caller: GrpcCaller) -> asyncio.Future[Plan | Refusal]:
        return settled(lambda then, crashed: self.pipeline.plan(snapshot, target, caller, then, crashed))

    # -- ModelInfer --------------------------------------------------------------------------------

    async def unary(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        request = await self.first(requests, context)
        caller = GrpcCaller(context.invocation_metadata(), context.peer())
        request_id = steps.request_id(caller.header(b"x-request-id"))
        routed = await self.route(request, context, caller, request_id)
        # In the trailing metadata, sent with the status: initial metadata would be a write of its own,
        # about 100 us more per call (a sixth of the gateway's CPU per call, measured).
        context.set_trailing_metadata(routed.metadata)
        payload = request + routed.to_backend
        plan, route = routed.plan, routed.route
        if plan.shadow is not None and routed.shadow_backend is not None:
            shadow = plan.shadow.version  # the copy names the mirror version's own Triton target
            copy = request + protowire.name_fields(shadow.triton_model, shadow.triton_version)
            self.mirrors.send(self.channels, routed.shadow_backend, plan.shadow, copy)
        timeout, callers_deadline = routed.timeout(context.time_remaining())
        route.counters.in_flight += 1
        started = time.perf_counter()
        try:
            answer = await routed.channel.infer(
                payload, timeout=timeout, metadata=(("x-request-id", routed.metadata[1][1]),)
            )
        except grpc.aio.AioRpcError as exc:
            route.counters.in_flight -= 1
            await self._failed(context, routed, exc, started, timeout, callers_deadline)
            raise AssertionError("abort raises") from None  # pragma: no cover
        except asyncio.CancelledError:  # the caller cancelled, or its deadline passed
            route.counters.in_flight -= 1
            elapsed = time.perf_counter() - started
            # The caller's deadline ends on its side a little before ours (grpc-timeout is sent as a
            # duration), so its cancellation in the last tenth of the deadline is the deadline's.
            if callers_deadline and elapsed >= DEADLINE_SLACK * timeout:
                steps.record(route, plan.choice, 504, Outcome.TIMEOUT, elapsed)
            else:  # the caller left: not the version's doing
                steps.record(route, plan.choice, 499, Outcome.ABANDONED, elapsed)
            raise
        route.counters.in_flight -= 1
        steps.record(route, plan.choice, 200, Outcome.OK, time.perf_counter() - started)
        return bytes(answer) + routed.to_caller

    async def _failed(
        self,
        context: Any,
        routed: Routed,
        exc: grpc.aio.AioRpcError,
        started: float,
        timeout: float | None,
        callers_deadline: bool,
    ) -> None:
        code = exc.code()
        status, outcome = statuses.recorded(code)
        route = routed.route
        steps.record(route, routed.plan.choice, status, outcome, time.perf_counter() - started)
        what = f"version {route.version.id} of model {route.model}"
        backend = f"backend {routed.backend.name} ({routed.backend.grpc_address})"
        if code is grpc.StatusCode.UNAVAILABLE:
            refusal = Refusal(503, f"{what}: {backend} is unavailable: {exc.details()}")
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            bound = "the call's deadline" if callers_deadline else f"{backend}'s timeout"
            within = f" within {timeout:.3g}s" if timeout is not None else ""
            refusal = Refusal(504, f"{what} did not answer{within} ({bound})")
        else:
            await context.abort(code, f"{what}: {exc.details()}", trailing_metadata=routed.metadata)
            return
        await self._abort(context, refusal, routed.request_id)

    # -- ModelStreamInfer --------------------------------------------------------------------------

    async def stream(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        """Routed by the first request; every later one must name the same model and version.

        A stream whose caller sends nothing for the server's keepalive_timeout while no answer is
        outstanding is closed (DEADLINE_EXCEEDED), as HTTP closes an idle keep-alive connection.

        Each later request is admitted again (the key's and the model's limits apply per request, not
        per stream); one over a limit is answered in the stream with an error_message, as Triton answers
        a failed request of a stream, and the stream goes on.
        """
        first = await self.first(requests, context)
        caller = GrpcCaller(context.invocation_metadata(), context.peer())
        request_id = steps.request_id(caller.header(b"x-request-id"))
        snapshot = self.pipeline.snapshot
        routed = await self.route(first, context, caller, request_id)
        head = protowire.infer_head(first)
        model = snapshot.models.get(routed.route.model)
        await context.send_initial_metadata(routed.metadata)
        # A stream lasts as long as its caller wants: the backend's timeout bounds one exchange, not a
        # stream of them, so only the caller's own deadline applies to it.
        remaining = context.time_remaining()
        timeout, callers_deadline = (remaining, True) if remaining is not None else (None, False)
        route, choice = routed.route, routed.plan.choice
        call = routed.channel.stream(timeout=timeout, metadata=(("x-request-id", routed.metadata[1][1]),))
        sent: deque[float] = deque()  # when each request still unanswered went out
        out: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()  # None: the backend is done
        mismatch: list[str] = []
        loop, idle = asyncio.get_running_loop(), self.idle_timeout
        timer: list[asyncio.Timeout] = []  # the pump's wait for the caller's next request, while it waits

        async def pump() -> None:
            sent.append(time.perf_counter())
            await call.write(first + routed.to_backend)
            count = 1
            while True:
                try:
                    # Idle: nothing sent and no answer outstanding (relay restarts the clock on the last).
                    async with asyncio.timeout_at(None if sent else loop.time() + idle) as waiting:
                        timer[:] = [waiting]
                        request = await anext(requests)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    out.put_nowait(StreamIdle())
                    return
                finally:
                    timer.clear()
                count += 1
                try:
                    other = protowire.infer_head(request)
                except protowire.WireError as exc:
                    mismatch.append(f"request {count} of the stream is not a valid ModelInferRequest: {exc}")
                    call.cancel()
                    return
                if other != head:
                    mismatch.append(
                        f"a stream is routed by its first request (model {head.model_name!r}, version "
                        f"{head.model_version!r}); request {count} names model {other.model_name!r}, version "
                        f"{other.model_version!r}: open another stream for it"
                    )
                    call.cancel()
                    return
                refusal = await self._admit_again(model, caller)
                if refusal is not None:
                    self.pipeline.stats.unrouted[refusal.counts_as] += 1
                    out.put_nowait(
                        protowire.string_field(protowire.STREAM_ERROR_MESSAGE, refusal.message.encode())
                    )
                    continue
                sent.append(time.perf_counter())
                await call.write(request + routed.to_backend)
            await call.done_writing()

        async def relay() -> None:
            try:
                async for response in call:
                    seconds = time.perf_counter() - sent.popleft() if sent else 0.0
                    if not sent and timer:
                        timer[0].reschedule(loop.time() + idle)
                    if protowire.strings(response, (protowire.STREAM_ERROR_MESSAGE,)):
                        steps.record(route, choice, 500, Outcome.SERVER_ERROR, seconds)
                    else:
                        steps.record(route, choice, 200, Outcome.OK, seconds)
                    out.put_nowait(protowire.stream_rename(response, routed.to_caller))
                out.put_nowait(None)
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
                out.put_nowait(exc)

        writer, reader = loop.create_task(pump()), loop.create_task(relay())
        # A caller that leaves mid-stream ends the pump with an error; the call's own status says why.
        writer.add_done_callback(lambda task: task.cancelled() or task.exception())
        route.counters.in_flight += 1
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, StreamIdle):
                    message = f"the stream sent nothing for {idle:g}s with no answer outstanding; closed"
                    await self._abort(context, Refusal(504, message), request_id)
                if isinstance(item, BaseException):
                    if mismatch:  # the backend call was cancelled for it
                        await self._abort(context, Refusal(400, mismatch[0]), request_id)
                    if isinstance(item, grpc.aio.AioRpcError):
                        started = sent[0] if sent else time.perf_counter()
                        await self._failed(context, routed, item, started, timeout, callers_deadline)
                    raise item
                yield item
        finally:
            route.counters.in_flight -= 1
            writer.cancel()
            reader.cancel()
            call.cancel()

    async def _admit_again(self, model: ModelRoute | None, caller: GrpcCaller) -> Refusal | None:
        """Admission for a later request of a stream: its key was checked; its limits apply again."""
        admission = self.pipeline.admission
        if admission is None or model is None or not model.admission_needed:
            return None
        decision: AdmissionDecision = await settled(
            lambda then, crashed: admission.admit(model.access, caller, then, crashed)
        )
        return steps.admission_refusal(decision) if decision.status else None
