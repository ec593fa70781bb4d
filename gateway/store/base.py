"""The store interface, written once; algorithms above it never know which store they talk to."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.routing.table import Limit
from gateway.store.gcra import Answer, Bucket, Verdict


class StoreUnavailable(Exception):
    """The store did not answer (down, unreachable, or slower than its timeout)."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key as stored: never the secret, only its SHA-256."""

    name: str  # unique, human-chosen; what logs, metrics and the audit log show
    secret_hash: str  # hex sha256 of the secret
    models: tuple[str, ...] = ()  # models it may call; empty means all
    rate: float | None = None  # its own limit, per second; None uses keys.default_limit
    burst: int | None = None
    expires_at: float | None = None  # epoch seconds
    disabled: bool = False
    created_at: float = 0.0
    created_by: str = ""
    # Model name -> this key's limit on that model alone (the "keymodel" scope), on top of its own limit;
    # burst is always set (the admin API fills in the default). No entry: no per-model limit.
    model_limits: Mapping[str, Limit] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


Revoked = Callable[[str], None]  # called with the secret hash of a key that changed or went away


@dataclass(frozen=True, slots=True)
class Published:
    """Every process's latest statistics, and when they were read, both on the store's clock.

    The store's clock, not the reader's: whether a process's statistics are fresh, and when a rollout
    step began, must not depend on which process reads them.
    """

    now: float
    stats: list[dict[str, Any]]


class Store(Protocol):
    """Everything the gateway keeps outside one process."""

    url: str

    def admit_now(self, limits: Sequence[Bucket]) -> Answer | None:
        """One request's all-or-nothing decision over its limits, now, with no I/O; None when it needs the
        store (then `await admit(limits)`). Admission's fast path: no await, no task, no future."""
        ...

    async def admit(self, limits: Sequence[Bucket]) -> Answer:
        """The same decision when `admit_now` could not make it; the requests of a moment share one round
        trip. Exact across processes (Redis: token leases, gateway.store.leases)."""
        ...

    async def check_limits(self, requests: Sequence[Sequence[Bucket]]) -> list[tuple[bool, list[Verdict]]]:
        """One all-or-nothing decision per request (each a sequence of limits), each checked in the store
        itself; one round trip for all."""
        ...

    async def get_key(self, secret_hash: str) -> KeyRecord | None: ...

    async def put_key(self, record: KeyRecord) -> None:
        """Create or replace a key (by name); tells every process that the old one is gone."""
        ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def delete_key(self, name: str) -> KeyRecord | None:
        """Remove a key by name and tell every process; returns what was removed."""
        ...

    async def watch_keys(self, on_change: Revoked) -> Callable[[], Awaitable[None]]:
        """Call `on_change(secret_hash)` whenever any process changes or removes a key; returns a stopper."""
        ...

    async def heartbeat(self, process_id: str, ttl: float) -> int:
        """Say this process is alive for `ttl` seconds; returns how many processes are alive."""
        ...

    async def put_stats(self, process_id: str, stats: dict[str, Any], ttl: float) -> None:
        """Publish this process's cumulative per-version statistics, valid for `ttl` seconds of the
        store's clock."""
        ...

    async def get_stats(self) -> Published:
        """The latest statistics of every process that published within its ttl."""
        ...

    async def time(self) -> float:
        """The store's clock, in seconds since the epoch."""
        ...

    async def lease(self, name: str, holder: str, ttl: float) -> int:
        """Take or renew the lease `name` for `ttl` seconds.

        Returns its fencing token if `holder` holds it now, else 0. The token is the same for as long as
        the holder keeps renewing and greater for every new holding (Kleppmann, "How to do distributed
        locking", 2016): a write fenced with an old token is refused.
        """
        ...

    async def put_state_fenced(self, name: str, value: dict[str, Any], lease: str, token: int) -> bool:
        """`put_state`, in one atomic step with checking that lease `lease` is held with `token`;
        False (and nothing written) if it is not."""
        ...

    async def get_state(self, name: str) -> dict[str, Any] | None:
        """A JSON document kept by name (rollout state)."""
        ...

    async def put_state(self, name: str, value: dict[str, Any]) -> None: ...

    # The version registry (gateway.artifacts.registry): records and events are JSON the store does not read.

    async def register_version(
        self, model: str, version: str, record: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Keep `record` as the version's registration unless it has one, atomically across processes;
        returns the registration it already had (None: `record` is it now)."""
        ...

    async def get_versions(self, model: str) -> dict[str, dict[str, Any]]:
        """Every registered version of the model, by version id."""
        ...

    async def add_version_event(
        self, model: str, version: str, event: dict[str, Any], coalesce: bool = False
    ) -> None:
        """Append to the version's history (the newest `HISTORY_LIMIT` are kept). With `coalesce`, an
        event of the same "kind" as the newest replaces it, keeping the newest's "since" (or "at")."""
        ...

    async def get_version_events(self, model: str, version: str) -> list[dict[str, Any]]:
        """The version's history, oldest first."""
        ...

    async def ping(self) -> float:
        """Round-trip time in seconds; raises StoreUnavailable."""
        ...

    async def close(self) -> None: ...


HISTORY_LIMIT = 1000  # events kept per version


def coalesced(newest: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """`event` standing in for `newest`, its span reaching back to when `newest`'s began."""
    return {**event, "since": newest.get("since", newest.get("at"))}


def redacted(url: str) -> str:
    """A store URL without its user and password, for messages, logs and the admin API."""
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"
