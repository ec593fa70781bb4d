"""A gRPC call as the pipeline sees a caller: its address and its metadata, read like HTTP headers.

gRPC metadata keys are lower-case ASCII (they are HTTP/2 header names), so `authorization`,
`x-api-key`, `x-model-version`, `x-request-id` and a model's sticky header are found exactly as over
HTTP/1.1. Binary (`-bin`) metadata is left out: no step reads any.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def peer_host(peer: str) -> str:
    """The address of `ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000` or `unix:/path` (gRPC's peer strings)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].partition("]")[0]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return rest or peer


class GrpcCaller:
    """`gateway.access.admission.Caller` for one call."""

    __slots__ = ("_fields", "client")

    def __init__(self, metadata: Iterable[Any] | None, peer: str) -> None:
        fields: dict[bytes, bytes] = {}
        for key, value in metadata or ():
            if isinstance(value, str):
                name, data = key.encode("latin-1", "replace"), value.encode("latin-1", "replace")
                # Repeated keys are joined as HTTP joins repeated headers (RFC 9110 section 5.3).
                previous = fields.get(name)
                fields[name] = data if previous is None else previous + b", " + data
        self._fields = fields
        self.client = peer_host(peer)

    def header(self, name: bytes) -> bytes | None:
        return self._fields.get(name)
