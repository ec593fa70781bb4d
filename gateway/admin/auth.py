"""Who is calling the admin port: bearer tokens, compared in constant time, and the name they map to.

Its own module so that every route module can read `WHO` without importing the application that
includes it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger("gateway.admin")

# The request key for the authenticated token's name. aiohttp 3.14 warns about plain string keys, but
# RequestKey is newer than the oldest aiohttp this package accepts (3.9).
_RequestKey: Any = getattr(web, "RequestKey", None)
WHO: Any = _RequestKey("who", str) if _RequestKey is not None else "gateway.admin.who"


class TokenCheck:
    """Bearer tokens compared in constant time, against every token, so timing tells nothing."""

    def __init__(self, tokens: dict[str, str]) -> None:
        if any(not secret for secret in tokens):
            raise ValueError("an admin token may not be empty")
        # Comparing digests makes the comparison independent of the secrets' lengths too.
        self._tokens = [(hashlib.sha256(secret.encode()).digest(), name) for secret, name in tokens.items()]

    def who(self, authorization: str | None) -> str | None:
        """The name of the token in an Authorization header, or None if it holds no configured one."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = hashlib.sha256(presented.strip().encode("utf-8", "surrogateescape")).digest()
        found = None
        for secret, name in self._tokens:
            # No early exit: every configured token is compared whichever one matches.
            if hmac.compare_digest(digest, secret) and found is None:
                found = name
        return found


def auth_middleware(check: TokenCheck) -> Middleware:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization")
        who = check.who(header)
        if who is None:
            challenge = 'Bearer realm="gateway-admin"'
            if header:
                challenge += ', error="invalid_token"'
                log.warning("admin: refused a wrong token from %s", request.remote)
            message = "a valid admin token is required: send Authorization: Bearer <GATEWAY_ADMIN_TOKEN>"
            body = {"error": message}
            return web.json_response(body, status=401, headers={"WWW-Authenticate": challenge})
        request[WHO] = who
        return await handler(request)

    return authenticate
