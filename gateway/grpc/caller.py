"""A gRPC call as the pipeline sees a caller: its address and its metadata, read like HTTP headers.

gRPC metadata keys are lower-case ASCII (they are HTTP/2 header names), so `authorization`,
`x-api-key`, `x-model-version`, `x-request-id` and a model's sticky header are found exactly as over
HTTP/1.1. Binary (`-bin`) metadata is left out: no step reads any.
The pipeline's steps answer through callbacks (they run inside the HTTP parser's); `settled` turns one
into a future a gRPC handler can await.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
Then = Callable[[T], None]
Crashed = Callable[[BaseException], None]


def settled(start: Callable[[Then[T], Crashed], None]) -> asyncio.Future[T]:
    """Start a callback-style step (`start(then, crashed)`); the future holds its result or exception.

    The first answer settles it: a second call of either callback is ignored, never an error.
    """
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def then(result: T) -> None:
        if not future.done():
            future.set_result(result)

    def crashed(exc: BaseException) -> None:
        if not future.done():
            future.set_exception(exc)

    start(then, crashed)
    return future


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
