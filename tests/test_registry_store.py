"""The version registry's store methods on every store: memory, and real Redis as one server, a 3-node
cluster and a master behind a sentinel (servers these tests start, as tests/test_store.py does)."""

# The store fixtures come from tests/test_store.py; a test naming one as a parameter is not redefining it.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
from redis.crc import key_slot

from backends.local import free_port
from gateway.artifacts import registry
from gateway.artifacts.guard import registry_errors
from gateway.artifacts.schema import Schema, Tensor
from gateway.routing.config import parse_table
from gateway.store import Store, open_store
from gateway.store.base import HISTORY_LIMIT
from gateway.store.registry_layout import history_key, versions_key
from tests.redis_servers import RedisServer
from tests.test_store import (  # noqa: F401 - fixtures, started once for this module
    ALL,
    redis_cluster,
    redis_sentinel,
    redis_server,
    store,
    two_stores,
)

SCHEMA = Schema((Tensor("INPUT__0", "FP32", (-1, -1)),), (Tensor("OUTPUT__0", "FP32", (-1, 1)),))


def model() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def record(name: str, digest_char: str) -> registry.RegistryRecord:
    return registry.RegistryRecord(name, "2.1.3", "sha256:" + digest_char * 64, "fd", 3, SCHEMA, {"auc": 0.9})


@pytest.mark.parametrize("two_stores", ALL, indirect=True)
async def test_the_first_registration_of_an_id_wins_across_processes(two_stores: tuple[Store, Store]) -> None:
    first, second = two_stores
    name = model()
    # Two processes registering one id with different builds at once: exactly one of them wins.
    answers = await asyncio.gather(
        registry.register(first, record(name, "a")), registry.register(second, record(name, "b"))
    )
    assert sorted(created for _, created in answers) == [False, True]
    winner = next(stored for stored, created in answers if created)
    assert all(stored == winner for stored, _ in answers)
    assert await registry.registered(second, name) == {"2.1.3": winner}
    again, created = await registry.register(first, winner)
    assert (again, created) == (winner, False)
    loser = record(name, "b" if winner.digest.endswith("a" * 64) else "a")
    message = registry.conflict(again, loser)
    assert message is not None and f"{name} 2.1.3 is already {winner.digest}" in message


@pytest.mark.parametrize("store", ALL, indirect=True)
async def test_history_appends_and_served_marks_extend_the_newest(store: Store) -> None:
    name = model()
    await registry.add_event(store, name, "2.1.3", registry.event("registered", 100.0, by="ci"))
    await registry.add_event(store, name, "2.1.3", registry.event("served", 110.0, since=110.0))
    await registry.add_event(store, name, "2.1.3", registry.event("served", 120.0, since=120.0))
    await registry.add_event(store, name, "2.1.3", registry.event("rollout", 125.0, action="started"))
    await registry.add_event(store, name, "2.1.3", registry.event("served", 130.0, since=130.0))
    events = await registry.history(store, name, "2.1.3")
    assert [(e["kind"], e["at"], e.get("since")) for e in events] == [
        ("registered", 100.0, None),
        ("served", 120.0, 110.0),
        ("rollout", 125.0, None),
        ("served", 130.0, 130.0),
    ]
    assert registry.served_span(events) == (110.0, 130.0)
    assert await registry.history(store, name, "2.2.0") == []


@pytest.mark.parametrize("store", ["memory", "redis"], indirect=True)
async def test_history_keeps_the_newest_events(store: Store) -> None:
    name = model()
    for i in range(HISTORY_LIMIT + 3):
        await store.add_version_event(name, "1", {"kind": "deployed", "at": float(i)})
    events = await store.get_version_events(name, "1")
    assert len(events) == HISTORY_LIMIT and events[0]["at"] == 3.0 and events[-1]["at"] == HISTORY_LIMIT + 2


async def test_a_models_registry_is_under_the_prefix_in_one_slot(redis_server: RedisServer) -> None:
    name = model()
    assert key_slot(versions_key(name).encode()) == key_slot(history_key(name, "2.1.3").encode())
    assert versions_key(name).startswith(f"gw:{{reg:{name}}}:")
    opened = open_store(redis_server.url, 0.25)
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        await registry.register(opened, record(name, "a"))
        await registry.add_event(opened, name, "2.1.3", registry.event("registered", 1.0))
        assert set(client.keys(f"*{name}*")) == {versions_key(name), history_key(name, "2.1.3")}
        assert client.ttl(versions_key(name)) == -1, "a registration never expires"
    finally:
        await opened.close()
        client.close()


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
async def test_with_the_registry_down_a_file_naming_archives_follows_on_error(on_error: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    text = f"""
backends: {{a: {{url: "http://127.0.0.1:1"}}}}
models:
  fd:
    versions:
      "1": {{backend: a, target: fd/1, archive: "sha256:{"a" * 64}"}}
store: {{url: "{url}", on_error: {on_error}}}
"""
    down = open_store(url, 0.25)
    try:
        errors = await registry_errors(down, parse_table(text, "routes.yaml"))
        plain = await registry_errors(
            down, parse_table(text.replace(', archive: "sha256:' + "a" * 64 + '"', ""))
        )
    finally:
        await down.close()
    if on_error == "fail_closed":
        assert len(errors) == 1 and errors[0].startswith(
            "routes.yaml:1:1: the version registry is unavailable"
        )
    else:
        assert errors == []
    assert plain == []  # a file that names no archive promises nothing the registry must confirm
