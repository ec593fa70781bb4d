"""Answers the gateway gives itself over HTTP: KServe-shaped JSON errors."""

from __future__ import annotations

from gateway.pipeline.errors import error_body
from gateway.wire.headers import Headers
from gateway.wire.http_server import ClientConnection

JSON = (b"content-type", b"application/json")


def send_error(conn: ClientConnection, status: int, message: str, headers: Headers | None = None) -> None:
    out = [JSON]
    if headers:
        out += headers
    conn.respond(status, out, error_body(message))
