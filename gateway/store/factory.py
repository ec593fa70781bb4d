"""Which store a URL names. Kept apart from `base` so that the interface imports no implementation."""

from __future__ import annotations

from gateway.routing.table import DEFAULT_STORE_TIMEOUT
from gateway.store.base import Store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore

REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster")


def open_store(url: str, timeout: float = DEFAULT_STORE_TIMEOUT) -> Store:
    """The store for a URL: memory:// or redis://, rediss://, redis+sentinel://, redis+cluster://."""
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return MemoryStore(url)
    if scheme in REDIS_SCHEMES:
        return RedisStore(url, timeout=timeout)
    raise ValueError(f"unsupported store URL scheme {scheme!r}")
