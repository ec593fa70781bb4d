"""API keys: the secret a client sends, the settings an operator gives a key, and the decision whether
a request may pass (the per-process cache of key records is `gateway.access.key_cache`).

A key is a random secret that only its holder knows; the store keeps its SHA-256 (`hash_secret`), never
the secret. Because the secret has 256 bits of entropy, a plain hash is enough: there is nothing to
brute-force, so a slow password hash would only cost latency. Looking the hash up in a dict is also safe
against timing attacks: what a lookup's timing could reveal is a prefix of the *hash* of a guess, and
that says nothing about which secret would produce a wanted hash.

Hot path: `secret_from_headers` -> `hash_secret` -> `KeyCache.peek` (`gateway.access.key_cache`: a
dict lookup, no await) and, only on a cache miss, `await KeyCache.lookup` -> `authorize`. Nothing here
logs or echoes a secret; where a key must be named, it is by its record's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final, Literal

from gateway.routing import units as config_units
from gateway.routing.table import Limit, default_burst
from gateway.store.base import KeyRecord

SECRET_PREFIX = "gwk_"  # makes leaked keys easy to spot (and to scan for) in code and logs
MAX_SECRET_LENGTH = 256  # ours are 47 characters; anything far longer is not a key of ours
# Visible ASCII only (0x21-0x7e): no spaces, controls or bytes that would need a decoding guess.
_SECRET = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_SECRET_LENGTH)

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DAYS = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*d")
MAX_EXPIRES_IN = 10 * 365 * 86400.0  # a key meant to live longer should simply not expire
MAX_MODELS = 1000
MAX_BURST = 10**9


def new_secret() -> str:
    """A fresh secret: 32 random bytes (256 bits), URL-safe base64, with a recognisable prefix."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """What the store keeps and is searched by: hex SHA-256 of the secret's UTF-8 bytes."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def _clean(raw: bytes) -> str | None:
    """The secret in a header value, or None unless it is one visible-ASCII word of sane length."""
    # One regex over the bytes: a Python loop per byte would cost microseconds on every request.
    match = _SECRET.fullmatch(raw.strip(b" \t"))
    return match[0].decode("ascii") if match else None


def secret_from_headers(authorization: bytes | None, x_api_key: bytes | None) -> str | None:
    """The key a request presents: `Authorization: Bearer <secret>` (any case of "Bearer") or
    `X-API-Key: <secret>`. None when neither holds a well-formed one; another scheme (Basic ...) is not
    a key. When both are present the Authorization header wins, as it is the standard place."""
    if authorization:
        scheme, _, rest = authorization.strip(b" \t").partition(b" ")
        if scheme.lower() == b"bearer":
            secret = _clean(rest)
            if secret is not None:
                return secret
    if x_api_key:
        return _clean(x_api_key)
    return None


# -- what operators may set (the admin API validates with these) --------------------------------


class KeySettingError(ValueError):
    """A key setting that is refused, with the reason in words (the admin API answers 400)."""


def key_name(value: Any) -> str:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None or value in (".", ".."):
        raise KeySettingError(
            f'"name" must be 1 to 64 letters, digits, "_", "." or "-" (it appears in URLs), not {value!r}'
        )
    return value


def key_models(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise KeySettingError(
            '"models" must be a list of model names, e.g. ["fraud-detector"]; [] allows all'
        )
    if len(value) > MAX_MODELS:
        raise KeySettingError(f'"models" may name at most {MAX_MODELS} models')
    for model in value:
        try:
            config_units.url_name(model, "model")
        except ValueError as exc:
            raise KeySettingError(f'"models": {exc}') from None
    return tuple(dict.fromkeys(value))  # duplicates dropped, order kept


def key_rate(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise KeySettingError(f'"rate" must be a string like "100/s", "600/m" or "3600/h", not {value!r}')
    try:
        return config_units.rate(value)
    except ValueError as exc:
        raise KeySettingError(f'"rate" {exc}') from None


def key_burst(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BURST:
        raise KeySettingError(f'"burst" must be a whole number from 1 to {MAX_BURST}, not {value!r}')
    return value


def key_model_limits(value: Any) -> dict[str, Limit]:
    """Per-model limits from {"MODEL": {"rate": "100/s", "burst": 200}, ...}; null or {} for none. A rate
    may also be the number per second the API shows; a burst left out gets routes.yaml's default."""
    example = '{"fraud-detector": {"rate": "100/s", "burst": 200}}'
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise KeySettingError(f'"model_limits" must be an object of model -> limit, like {example}')
    if len(value) > MAX_MODELS:
        raise KeySettingError(f'"model_limits" may name at most {MAX_MODELS} models')
    limits: dict[str, Limit] = {}
    for model, limit in value.items():
        what = f'"model_limits" for {model!r}'
        try:
            config_units.url_name(model, "model")
        except ValueError as exc:
            raise KeySettingError(f'"model_limits": {exc}') from None
        if not isinstance(limit, dict) or "rate" not in limit or not set(limit) <= {"rate", "burst"}:
            raise KeySettingError(
                f'{what} must be {{"rate": "100/s"}} with an optional "burst", not {limit!r}'
            )
        try:
            rate = _per_model_rate(limit["rate"])
            burst = key_burst(limit.get("burst"))
        except KeySettingError as exc:
            raise KeySettingError(f"{what}: {exc}") from None
        limits[model] = Limit(rate, default_burst(rate) if burst is None else burst)
    return limits


def _per_model_rate(value: Any) -> float:
    if isinstance(value, str):
        rate = key_rate(value)
        assert rate is not None  # only None gives None
        return rate
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an integer too large for a float
            if math.isfinite(value) and value > 0:
                return float(value)
    raise KeySettingError(
        f'"rate" must be a rate like "100/s", "600/m" or "3600/h", or a number of requests per second '
        f"above zero, not {value!r}"
    )


def expires_in_seconds(value: Any) -> float:
    """Seconds from "30d", "12h", "90m", "45s" or a number of seconds; more than zero, at most 10 years."""
    message = f'"expires_in" must be a duration like 30d, 12h or 90m, or a number of seconds, not {value!r}'
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise KeySettingError(message)
    if isinstance(value, str):
        days = _DAYS.fullmatch(value.strip())
        try:
            seconds = float(days[1]) * 86400 if days else config_units.duration(value)
        except ValueError:
            raise KeySettingError(message) from None
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise KeySettingError(f'"expires_in" must be more than zero, not {value!r}')
    if seconds > MAX_EXPIRES_IN:
        raise KeySettingError(
            '"expires_in" may be at most 3650d; leave it out for a key that does not expire'
        )
    return seconds


def key_settings(body: dict[str, Any], now: float) -> dict[str, Any]:
    """The KeyRecord fields a body sets (only those it names), validated."""
    changes: dict[str, Any] = {}
    if "models" in body:
        changes["models"] = key_models(body["models"])
    if "rate" in body:
        changes["rate"] = key_rate(body["rate"])
    if "burst" in body:
        changes["burst"] = key_burst(body["burst"])
    if "model_limits" in body:
        changes["model_limits"] = key_model_limits(body["model_limits"])
    if "expires_in" in body:
        given = body["expires_in"]
        changes["expires_at"] = None if given is None else now + expires_in_seconds(given)
    if "disabled" in body:
        if not isinstance(body["disabled"], bool):
            raise KeySettingError(f'"disabled" must be true or false, not {body["disabled"]!r}')
        changes["disabled"] = body["disabled"]
    return changes


def check_record(record: KeyRecord) -> None:
    if record.burst is not None and record.rate is None:
        # A burst means nothing without the rate it bursts over; keys.default_limit has its own burst.
        raise KeySettingError(
            '"burst" needs a "rate" too (a key without its own rate uses keys.default_limit)'
        )
    if record.models:
        # Checked on the whole record, so narrowing "models" later cannot leave a limit nobody can reach.
        stray = [model for model in record.model_limits if model not in record.models]
        if stray:
            raise KeySettingError(
                f'"model_limits" names {", ".join(map(repr, stray))}, which the key may not call '
                f'(its "models": {", ".join(record.models)}); allow the model or drop its limit'
            )


# -- the decision --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a request may not pass: the HTTP status, a short reason for metrics, and words for the client.

    `reason` is one of "missing", "unknown", "expired", "disabled", "model": a small fixed set, so it
    can be a metric label. `message` names at most the key's name, never its secret.
    """

    status: Literal[401, 403]
    reason: str
    message: str


KEY_REQUIRED: Final = Denial(
    401, "missing", "an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>"
)
UNKNOWN_KEY: Final = Denial(401, "unknown", "the API key is not valid")


def authorize(record: KeyRecord | None, model: str, now: float) -> Denial | None:
    """None when the key `record` (None: no key has that hash) may call `model` at epoch time `now`.

    401 for a key that does not authenticate (unknown, expired, disabled): the client must get another
    key. 403 for a good key used on a model it is not allowed: the key is fine, the request is not.
    """
    if record is None:
        return UNKNOWN_KEY
    if record.expires_at is not None and now >= record.expires_at:
        return Denial(401, "expired", f"API key {record.name!r} has expired")
    if record.disabled:
        return Denial(401, "disabled", f"API key {record.name!r} is disabled")
    if record.models and model not in record.models:
        return Denial(403, "model", f"API key {record.name!r} may not call model {model!r}")
    return None
