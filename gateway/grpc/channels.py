"""Channels to the backends' gRPC ports, one per address, shared by every call of this process.

A grpc.aio channel multiplexes any number of calls over one HTTP/2 connection and reconnects by itself,
so it is the pool: calls to one backend share it, and a backend's channel is closed once no table names
its address any more. Inference calls carry bytes both ways (no serializer: the front door renames
them with protowire, never decoding tensors); the rare metadata calls decode with Triton's own
generated messages (tritonclient.grpc.service_pb2).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

SERVICE = "inference.GRPCInferenceService"
CLOSE_GRACE = 60.0  # seconds calls on a channel no table names any more may still take
CHANNEL_OPTIONS = (
    # A backend's answer is as large as the model makes it; the caller's side bounds what it accepts.
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Find a dead connection to a backend within a minute even when it is idle.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


class BackendChannel:
    """One backend address: its channel and the method callables on it (built once)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        path = f"/{SERVICE}/"
        self.infer: Any = self.channel.unary_unary(path + "ModelInfer")
        self.stream: Any = self.channel.stream_stream(path + "ModelStreamInfer")
        self.metadata: Any = self.channel.unary_unary(
            path + "ModelMetadata",
            request_serializer=service_pb2.ModelMetadataRequest.SerializeToString,
            response_deserializer=service_pb2.ModelMetadataResponse.FromString,
        )
        self.config: Any = self.channel.unary_unary(
            path + "ModelConfig",
            request_serializer=service_pb2.ModelConfigRequest.SerializeToString,
            response_deserializer=service_pb2.ModelConfigResponse.FromString,
        )


class Channels:
    def __init__(self) -> None:
        self._by_address: dict[str, BackendChannel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, address: str) -> BackendChannel:
        channel = self._by_address.get(address)
        if channel is None:
            channel = self._by_address[address] = BackendChannel(address)
        return channel

    def keep_only(self, addresses: Iterable[str]) -> None:
        """Close the channels of addresses no table names any more (after a reload); calls still on
        them (begun on the old table) get CLOSE_GRACE seconds to finish."""
        wanted = set(addresses)
        for address in [a for a in self._by_address if a not in wanted]:
            closing = asyncio.get_running_loop().create_task(
                self._by_address.pop(address).channel.close(CLOSE_GRACE)
            )
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for channel in self._by_address.values():
            await channel.channel.close(grace=None)
        self._by_address.clear()
