"""Errors as data: what a step answers instead of going on, whatever the front door.

A step that refuses a request returns a `Refusal`; the front door turns it into its own shape (a
KServe JSON body over HTTP, a status code over gRPC). Statuses are HTTP's, the protocol KServe v2 and
its gRPC mapping both describe errors in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway.wire.headers import Headers

BEARER: Headers = [(b"www-authenticate", b"Bearer")]  # RFC 6750 section 3 on every 401


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str
    headers: Headers | None = None  # rate-limit headers, WWW-Authenticate

    @property
    def counts_as(self) -> int:
        """The status class index it is counted under in the unrouted counters (0 for 1xx ... 4 for 5xx)."""
        return min(self.status // 100, 5) - 1


def error_body(message: str) -> bytes:
    """The KServe v2 error shape."""
    return json.dumps({"error": message}).encode()
