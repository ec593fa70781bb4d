"""Parsing the small value languages of routes.yaml: durations, sizes, rates, numbers, names.

Each parser takes the raw scalar text and returns the value, or raises ValueError whose message completes
a sentence that starts with the setting's name: "timeout of backend triton-a" + " must be a duration ...".
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from urllib.parse import SplitResult, urlsplit

from gateway.stats.kinds import BUCKET_FACTOR

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_DURATION = re.compile(rf"({_NUMBER})\s*(ms|s|m|h)?")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(rf"({_NUMBER})\s*([KMG]i?B|B)?", re.IGNORECASE)
_BYTES_PER_UNIT = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_RATE = re.compile(rf"({_NUMBER})\s*/\s*(s|m|h)")
_INTEGER = re.compile(r"[-+]?[0-9]+")
_DECIMAL = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# RFC 9110 token characters: what a header name may contain.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Triton model names become segments of upstream URL paths, so they get the same safe alphabet.
_TARGET = re.compile(r"([A-Za-z0-9_.-]+)(?:/([0-9]+))?")
_ARCHIVE_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
STORE_SCHEMES = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster")
ON_ERROR = ("fail_closed", "fail_open")
ON_MAX_STEP_DURATION = ("hold", "rollback")
_TRUE = ("true", "yes")
_FALSE = ("false", "no")


def duration(text: str) -> float:
    """Seconds from "10s", "500ms", "2m", "1h", "1.5s" or a bare number of seconds; more than zero."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"must be a duration like 10s, 500ms, 2m or 1.5s (or a number of seconds), not '{text}'"
        )
    seconds = float(match[1]) * _SECONDS_PER_UNIT[match[2] or "s"]
    if not math.isfinite(seconds):
        raise ValueError(f"is too long: '{text}'")
    if seconds <= 0:
        raise ValueError(f"must be longer than zero, not '{text}'")
    return seconds


def size(text: str) -> int:
    """Bytes from "64MiB", "16KiB", "1MB", "1024": KiB/MiB/GiB are binary, KB/MB/GB decimal."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"must be a size like 64MiB, 16KiB, 1MB or a number of bytes, not '{text}'")
    # Fraction, not float, so "1.5KiB" is exactly 1536 and a fraction of a byte is caught.
    value = Fraction(match[1]) * _BYTES_PER_UNIT[(match[2] or "b").lower()]
    if value.denominator != 1:
        raise ValueError(f"must be a whole number of bytes; '{text}' is {float(value)} bytes")
    if value <= 0:
        raise ValueError(f"must be more than zero bytes, not '{text}'")
    return int(value)


def rate(text: str) -> float:
    """Requests per second from "1000/s", "600/m" or "3600/h"."""
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"must be a rate like 1000/s, 600/m or 3600/h, not '{text}'")
    per_second = float(match[1]) / _SECONDS_PER_UNIT[match[2]]
    if not math.isfinite(per_second):
        raise ValueError(f"is too large: '{text}'")
    if per_second <= 0:
        raise ValueError(f"must be more than zero requests, not '{text}'")
    return per_second


def integer(text: str, low: int, high: int | None = None) -> int:
    """A whole number in [low, high]."""
    if _INTEGER.fullmatch(text.strip()) is None:
        raise ValueError(f"must be a whole number, not '{text}'")
    value = int(text)
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"must be {bounds}, not {value}")
    return value


def number(text: str) -> float:
    """A finite decimal number such as 0.005, 10 or 1e-3."""
    if _DECIMAL.fullmatch(text.strip()) is None:
        raise ValueError(f"must be a number, not '{text}'")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"is too large: '{text}'")
    return value


def percent(text: str) -> float:
    """A percentage written 10 or 10%, more than 0 and at most 100."""
    value = number(text.strip().removesuffix("%"))
    if not 0 < value <= 100:
        raise ValueError(f"must be more than 0 and at most 100, not {text}")
    return value


def fraction_or_percent(text: str) -> float:
    """A relative increase written as "20%" or as the fraction 0.2; returned as the fraction."""
    stripped = text.strip()
    if stripped.endswith("%"):
        value = number(stripped.removesuffix("%")) / 100
    else:
        value = number(stripped)
        if value > 1:
            raise ValueError(
                f"must be a percentage like 20% or a fraction like 0.2, not {text} (write {text}% if so)"
            )
    if value < 0:
        raise ValueError(f"cannot be negative, not {text}")
    return value


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"must be true or false, not '{text}'")


def url_name(text: str, kind: str) -> str:
    """A name that is used as one segment of a URL path, checked so every client can write it as is."""
    if _NAME.fullmatch(text) is None:
        raise ValueError(
            f"{kind} name '{text}' may only use letters, digits, '_', '.' and '-', "
            "because it appears in URL paths"
        )
    if text in (".", ".."):
        raise ValueError(f"{kind} name '{text}' is not allowed, because clients rewrite it in URL paths")
    return text


def sticky_header(text: str) -> str:
    """The header of "header:NAME", lower-cased as the data plane compares header names."""
    kind, colon, name = text.partition(":")
    if kind.strip().lower() != "header" or not colon:
        raise ValueError(f"must be header:NAME, for example header:x-user-id, not '{text}'")
    name = name.strip()
    if _TOKEN.fullmatch(name) is None:
        raise ValueError(f"must name a valid HTTP header after 'header:'; '{name}' is not one")
    return name.lower()


def target(text: str) -> tuple[str, str]:
    """Triton's model name and version from "name/3", or ("name", "") to let Triton pick the version."""
    match = _TARGET.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            "must be a Triton model name, optionally followed by /VERSION (like fraud_detector/3), "
            f"not '{text}'"
        )
    return match[1], match[2] or ""


def archive_digest(text: str) -> str:
    """An archive's digest as `gateway archive inspect` prints it."""
    value = text.strip()
    if _ARCHIVE_DIGEST.fullmatch(value) is None:
        raise ValueError(f"must be an archive digest, sha256: and 64 lower-case hex digits, not '{text}'")
    return value


def _host_and_port(parts: SplitResult, shown: str) -> tuple[str, int | None]:
    """The host and port (None: not given) of a backend address, with no credentials in it."""
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain a user name or password")
    if not parts.hostname:
        raise ValueError(f"has no host: {shown}")
    try:
        return parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"has an invalid port: {shown}") from None


def backend_url(text: str) -> tuple[str, int]:
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    # Messages leave out URLs with credentials in them, since they end up in logs and on the admin API.
    shown = f"'{text}'" if "@" not in text else "the URL given"
    if scheme == "https":
        raise ValueError("uses https, which is not supported yet; use an http:// URL")
    if scheme != "http" or not parts.netloc:
        raise ValueError(f"must be an http:// URL like http://127.0.0.1:8000, not {shown}")
    hostname, port = _host_and_port(parts, shown)
    if port == 0:
        raise ValueError(f"has an invalid port: {shown}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"must be just http://HOST:PORT; the gateway adds the KServe v2 paths itself, not {shown}"
        )
    return hostname, port or 80


def grpc_url(text: str) -> tuple[str, int]:
    """Triton's gRPC address: `grpc://HOST:PORT` or `HOST:PORT` (as tritonclient.grpc takes it)."""
    stripped = text.strip()
    shown = f"'{text}'" if "@" not in text else "the URL given"
    scheme, sep, _ = stripped.partition("://")
    if sep and scheme.lower() in ("grpcs", "https"):
        raise ValueError("uses TLS, which is not supported yet for backends; use grpc://HOST:PORT")
    if sep and scheme.lower() != "grpc":
        raise ValueError(f"must be grpc://HOST:PORT or HOST:PORT like 127.0.0.1:8001, not {shown}")
    parts = urlsplit(stripped if sep else "grpc://" + stripped)
    hostname, port = _host_and_port(parts, shown)
    if not port:
        raise ValueError(f"needs a port (Triton's gRPC port is 8001 by default): {shown}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must be just HOST:PORT; gRPC names its methods itself, not {shown}")
    return hostname, port


def at_least_one(text: str) -> int:
    return integer(text, 1)


def weight(text: str) -> int:
    return integer(text, 0, 100)


def step(text: str) -> int:
    return integer(text, 1, 100)


def error_rate(text: str) -> float:
    value = number(text)
    if not 0 <= value <= 1:
        raise ValueError(f"must be a fraction between 0 and 1 (0.005 is half a percentage point), not {text}")
    return value


def probability(text: str) -> float:
    """An error probability of the rollout's tests (false_rollback_rate, false_promotion_rate)."""
    value = number(text)
    if not 0 < value < 0.5:
        raise ValueError(f"must be more than 0 and less than 0.5, like 0.01, not {text}")
    return value


def latency_margin(text: str) -> float:
    """max_latency_increase: at least one latency bucket's ratio, the finest margin the p95 test can test."""
    value = fraction_or_percent(text)
    finest = round(BUCKET_FACTOR - 1.0, 6)
    if value < finest:
        raise ValueError(
            f"is finer than the latency buckets, which are {finest:.0%} apart: a canary could be stepped "
            f"up only when shown faster than its baseline; use at least {finest:.0%}, not {text}"
        )
    return value


def odds_ratio(text: str) -> float:
    value = number(text)
    if value < 1:
        raise ValueError(f"must be at least 1 (1: no more failures than the baseline), not {text}")
    return value


def on_max_step_duration(text: str) -> str:
    if text not in ON_MAX_STEP_DURATION:
        raise ValueError(f"must be hold (pause the rollout and alert) or rollback, not '{text}'")
    return text


def store_url(text: str) -> str:
    url = text.strip()
    schemes = ", ".join(f"{scheme}://" for scheme in STORE_SCHEMES)
    if not url:
        raise ValueError("is empty; use memory:// for the embedded store or a redis:// URL")
    # The scheme alone is echoed: the URL usually comes from REDIS_URL and may carry a password.
    scheme = urlsplit(url).scheme.lower()
    if "://" not in url or scheme not in STORE_SCHEMES:
        raise ValueError(f"must start with one of {schemes}; its scheme is '{scheme}'")
    return url


def on_error(text: str) -> str:
    if text not in ON_ERROR:
        raise ValueError(
            f"must be fail_closed (answer 503) or fail_open (serve with local limits), not '{text}'"
        )
    return text
