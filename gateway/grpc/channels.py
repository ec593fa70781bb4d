"""Channels to the backends' gRPC ports, one per address, shared by every call of this process.

A grpc.aio channel multiplexes any number of calls over one HTTP/2 connection and reconnects by itself,
so it is the pool: calls to one backend share it, and a backend's channel is closed once no table names
its address any more. Inference calls carry bytes both ways (no serializer: the front door renames
them with protowire, never decoding tensors); the rare metadata calls decode with Triton's own
generated messages (tritonclient.grpc.service_pb2).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

SERVICE = "inference.GRPCInferenceService"
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

    def get(self, address: str) -> BackendChannel:
        channel = self._by_address.get(address)
        if channel is None:
            channel = self._by_address[address] = BackendChannel(address)
        return channel

    async def keep_only(self, addresses: Iterable[str]) -> None:
        """Close the channels of addresses no table names any more (after a reload)."""
        wanted = set(addresses)
        for address in [a for a in self._by_address if a not in wanted]:
            await self._by_address.pop(address).channel.close(grace=None)

    async def close(self) -> None:
        await self.keep_only(())
