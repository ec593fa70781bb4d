"""The Redis store: keys, rate-limit buckets and heartbeats shared by every gateway process.

URLs: `redis://[:password@]host:port/db`, `rediss://...` (TLS), `redis+sentinel://[:password@]host:port[,...]
/service[/db]` (the password is the master's) and `redis+cluster://[:password@]host:port[,...]`.

Failing fast: every operation is bounded by `timeout` (socket timeouts, an overall `asyncio.timeout`) and
raises `StoreUnavailable`; redis-py's retries are off. redis-py drops a connection that failed; after a
timeout cancelled a command half-way we drop idle pooled connections too, so nothing broken is reused.

Rate limits, as admission uses them (`admit_now`, `admit`): token leases, gateway.store.redis_leases.
Rate limits checked per request (`check_limits`): the calls of one event-loop tick share one EVALSHA of
`gcra.lua`. A cluster script touches one slot only, so a request whose buckets span slots (a key's, a
model's) is checked slot group by slot group, in the order its limits come, and a later group's denial
refunds the earlier charges. Until that refund (one round trip later; never, if the timeout strikes first)
the earlier buckets hold one request too many: a concurrent request may be denied, none is over-admitted. A
limit after the denying group is not consulted (a denied key never touches its model's shared bucket): its
verdict is (True, 0, 0.0, 0.0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.maint_notifications import MaintNotificationsConfig

from gateway.routing.table import DEFAULT_STORE_TIMEOUT
from gateway.store.base import KeyRecord, Published, Revoked, StoreUnavailable, redacted
from gateway.store.gcra import Bucket, Verdict, check_all
from gateway.store.leases import Answer
from gateway.store.redis_layout import (
    CHANNEL,
    DELETE_KEY,
    GCRA,
    GCRA_LEASE,
    GET_STATS,
    HEARTBEAT,
    HEARTBEATS,
    KEYS_BY_HASH,
    KEYS_BY_NAME,
    LEASE,
    PUT_FENCED,
    PUT_KEY,
    PUT_STATS,
    REFUND,
    STATS,
    Script,
    bucket_key,
    dump_record,
    lease_keys,
    load_record,
    state_key,
)
from gateway.store.redis_leases import LeasedLimits
from gateway.store.registry_layout import ADD_EVENT, HISTORY_LIMIT, REGISTER, history_key, versions_key

log = logging.getLogger(__name__)
T = TypeVar("T")
LimitAnswer = tuple[bool, list[Verdict]]
Pending = tuple[
    Sequence[Sequence[Bucket]], "asyncio.Future[list[LimitAnswer]]"
]  # a caller's requests, its answer

# Not derived from `timeout`, which is a deadline per store call: the key-change subscription is one long
# wait. A read waits up to NOTICE_POLL for a notice before it pings instead; a peer that has answered
# nothing, not even those pings, for NOTICE_SILENCE (a partition, a hung server) is dropped and the
# subscription made anew. Several polls long, so one slow ping does not cost a resubscription.
NOTICE_POLL = 1.0  # seconds
NOTICE_SILENCE = 3.0  # seconds


def _split_hosts(url: str, default_port: int) -> tuple[str | None, str | None, list[tuple[str, int]], str]:
    """(username, password, [(host, port)...], path) of a URL listing several hosts."""
    netloc, _, path = url.partition("://")[2].partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":")
        if not colon or "]" in port:  # no port given (or a bare IPv6 address)
            host, port = item, str(default_port)
        nodes.append((host.strip("[]"), int(port)))
    return unquote(username) or None, unquote(password) or None, nodes, path


class RedisStore:
    def __init__(self, url: str, timeout: float = DEFAULT_STORE_TIMEOUT) -> None:
        self.url = url
        self._timeout = timeout
        self._where = redacted(url)  # for messages: no password
        self._pending: list[Pending] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        options: dict[str, Any] = dict(
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # fail fast; callers decide (fail_open / fail_closed)
            decode_responses=True,
            # Off, or redis-py 8 skips its check for pooled connections the server has closed, and the
            # first command on each of them after a Redis restart fails.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        scheme = url.partition("://")[0].lower()
        self._cluster: RedisCluster | None = None
        self._sentinel: Sentinel | None = None
        self._new_client: Callable[[int], Redis]  # a fresh plain client (the n-th try), for subscriptions
        if scheme == "redis+cluster":
            username, password, nodes, _ = _split_hosts(url, 6379)
            options |= dict(username=username, password=password)
            # Retries here let the cluster client refresh its slot map after a failover; still time-bounded.
            self._cluster = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                **(options | dict(retry=Retry(NoBackoff(), 2))),
            )
            # PUBLISH reaches every node of a cluster, so subscribing to any one of them is enough.
            self._new_client = lambda n: Redis(
                host=nodes[n % len(nodes)][0], port=nodes[n % len(nodes)][1], **options
            )
        elif scheme == "redis+sentinel":
            username, password, nodes, path = _split_hosts(url, 26379)
            service, _, db = path.strip("/").partition("/")
            sentinel_options = {k: v for k, v in options.items() if k != "decode_responses"}
            self._sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2
            sentinel = self._sentinel
            options |= dict(username=username, password=password, db=int(db or 0))
            self._new_client = lambda n: sentinel.master_for(service, **options)
        elif scheme in ("redis", "rediss"):
            self._new_client = lambda n: Redis.from_url(url, **options)
        else:
            raise ValueError(f"not a Redis URL: {self._where}")
        self._client: Redis | RedisCluster = self._cluster or self._new_client(0)
        self.leases = LeasedLimits(self._lease_call, self._slot)

    # ---- rate limits through leases (gateway.store.redis_leases), what admission uses ----

    def admit_now(self, limits: Sequence[Bucket]) -> Answer | None:
        return self.leases.admit_now(limits)

    async def admit(self, limits: Sequence[Bucket]) -> Answer:
        return await self.leases.admit(limits)

    async def _lease_call(self, keys: list[str], args: list[str | int]) -> Any:
        return await self._guard("lease", self._eval(GCRA_LEASE, keys, args))

    # ---- rate limits, one exact check per request ----

    async def check_limits(self, requests: Sequence[Sequence[Bucket]]) -> list[LimitAnswer]:
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[LimitAnswer]] = loop.create_future()
        if not self._pending:  # the first call of this tick schedules the flush; later ones ride along
            loop.call_soon(self._flush)
        self._pending.append((requests, future))
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            self._spawn(self._decide_batch(batch))

    async def _decide_batch(self, batch: list[Pending]) -> None:
        flat = [limits for requests, _ in batch for limits in requests]
        try:
            decisions = await self._guard("check_limits", self._decide(flat))
        except (Exception, asyncio.CancelledError) as exc:  # every caller must hear back, whatever happened
            if isinstance(exc, asyncio.CancelledError):  # only close() cancels this task
                exc = StoreUnavailable(f"Redis {self._where}: store closed")
            for _, future in batch:
                # One exception each: one raised in many tasks would collect all their tracebacks.
                own = StoreUnavailable(*exc.args) if isinstance(exc, StoreUnavailable) else exc
                if not future.done():
                    future.set_exception(own)
            return
        start = 0
        for requests, future in batch:
            if not future.done():  # its caller may have given up
                future.set_result(decisions[start : start + len(requests)])
            start += len(requests)

    async def _decide(self, flat: list[Sequence[Bucket]]) -> list[LimitAnswer]:
        verdicts: list[list[Verdict | None]] = [[None] * len(limits) for limits in flat]
        admitted = [True] * len(flat)
        charged: list[list[Bucket]] = [[] for _ in flat]
        plans = [self._slot_groups(limits) for limits in flat]  # one group outside a cluster
        for phase in range(max(map(len, plans), default=0)):
            by_slot: dict[int, list[tuple[int, list[int]]]] = {}  # slot -> [(request, limit indexes)]
            for r, groups in enumerate(plans):
                if admitted[r] and phase < len(groups):
                    slot, indexes = groups[phase]
                    by_slot.setdefault(slot, []).append((r, indexes))
            pieces = list(by_slot.values())
            calls = [self._gcra([[flat[r][i] for i in group] for r, group in piece]) for piece in pieces]
            for piece, replies in zip(pieces, await self._each(calls), strict=True):
                for (r, group), (ok, group_verdicts) in zip(piece, replies, strict=True):
                    for i, verdict in zip(group, group_verdicts, strict=True):
                        verdicts[r][i] = verdict
                    if ok:
                        charged[r] += [flat[r][i] for i in group]
                    else:
                        admitted[r] = False
        # dict.fromkeys: a bucket listed twice in one request was charged once, so it is refunded once.
        refunds = [
            limit for r, limits in enumerate(charged) if not admitted[r] for limit in dict.fromkeys(limits)
        ]
        if refunds:
            await self._refund(refunds)
        unconsulted = Verdict(True, 0, 0.0, 0.0)
        return [(ok, [v or unconsulted for v in vs]) for ok, vs in zip(admitted, verdicts, strict=True)]

    def _slot(self, bucket: str) -> int:
        return key_slot(bucket_key(bucket).encode()) if self._cluster else 0

    def _slot_groups(self, limits: Sequence[Bucket]) -> list[tuple[int, list[int]]]:
        """(slot, indexes of `limits` in it), in the order of each group's first limit."""
        groups: dict[int, list[int]] = {}
        for i, limit in enumerate(limits):
            groups.setdefault(self._slot(limit.bucket), []).append(i)
        return list(groups.items())

    @staticmethod
    async def _each(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
        """Await calls concurrently (one per slot); a lone call (always, outside a cluster) without a task."""
        return [await calls[0]] if len(calls) == 1 else list(await asyncio.gather(*calls))

    async def _gcra(self, requests: list[list[Bucket]]) -> list[LimitAnswer]:
        """One script call deciding `requests` (all their buckets in one slot), in order."""
        keys: dict[str, int] = {}
        args: list[str | int] = [len(requests)]
        for limits in requests:
            args.append(len(limits))
            for limit in limits:
                index = keys.setdefault(bucket_key(limit.bucket), len(keys) + 1)
                args += [index, repr(float(limit.rate)), limit.burst]
        reply = await self._eval(GCRA, list(keys), args)
        now, pos, decisions = float(reply[0]), 1, []
        for limits in requests:
            tats = [float(tat) for tat in reply[pos + 1 : pos + 1 + len(limits)]]
            # Same arithmetic as the script, on the same numbers: the verdicts are what it decided.
            _, _, verdicts = check_all(tats, now, limits)
            decisions.append((reply[pos] == 1, verdicts))
            pos += 1 + len(limits)
        return decisions

    async def _refund(self, limits: list[Bucket]) -> None:
        by_slot: dict[int, list[Bucket]] = {}
        for limit in limits:
            by_slot.setdefault(self._slot(limit.bucket), []).append(limit)
        keys_and_intervals = [
            ([bucket_key(x.bucket) for x in g], [repr(1.0 / x.rate) for x in g]) for g in by_slot.values()
        ]
        await self._each([self._eval(REFUND, keys, intervals) for keys, intervals in keys_and_intervals])

    # ---- keys ----

    async def get_key(self, secret_hash: str) -> KeyRecord | None:
        raw = await self._guard("get_key", self._client.execute_command("HGET", KEYS_BY_HASH, secret_hash))
        return load_record(raw) if raw else None

    async def put_key(self, record: KeyRecord) -> None:
        args = [record.name, record.secret_hash, dump_record(record), CHANNEL]
        await self._guard("put_key", self._eval(PUT_KEY, [KEYS_BY_NAME, KEYS_BY_HASH], args))

    async def list_keys(self) -> list[KeyRecord]:
        raws = await self._guard("list_keys", self._client.execute_command("HVALS", KEYS_BY_NAME))
        return sorted((load_record(raw) for raw in raws), key=lambda k: k.name)

    async def delete_key(self, name: str) -> KeyRecord | None:
        raw = await self._guard(
            "delete_key", self._eval(DELETE_KEY, [KEYS_BY_NAME, KEYS_BY_HASH], [name, CHANNEL])
        )
        return load_record(raw) if raw else None

    async def watch_keys(self, on_change: Revoked) -> Callable[[], Awaitable[None]]:
        """Subscribes in the background; returns once subscribed or after a first failed try (it keeps
        trying, and says "*" once it gets through, since messages may have been missed)."""
        ready = asyncio.Event()
        task = self._spawn(self._watch(on_change, ready))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), 4 * self._timeout)

        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        return stop

    async def _watch(self, on_change: Revoked, ready: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        missed, tries = False, 0
        while True:
            # A fresh client each time: redis-py would otherwise resubscribe silently and hide the gap.
            client = self._new_client(tries)
            pubsub = client.pubsub()
            try:
                await asyncio.wait_for(self._subscribe(pubsub), self._timeout)
                if missed:
                    log.warning("store: key notifications restored (%s)", self._where)
                    self._notify(on_change, "*")
                missed, tries = False, 0
                ready.set()
                heard = loop.time()
                while True:
                    message = await pubsub.get_message(timeout=NOTICE_POLL)
                    if message is not None:
                        heard = loop.time()
                        if message["type"] == "message":
                            self._notify(on_change, message["data"])
                    elif loop.time() - heard > NOTICE_SILENCE:  # a partition, a hung server: start over
                        raise RedisConnectionError(f"no answer to PING for {NOTICE_SILENCE:g} s")
                    else:
                        await pubsub.ping()
            except Exception as exc:  # whatever it was, this loop must go on
                if not missed:
                    log.warning("store: key notifications lost (%s): %s", self._where, exc)
                missed, tries = True, tries + 1
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), self._timeout)  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.aclose(), self._timeout)
            ready.set()
            await asyncio.sleep(min(0.05 * 2**tries, 0.5))  # revocation must get through within ~1 s

    @staticmethod
    async def _subscribe(pubsub: Any) -> None:
        await pubsub.subscribe(CHANNEL)
        # The caller bounds the whole wait by the store timeout; this only sets how often it polls.
        while (message := await pubsub.get_message(timeout=NOTICE_POLL)) is None or message[
            "type"
        ] != "subscribe":
            pass

    @staticmethod
    def _notify(on_change: Revoked, secret_hash: str) -> None:
        try:
            on_change(secret_hash)
        except Exception:
            log.exception("store: key change callback failed")

    # ---- processes, health ----

    async def heartbeat(self, process_id: str, ttl: float) -> int:
        live = int(
            await self._guard("heartbeat", self._eval(HEARTBEAT, [HEARTBEATS], [process_id, repr(ttl)]))
        )
        self.leases.processes = live  # they share each bucket's LEASE_SHARE
        return live

    # ---- statistics, leases, rollout state ----

    async def put_stats(self, process_id: str, stats: dict[str, Any], ttl: float) -> None:
        # One hash for all processes (one slot in a cluster); each value carries its own expiry time on
        # Redis's clock, and readers skip and remove the expired ones.
        args = [process_id, repr(ttl), json.dumps(stats)]
        await self._guard("put_stats", self._eval(PUT_STATS, [STATS], args))

    async def get_stats(self) -> Published:
        now, values = await self._guard("get_stats", self._eval(GET_STATS, [STATS], []))
        stats = []
        for value in values:
            with contextlib.suppress(ValueError, KeyError, TypeError):  # not ours to read: skipped
                stats.append(json.loads(value)["stats"])
        return Published(float(now), stats)

    async def time(self) -> float:
        seconds, micros = await self._guard("time", self._client.execute_command("TIME"))
        return int(seconds) + int(micros) / 1e6

    async def lease(self, name: str, holder: str, ttl: float) -> int:
        return int(await self._guard("lease", self._eval(LEASE, lease_keys(name), [holder, int(ttl * 1000)])))

    async def put_state_fenced(self, name: str, value: dict[str, Any], lease: str, token: int) -> bool:
        keys = [lease_keys(lease)[0], state_key(name)]
        return bool(await self._guard("put_state", self._eval(PUT_FENCED, keys, [token, json.dumps(value)])))

    async def get_state(self, name: str) -> dict[str, Any] | None:
        value = await self._guard("get_state", self._client.execute_command("GET", state_key(name)))
        return json.loads(value) if value is not None else None

    async def put_state(self, name: str, value: dict[str, Any]) -> None:
        await self._guard(
            "put_state", self._client.execute_command("SET", state_key(name), json.dumps(value))
        )

    # ---- the version registry (keys and scripts: gateway.store.registry_layout) ----

    async def register_version(
        self, model: str, version: str, record: dict[str, Any]
    ) -> dict[str, Any] | None:
        args = [version, json.dumps(record)]
        old = await self._guard("register_version", self._eval(REGISTER, [versions_key(model)], args))
        return json.loads(old) if old else None

    async def get_versions(self, model: str) -> dict[str, dict[str, Any]]:
        raw = await self._guard("get_versions", self._client.execute_command("HGETALL", versions_key(model)))
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        return {version: json.loads(value) for version, value in pairs}

    async def add_version_event(
        self, model: str, version: str, event: dict[str, Any], coalesce: bool = False
    ) -> None:
        args = [json.dumps(event), "1" if coalesce else "0", HISTORY_LIMIT]
        await self._guard("add_version_event", self._eval(ADD_EVENT, [history_key(model, version)], args))

    async def get_version_events(self, model: str, version: str) -> list[dict[str, Any]]:
        command = self._client.execute_command("LRANGE", history_key(model, version), 0, -1)
        return [json.loads(raw) for raw in await self._guard("get_version_events", command)]

    async def ping(self) -> float:
        start = time.perf_counter()
        await self._guard("ping", self._client.execute_command("PING"))
        return time.perf_counter() - start

    async def close(self) -> None:
        await self.leases.close()
        await self.leases.give_back()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, future in self._pending:
            if not future.done():
                future.set_exception(StoreUnavailable("store closed"))
        self._pending = []
        await self._client.aclose()
        for client in self._sentinel.sentinels if self._sentinel else []:
            await client.aclose()

    # ---- plumbing ----

    async def _eval(self, script: Script, keys: list[str], args: Sequence[str | int]) -> Any:
        try:
            return await self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # first use on this server, or it restarted: EVAL runs it and caches it
            return await self._client.execute_command("EVAL", script.source, len(keys), *keys, *args)

    async def _guard(self, what: str, operation: Coroutine[Any, Any, T]) -> T:
        """Run one store operation under the timeout; every failure becomes StoreUnavailable."""
        try:
            async with asyncio.timeout(self._timeout):  # like wait_for, without a task of its own
                return await operation
        except TimeoutError:
            await self._drop_idle_connections()
            ms = self._timeout * 1000
            raise StoreUnavailable(f"Redis {self._where}: no answer to {what} within {ms:.0f} ms") from None
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis {self._where}: {what} failed: {exc}") from exc

    async def _drop_idle_connections(self) -> None:
        """A command cancelled by the timeout may have left a pooled connection half set up (say, between
        connect and AUTH); redis-py would hand it out again. Dropping idle connections is cheap."""
        with contextlib.suppress(Exception):
            if self._cluster is not None:
                for node in self._cluster.get_nodes():
                    await node.disconnect_free_connections()
            else:
                assert isinstance(self._client, Redis)
                await self._client.connection_pool.disconnect(inuse_connections=False)

    def _spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)  # a reference, so the task is not garbage-collected mid-flight
        task.add_done_callback(self._tasks.discard)
        return task
