"""Header helpers shared by both directions of the wire (client side and upstream side)."""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]  # (lower-case name, raw value), in the order they arrived

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade")
)


def connection_options(value: bytes | None) -> frozenset[bytes]:
    """The header names a Connection header lists; they are hop-by-hop too (RFC 9110 section 7.6.1)."""
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(b",")) - {b"close", b"keep-alive"}
