"""The gRPC port: grpcio's asyncio server with the gateway's limits, the service, and grpc.health.v1.

Its limits come from the `server:` settings of routes.yaml where one means the same thing over
HTTP/2 (read when the port opens; a reload does not change them):
- `max_body_size` bounds a request message (grpc.max_receive_message_length: RESOURCE_EXHAUSTED),
- `max_header_size` the metadata of a call (grpc.max_metadata_size),
- `header_timeout` + `body_timeout` how long a call may stay open before its (first) request message
  is in (a message is an HTTP request's head and body at once): a client that opens streams and
  never sends is cut off (infer.py), instead of holding a stream,
- `keepalive_timeout` how long a connection with no call stays open (grpc.max_connection_idle_ms),
  and a stream that sends nothing while no answer is outstanding (infer.py),
- `max_connections` how many calls one process serves at once (the rest get RESOURCE_EXHAUSTED).
The ones that exist only in gRPC are named here once: concurrent streams per connection (HTTP/2's
SETTINGS_MAX_CONCURRENT_STREAMS, RFC 9113 section 6.5.2) and keepalive pings, both ways: the server
pings an idle client to find dead connections, and refuses clients that ping more often than it allows
(a ping flood costs the server work for nothing).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.grpc.channels import SERVICE
from gateway.grpc.service import GrpcFrontDoor
from gateway.pipeline.metadata import server_ready
from gateway.routing.table import ServerSettings

log = logging.getLogger("gateway.grpc")

# Per connection. Not HTTP/2's usual 100: grpcio counts a stream until its asyncio handler has ended,
# a little after the client saw its answer, so a client keeping 64 calls in flight was refused streams
# (RST_STREAM REFUSED_STREAM) at 100. Triton sets none.
MAX_CONCURRENT_STREAMS = 1000
KEEPALIVE_TIME_MS = 60_000  # ping a connection idle this long
KEEPALIVE_TIMEOUT_MS = 20_000  # and close it if the ping is not answered within this
MIN_CLIENT_PING_INTERVAL_MS = 10_000  # clients may ping at most this often (gRPC's default is 5 min)
HEALTH_INTERVAL = 1.0  # seconds between readiness updates of grpc.health.v1


def server_options(settings: ServerSettings, reuse_port: bool) -> list[tuple[str, Any]]:
    return [
        ("grpc.so_reuseport", 1 if reuse_port else 0),  # gRPC's default is on: two gateways must not share
        ("grpc.max_receive_message_length", settings.max_body_size),
        ("grpc.max_send_message_length", -1),  # the backend's answer, whatever its size
        ("grpc.max_metadata_size", settings.max_header_size),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.max_connection_idle_ms", int(settings.keepalive_timeout * 1000)),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
    ]


class GrpcPort:
    """The gRPC server of one worker process, and the readiness it reports to grpc.health.v1."""

    def __init__(self, front_door: GrpcFrontDoor, settings: ServerSettings, reuse_port: bool) -> None:
        self.front_door = front_door
        self.server = grpc.aio.server(
            options=server_options(settings, reuse_port), maximum_concurrent_rpcs=settings.max_connections
        )
        self.server.add_generic_rpc_handlers((front_door.handler(),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._updater: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; the port actually bound (for port 0)."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound: int = self.server.add_insecure_port(address)
        if not bound:
            raise OSError(f"cannot listen on {address} for gRPC")
        await self.server.start()
        self._updater = asyncio.get_running_loop().create_task(self._report_health())
        return bound

    async def _report_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            try:
                ready = server_ready(self.front_door.pipeline.snapshot)[0] == 200
                for service in ("", SERVICE):
                    await self.health.set(service, serving if ready else not_serving)
            except Exception:  # a bug here must not end health reporting for good
                log.exception("updating grpc.health.v1 failed")
            await asyncio.sleep(HEALTH_INTERVAL)

    async def stop(self, grace: float) -> None:
        """Stop taking calls; calls in flight get `grace` seconds to finish."""
        if self._updater is not None:
            self._updater.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.front_door.close()
