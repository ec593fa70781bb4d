"""The routing table: an immutable picture of routes.yaml after validation.

Everything here is a frozen dataclass built once by `gateway.config` and then only read, so the data
plane can hold a reference to a table without locks and a reload swaps one reference for another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Backend:
    """A Triton server (or anything speaking KServe v2 over HTTP/1.1)."""

    name: str
    host: str
    port: int
    timeout: float  # seconds for a whole upstream exchange, from sending the request to the last byte
    connect_timeout: float = 2.0
    max_connections: int = 256  # pooled keep-alive connections, idle and busy together


@dataclass(frozen=True, slots=True)
class Version:
    """One immutable model version, and where it is served."""

    id: str  # the public version id: "2.1.3", "abc123f", "2026-11-05"
    backend: str  # name of a Backend in the same table
    triton_model: str  # Triton's own model name
    triton_version: str  # Triton's numeric version as text, "" to let Triton choose
    metadata: Mapping[str, Any] = field(
        default_factory=lambda: EMPTY
    )  # training data hash, metrics, commit: reported, never interpreted


@dataclass(frozen=True, slots=True)
class Mirror:
    """Shadow copies of live traffic; their answers are never returned to the caller."""

    to: str  # version id
    percent: float


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate: `rate` requests per second on average, up to `burst` at once."""

    rate: float  # per second
    burst: int


@dataclass(frozen=True, slots=True)
class Rollout:
    """Automatic canary analysis settings (acted on by the rollout controller)."""

    baseline: str
    canary: str
    steps: tuple[int, ...]
    max_error_rate_increase: float
    max_latency_increase: float  # a fraction: 0.2 means +20% on p95
    false_rollback_rate: float
    min_step_duration: float = 30.0  # seconds a step is held before the canary may step up
    min_step_requests: int = 200  # canary requests a step must see before it may step up


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    versions: Mapping[str, Version]
    aliases: Mapping[str, str] = field(default_factory=lambda: EMPTY)  # alias -> version id
    split: tuple[tuple[str, int], ...] = ()  # (version id, weight); weights add up to 100
    sticky_header: str | None = None  # lower-case header name whose value picks a stable version
    mirror: Mirror | None = None
    rollout: Rollout | None = None
    limit: Limit | None = None

    def resolve(self, version_or_alias: str) -> Version | None:
        """The version a client names directly or through an alias, or None if there is none."""
        version = self.versions.get(version_or_alias)
        if version is None:
            target = self.aliases.get(version_or_alias)
            if target is not None:
                version = self.versions.get(target)
        return version


@dataclass(frozen=True, slots=True)
class KeysPolicy:
    required: bool = True
    default_limit: Limit | None = None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "memory://"
    on_error: str = "fail_closed"  # or "fail_open"
    # Per store call. Short: a request waiting on a hung store must still get its 503 within 100 ms,
    # and a healthy Redis answers in well under a millisecond.
    timeout: float = 0.08


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Limits of the client-facing HTTP server."""

    max_body_size: int = 64 * 1024 * 1024
    max_header_size: int = 16 * 1024  # request line and all headers together
    max_headers: int = 100
    header_timeout: float = 10.0  # a client must send a whole request head within this
    body_timeout: float = 60.0  # and its body within this, counted from the end of the head
    keepalive_timeout: float = 75.0  # idle keep-alive connections are closed after this


@dataclass(frozen=True, slots=True)
class RouteTable:
    backends: Mapping[str, Backend]
    models: Mapping[str, Model]
    keys: KeysPolicy = field(default_factory=KeysPolicy)
    store: StoreConfig = field(default_factory=StoreConfig)
    server: ServerSettings = field(default_factory=ServerSettings)
    revision: str = ""  # sha256 of the file's bytes, so operators can compare processes
    source: str = ""  # the file it came from


def model_digest(model: Model) -> str:
    """A fingerprint of a model's spec: it changes exactly when the file changes that model."""
    return hashlib.sha256(repr(model).encode()).hexdigest()[:16]
