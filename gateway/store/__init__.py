"""The store: state shared by every gateway process (API keys, rate-limit buckets, heartbeats).

One interface (`Store`), two implementations: Redis for production (`gateway.store.redis`) and process
memory for a single process (`gateway.store.memory`). `open_store(url)` picks by URL scheme.
"""

from gateway.store.base import KeyRecord, Store, StoreUnavailable
from gateway.store.factory import open_store

__all__ = ["KeyRecord", "Store", "StoreUnavailable", "open_store"]
