"""Who is calling the admin port: bearer tokens, compared in constant time, their names and roles.

A token has a role: `operate` may change things (rollouts, weights, keys, reloads), `read` may look at
everything (the dashboard, every API read, `/metrics` for Prometheus) and change nothing. The rule is
by method, so a route added later is protected without anyone remembering to: GET and HEAD are reads,
every other method is an action.

The dashboard's static files (`/` and `/static/...`) are served without a token: they hold no data,
and the page needs them to ask for one. Every API call they make carries the token.

Its own module so that every route module can read `WHO` without importing the application that
includes it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger("gateway.admin")

Role = Literal["read", "operate"]
ROLES: tuple[Role, ...] = get_args(Role)
DEFAULT_ROLE: Role = "operate"  # tokens configured before roles existed keep every right they had
DEFAULT_NAME = "admin"
MIN_SECRET = 8
READ_METHODS = frozenset({"GET", "HEAD"})
PUBLIC_PATHS = frozenset({"/", "/index.html"})
PUBLIC_PREFIX = "/static/"

# The request keys for the authenticated token's name and role. aiohttp 3.14 warns about plain string
# keys, but RequestKey is newer than the oldest aiohttp this package accepts (3.9).
_RequestKey: Any = getattr(web, "RequestKey", None)
WHO: Any = _RequestKey("who", str) if _RequestKey is not None else "gateway.admin.who"
ROLE: Any = _RequestKey("role", str) if _RequestKey is not None else "gateway.admin.role"


class TokenError(ValueError):
    """GATEWAY_ADMIN_TOKEN holds something the gateway refuses, said in words (never the secret)."""


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    secret: str
    role: Role = DEFAULT_ROLE


def parse_tokens(text: str) -> tuple[AdminToken, ...]:
    """Tokens from GATEWAY_ADMIN_TOKEN: comma-separated `secret`, `name:secret` or `name:secret:role`.

    A role is recognised only as the last of three or more parts: a secret is at least 8 characters, so
    it can never be mistaken for `read` or `operate`. Names may hold colons (older releases allowed it).
    """
    tokens: list[AdminToken] = []
    for number, raw in enumerate(text.split(","), start=1):
        item = raw.strip()
        role: Role = DEFAULT_ROLE
        head, sep, last = item.rpartition(":")
        if sep and ":" in head and len(last) < MIN_SECRET:  # name:secret:role
            if last not in ROLES:
                raise TokenError(
                    f"GATEWAY_ADMIN_TOKEN entry {number} ends in a part that is neither a role nor a "
                    f"secret (those are at least {MIN_SECRET} characters): write name:secret:read or "
                    "name:secret:operate"
                )
            role, item = last, head
        name, sep, secret = item.rpartition(":")
        if not sep:
            name, secret = DEFAULT_NAME, item
        if len(secret) < MIN_SECRET:
            raise TokenError(
                f"GATEWAY_ADMIN_TOKEN entry {number} holds a token shorter than {MIN_SECRET} characters"
            )
        tokens.append(AdminToken(name or DEFAULT_NAME, secret, role))
    if len({t.secret for t in tokens}) != len(tokens):
        raise TokenError("GATEWAY_ADMIN_TOKEN names the same secret twice")
    return tuple(tokens)


class TokenCheck:
    """Bearer tokens compared in constant time, against every token, so timing tells nothing."""

    def __init__(self, tokens: Iterable[AdminToken]) -> None:
        listed = list(tokens)
        if any(not t.secret for t in listed):
            raise ValueError("an admin token may not be empty")
        # Comparing digests makes the comparison independent of the secrets' lengths too.
        self._tokens = [(hashlib.sha256(t.secret.encode()).digest(), t) for t in listed]

    def who(self, authorization: str | None) -> AdminToken | None:
        """The token in an Authorization header, or None if it holds no configured one."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = hashlib.sha256(presented.strip().encode("utf-8", "surrogateescape")).digest()
        found = None
        for secret, token in self._tokens:
            # No early exit: every configured token is compared whichever one matches.
            if hmac.compare_digest(digest, secret) and found is None:
                found = token
        return found


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX)


def auth_middleware(check: TokenCheck) -> Middleware:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in READ_METHODS and is_public(request.path):
            return await handler(request)
        header = request.headers.get("Authorization")
        token = check.who(header)
        if token is None:
            challenge = 'Bearer realm="gateway-admin"'
            if header:
                challenge += ', error="invalid_token"'
                log.warning("admin: refused a wrong token from %s", request.remote)
            message = "a valid admin token is required: send Authorization: Bearer <GATEWAY_ADMIN_TOKEN>"
            body = {"error": message}
            return web.json_response(body, status=401, headers={"WWW-Authenticate": challenge})
        if token.role != "operate" and request.method not in READ_METHODS:
            log.warning("admin: refused %s %s to read token %r", request.method, request.path, token.name)
            message = (
                f"the admin token {token.name!r} has the {token.role!r} role, which can look but not change "
                f"anything; {request.method} {request.path} needs a token with the 'operate' role"
            )
            challenge = 'Bearer realm="gateway-admin", error="insufficient_scope"'  # RFC 6750 section 3.1
            return web.json_response({"error": message}, status=403, headers={"WWW-Authenticate": challenge})
        request[WHO] = token.name
        request[ROLE] = token.role
        return await handler(request)

    return authenticate
