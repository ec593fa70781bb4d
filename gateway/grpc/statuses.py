"""Errors as gRPC statuses, both ways: the pipeline's refusals out, the backends' statuses in.

The pipeline speaks HTTP statuses (errors.py). gRPC's own table for proxies that translate HTTP
(grpc/doc/http-grpc-status-mapping.md) maps 400, 401 and 403 to INTERNAL-like codes meant for a broken
proxy; here the refusal is the gateway's deliberate answer, so each gets the code that says what the
caller did: the status codes' own definitions (grpc/doc/statuscodes.md) are followed instead. Caller
faults stay caller faults: a rejected key is UNAUTHENTICATED, a limit RESOURCE_EXHAUSTED, a malformed
request INVALID_ARGUMENT, and none of them counts against a version.
"""

from __future__ import annotations

import grpc

from gateway.stats.counters import Outcome

_FROM_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# A backend's status that blames the request: counted as the caller's (Outcome.CLIENT_ERROR), like a 4xx.
CALLER_CODES = frozenset(
    (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
)


def code_for(status: int) -> grpc.StatusCode:
    """The gRPC status for a refusal's HTTP status."""
    code = _FROM_HTTP.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT


def recorded(code: grpc.StatusCode) -> tuple[int, Outcome]:
    """How a backend's final status is counted for its version: the HTTP-like status and the outcome."""
    if code is grpc.StatusCode.OK:
        return 200, Outcome.OK
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return 504, Outcome.TIMEOUT
    if code is grpc.StatusCode.UNAVAILABLE:
        return 502, Outcome.UPSTREAM_ERROR
    if code is grpc.StatusCode.CANCELLED:
        return 499, Outcome.ABANDONED
    if code in CALLER_CODES:
        return 400, Outcome.CLIENT_ERROR
    return 500, Outcome.SERVER_ERROR
