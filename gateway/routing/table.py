"""The routing table: an immutable picture of routes.yaml after validation.

Everything here is a frozen dataclass built once by `gateway.routing.config` and then only read, so the data
plane can hold a reference to a table without locks and a reload swaps one reference for another.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

EMPTY: Mapping[str, Any] = MappingProxyType({})

# Every default of routes.yaml, named once so that nothing can drift: the dataclasses below use them, the
# YAML loader reads them back from those dataclasses, and `open_store` and the rollout engine name them.
DEFAULT_BACKEND_TIMEOUT = 30.0  # seconds
DEFAULT_CONNECT_TIMEOUT = 2.0  # seconds
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_QUEUE_TIMEOUT = 2.0  # seconds a request waits for a pooled connection before its 503
DEFAULT_MAX_QUEUE = 1024  # requests waiting for a pooled connection, per backend
DEFAULT_STEPS = (5, 25, 50, 100)  # canary traffic percentages
DEFAULT_MAX_ERROR_RATE_INCREASE = 0.005  # half a percentage point
DEFAULT_MAX_LATENCY_INCREASE = 0.2  # +20% on p95
DEFAULT_FALSE_ROLLBACK_RATE = 0.01
DEFAULT_FALSE_PROMOTION_RATE = 0.05
DEFAULT_MAX_ERROR_ODDS_RATIO = 1.0  # rolled back when shown failing more often than the baseline at all
DEFAULT_MAX_STEP_DURATION = 3600.0  # seconds
DEFAULT_ON_MAX_STEP_DURATION = "hold"  # or "rollback"
DEFAULT_MIN_STEP_DURATION = 30.0  # seconds
DEFAULT_MIN_STEP_REQUESTS = 200
DEFAULT_KEYS_REQUIRED = True
DEFAULT_STORE_URL = "memory://"
DEFAULT_ON_ERROR = "fail_closed"
# Short: a request waiting on a hung store must still get its 503 within 100 ms, and a healthy Redis
# answers in well under a millisecond.
DEFAULT_STORE_TIMEOUT = 0.08  # seconds, per store call
DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_HEADER_SIZE = 16 * 1024
DEFAULT_MAX_HEADERS = 100
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds
DEFAULT_BODY_TIMEOUT = 60.0  # seconds
DEFAULT_KEEPALIVE_TIMEOUT = 75.0  # seconds
DEFAULT_WRITE_TIMEOUT = 30.0  # seconds a client may leave our answer unread before it is cut off
# Per worker. Sized for the 2-core, 24 GiB machine this is developed on: a few hundred MiB of bodies in
# flight, and connections well below the file descriptor limit (20,000 there).
DEFAULT_MAX_BUFFERED_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_CLIENT_CONNECTIONS = 10_000


@dataclass(frozen=True, slots=True)
class Backend:
    """A Triton server (or anything speaking KServe v2 over HTTP/1.1)."""

    name: str
    host: str
    port: int
    # Seconds for a whole upstream exchange, from sending the request to the last byte.
    timeout: float = DEFAULT_BACKEND_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # pooled keep-alive connections, idle and busy together
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    max_queue: int = DEFAULT_MAX_QUEUE
    # Triton's gRPC port (`grpc_url`), for the gRPC front door; "" and 0 when the backend has none.
    grpc_host: str = ""
    grpc_port: int = 0

    @property
    def grpc_address(self) -> str:
        """`host:port` for a gRPC channel, "" when the backend has no grpc_url."""
        if not self.grpc_port:
            return ""
        host = f"[{self.grpc_host}]" if ":" in self.grpc_host else self.grpc_host
        return f"{host}:{self.grpc_port}"


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
    archive: str = ""  # "sha256:..." of the version's archive (see gateway.artifacts); "" when not named
    allow_schema_change: bool = False  # let the schema gate pass a version whose tensors differ (audited)
    # Where the version's settings are written ("version" is its key), so checks made after parsing (the
    # registry's) can still say file:line:column. Not part of the version's identity: moving a line
    # changes no digest.
    positions: Mapping[str, tuple[int, int]] = field(default_factory=lambda: EMPTY, compare=False, repr=False)


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


def default_burst(rate: float) -> int:
    """The burst of a limit that gives none: a burst below the per-second rate would throttle a steady
    stream at exactly that rate."""
    return max(1, math.ceil(rate))


@dataclass(frozen=True, slots=True)
class Rollout:
    """Automatic canary analysis settings (acted on by the rollout controller)."""

    baseline: str
    canary: str
    steps: tuple[int, ...] = DEFAULT_STEPS
    max_error_rate_increase: float = DEFAULT_MAX_ERROR_RATE_INCREASE  # absolute, as a fraction
    max_latency_increase: float = DEFAULT_MAX_LATENCY_INCREASE  # a fraction: 0.2 means +20% on p95
    false_rollback_rate: float = DEFAULT_FALSE_ROLLBACK_RATE
    false_promotion_rate: float = DEFAULT_FALSE_PROMOTION_RATE
    # The error null of rolling back: odds(canary) / odds(baseline) at most this in every interval.
    max_error_odds_ratio: float = DEFAULT_MAX_ERROR_ODDS_RATIO
    # Seconds a step is held, and canary requests it must see, before the canary may step up.
    min_step_duration: float = DEFAULT_MIN_STEP_DURATION
    min_step_requests: int = DEFAULT_MIN_STEP_REQUESTS
    # A step still undecided after this long is held (paused, with an alert) or rolled back.
    max_step_duration: float = DEFAULT_MAX_STEP_DURATION
    on_max_step_duration: str = DEFAULT_ON_MAX_STEP_DURATION


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
    required: bool = DEFAULT_KEYS_REQUIRED
    default_limit: Limit | None = None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = DEFAULT_STORE_URL
    on_error: str = DEFAULT_ON_ERROR  # or "fail_open"
    timeout: float = DEFAULT_STORE_TIMEOUT  # per store call


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Limits of the client-facing HTTP server."""

    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE  # request line and all headers together
    max_headers: int = DEFAULT_MAX_HEADERS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # a client must send a whole request head within this
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # and its body within this, counted from the end of the head
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT  # idle keep-alive connections are closed after this
    write_timeout: float = DEFAULT_WRITE_TIMEOUT  # a client that reads nothing of our answer for this long
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES  # request bodies held by one worker, all together
    max_connections: int = DEFAULT_MAX_CLIENT_CONNECTIONS  # open client connections per worker


@dataclass(frozen=True, slots=True)
class RouteTable:
    backends: Mapping[str, Backend]
    models: Mapping[str, Model]
    keys: KeysPolicy = field(default_factory=KeysPolicy)
    store: StoreConfig = field(default_factory=StoreConfig)
    server: ServerSettings = field(default_factory=ServerSettings)
    revision: str = ""  # sha256 of the file's bytes, so operators can compare processes
    source: str = ""  # the file it came from


def triton_model_path(version: Version) -> str:
    """Triton's path for a version's model: `/v2/models/{name}[/versions/{n}]`."""
    if version.triton_version:
        return f"/v2/models/{version.triton_model}/versions/{version.triton_version}"
    return f"/v2/models/{version.triton_model}"


def model_digest(model: Model) -> str:
    """A fingerprint of a model's spec: it changes exactly when the file changes that model."""
    return hashlib.sha256(repr(model).encode()).hexdigest()[:16]
