"""API keys: secret parsing and hashing, the decision, the per-process cache over a MemoryStore, the admin
routes on a real admin application, and `gateway keys ...` against that application's server.

Nothing here needs Redis: the cache and the routes only use the `Store` interface, which MemoryStore
implements; the same behaviour against Redis belongs to the store's own suite.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.access import keys
from gateway.access.key_cache import MISSING, KeyCache
from gateway.access.keys import (
    KEY_REQUIRED,
    Denial,
    authorize,
    hash_secret,
    secret_from_headers,
)
from gateway.admin import app as admin
from gateway.admin import keys as admin_keys
from gateway.admin.control_plane import ControlPlane
from gateway.admin.openapi import OPENAPI
from gateway.cli import keys as keys_cli
from gateway.routing.table import Limit
from gateway.state import files as snapshots
from gateway.store.base import KeyRecord, StoreUnavailable
from gateway.store.memory import MemoryStore

ALICE, BOB = "s3cret-alice-token", "s3cret-bob-token"
TOKENS = {ALICE: "alice", BOB: "bob"}
ROUTES = """
backends:
  triton-a: {url: http://127.0.0.1:8010, timeout: 10s}
models:
  fraud-detector:
    versions:
      2.1.3: {backend: triton-a, target: fraud_detector/3}
    split: {2.1.3: 100}
keys: {required: true}
"""


def record(name: str = "team-a", secret: str = "gwk_secret-a", **fields: Any) -> KeyRecord:
    return KeyRecord(name=name, secret_hash=hash_secret(secret), **fields)


# -- secrets -------------------------------------------------------------------------------------


def test_new_secrets_are_long_random_and_hash_to_sha256_hex() -> None:
    made = {keys.new_secret() for _ in range(1000)}
    assert len(made) == 1000
    for secret in list(made)[:20]:
        assert secret.startswith("gwk_") and len(secret) >= 47
        assert secret_from_headers(f"Bearer {secret}".encode(), None) == secret
    assert hash_secret("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_secret("gwk_x") == hashlib.sha256(b"gwk_x").hexdigest()


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        (b"Bearer gwk_abc", None, "gwk_abc"),
        (b"bearer gwk_abc", None, "gwk_abc"),
        (b"BEARER   gwk_abc  ", None, "gwk_abc"),
        (None, b"gwk_abc", "gwk_abc"),
        (None, b"  gwk_abc ", "gwk_abc"),
        (b"Bearer from-auth", b"from-header", "from-auth"),  # Authorization wins
        (b"Basic dXNlcjpwYXNz", None, None),  # another scheme is not a key
        (b"Basic dXNlcjpwYXNz", b"gwk_abc", "gwk_abc"),  # ... but X-API-Key still is
        (b"Bearer", None, None),
        (b"Bearer ", None, None),
        (b"Bearer two words", None, None),
        (b"Bearer \xff\xfe", None, None),
        (b"Bearer a\x00b", None, None),
        (b"Bearer " + b"a" * 300, None, None),
        (b"gwk_abc", None, None),  # a bare secret in Authorization has no scheme
        (None, b"", None),
        (None, b"has space", None),
        (None, None, None),
    ],
)
def test_secret_from_headers(
    authorization: bytes | None, x_api_key: bytes | None, expected: str | None
) -> None:
    assert secret_from_headers(authorization, x_api_key) == expected


# -- the decision --------------------------------------------------------------------------------


def test_authorize_allows_a_good_key() -> None:
    assert authorize(record(), "fraud-detector", time.time()) is None  # no models: all
    assert authorize(record(models=("fraud-detector",)), "fraud-detector", time.time()) is None
    assert authorize(record(expires_at=100.0), "m", 99.9) is None


def test_authorize_401_cases_and_403() -> None:
    unknown = authorize(None, "m", 0.0)
    assert unknown is not None and (unknown.status, unknown.reason) == (401, "unknown")
    expired = authorize(record(expires_at=100.0), "m", 100.0)
    assert expired == Denial(401, "expired", "API key 'team-a' has expired")
    disabled = authorize(record(disabled=True), "m", 0.0)
    assert disabled is not None and (disabled.status, disabled.reason) == (401, "disabled")
    wrong = authorize(record(models=("churn",)), "fraud-detector", 0.0)
    assert wrong == Denial(403, "model", "API key 'team-a' may not call model 'fraud-detector'")
    assert (KEY_REQUIRED.status, KEY_REQUIRED.reason) == (401, "missing")
    for denial in (unknown, expired, disabled, wrong, KEY_REQUIRED):
        assert "gwk_secret-a" not in denial.message and hash_secret("gwk_secret-a") not in denial.message


def test_authorize_checks_expiry_before_disabled_and_model() -> None:
    # An expired key gets 401 even on a model it may not call: the client needs a new key either way.
    denial = authorize(record(models=("a",), expires_at=1.0, disabled=True), "b", 2.0)
    assert denial is not None and denial.reason == "expired"


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("30d", 30 * 86400), ("1.5d", 1.5 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), (3600, 3600)],
)
def test_expires_in(given: Any, seconds: float) -> None:
    assert keys.expires_in_seconds(given) == pytest.approx(seconds)


@pytest.mark.parametrize("given", [0, -1, "0s", "abc", "30 days", True, [1], float("inf"), "4000d", None])
def test_expires_in_refusals(given: Any) -> None:
    with pytest.raises(keys.KeySettingError, match="expires_in"):
        keys.expires_in_seconds(given)


# -- the cache -----------------------------------------------------------------------------------


class CountingMemoryStore(MemoryStore):
    """A MemoryStore that counts `get_key` calls, and can hold them (`gate`) or fail them (`down`)."""

    def __init__(self) -> None:
        super().__init__()
        self.get_key_calls = 0
        self.gate: asyncio.Event | None = None
        self.down = False

    async def get_key(self, secret_hash: str) -> KeyRecord | None:
        self.get_key_calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StoreUnavailable("redis://:password@10.0.0.1:6379 timed out")
        return await super().get_key(secret_hash)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def cached() -> AsyncIterator[tuple[CountingMemoryStore, KeyCache, Clock]]:
    store, clock = CountingMemoryStore(), Clock()
    cache = KeyCache(store, ttl=30.0, negative_ttl=1.0, clock=clock)
    await cache.start()
    yield store, cache, clock
    await cache.stop()


async def test_cache_hits_are_kept_for_the_ttl(cached: tuple[CountingMemoryStore, KeyCache, Clock]) -> None:
    store, cache, clock = cached
    key = record()
    await store.put_key(key)
    assert cache.peek(key.secret_hash) is MISSING
    assert await cache.lookup(key.secret_hash) == key
    assert await cache.lookup(key.secret_hash) == key
    assert cache.peek(key.secret_hash) == key and store.get_key_calls == 1
    clock.now += 29.9
    assert await cache.lookup(key.secret_hash) == key and store.get_key_calls == 1
    clock.now += 0.2
    assert cache.peek(key.secret_hash) is MISSING
    assert await cache.lookup(key.secret_hash) == key and store.get_key_calls == 2


async def test_cache_misses_are_kept_briefly_so_a_new_key_works_within_a_second(
    cached: tuple[CountingMemoryStore, KeyCache, Clock],
) -> None:
    store, cache, clock = cached
    key = record()
    assert await cache.lookup(key.secret_hash) is None
    assert await cache.lookup(key.secret_hash) is None
    assert cache.peek(key.secret_hash) is None and store.get_key_calls == 1
    await store.put_key(key)  # a new name: nothing to invalidate, the short miss TTL covers it
    assert await cache.lookup(key.secret_hash) is None
    clock.now += 1.0
    assert await cache.lookup(key.secret_hash) == key and store.get_key_calls == 2


async def test_changes_in_the_store_invalidate_through_the_watch(
    cached: tuple[CountingMemoryStore, KeyCache, Clock],
) -> None:
    store, cache, _ = cached
    key = record()
    await store.put_key(key)
    assert await cache.lookup(key.secret_hash) == key
    disabled = KeyRecord(name=key.name, secret_hash=key.secret_hash, disabled=True)
    await store.put_key(disabled)  # same hash, changed record: the old answer is dropped
    assert cache.peek(key.secret_hash) is MISSING
    assert await cache.lookup(key.secret_hash) == disabled
    rotated = record(secret="gwk_new")
    await store.put_key(rotated)  # same name, new secret: the old hash is gone
    assert await cache.lookup(key.secret_hash) is None
    assert await cache.lookup(rotated.secret_hash) == rotated
    await store.delete_key(rotated.name)
    assert cache.peek(rotated.secret_hash) is MISSING
    assert await cache.lookup(rotated.secret_hash) is None


async def test_star_clears_everything(cached: tuple[CountingMemoryStore, KeyCache, Clock]) -> None:
    store, cache, _ = cached
    for name in ("a", "b", "c"):
        await store.put_key(record(name, f"gwk_{name}"))
        await cache.lookup(hash_secret(f"gwk_{name}"))
    await cache.lookup(hash_secret("gwk_unknown"))
    assert len(cache) == 4
    cache.invalidate("*")
    assert len(cache) == 0 and cache.peek(hash_secret("gwk_a")) is MISSING


async def test_stop_ends_the_watch() -> None:
    store = CountingMemoryStore()
    cache = KeyCache(store)
    await cache.start()
    await cache.start()  # twice is once
    key = record()
    await store.put_key(key)
    await cache.lookup(key.secret_hash)
    await cache.stop()
    await cache.stop()
    await store.delete_key(key.name)
    assert cache.peek(key.secret_hash) == key  # nobody told it: only the TTL would


async def test_concurrent_lookups_share_one_store_call(
    cached: tuple[CountingMemoryStore, KeyCache, Clock],
) -> None:
    store, cache, _ = cached
    key = record()
    await store.put_key(key)
    store.gate = asyncio.Event()
    waiting = [asyncio.create_task(cache.lookup(key.secret_hash)) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert store.get_key_calls == 1 and cache.store_lookups == 1
    store.gate.set()
    assert await asyncio.gather(*waiting) == [key] * 50
    assert store.get_key_calls == 1


async def test_an_answer_older_than_an_invalidation_is_returned_but_not_cached(
    cached: tuple[CountingMemoryStore, KeyCache, Clock],
) -> None:
    store, cache, _ = cached
    key = record()
    await store.put_key(key)
    store.gate = asyncio.Event()
    pending = asyncio.create_task(cache.lookup(key.secret_hash))
    await asyncio.sleep(0.01)
    await store.delete_key(key.name)  # revoked while the lookup was on its way
    store.gate.set()
    await pending
    assert cache.peek(key.secret_hash) is MISSING  # so the revoked key is not cached for 30 s
    store.gate = None
    assert await cache.lookup(key.secret_hash) is None


async def test_store_errors_reach_every_waiter_and_are_not_cached(
    cached: tuple[CountingMemoryStore, KeyCache, Clock],
) -> None:
    store, cache, _ = cached
    store.down, store.gate = True, asyncio.Event()
    waiting = [asyncio.create_task(cache.lookup("h")) for _ in range(3)]
    await asyncio.sleep(0.01)
    store.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results) and store.get_key_calls == 1
    assert cache.peek("h") is MISSING
    store.down = False
    assert await cache.lookup("h") is None and store.get_key_calls == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_lookup(
    cached: tuple[CountingMemoryStore, KeyCache, Clock],
) -> None:
    store, cache, _ = cached
    key = record()
    await store.put_key(key)
    store.gate = asyncio.Event()
    first = asyncio.create_task(cache.lookup(key.secret_hash))
    second = asyncio.create_task(cache.lookup(key.secret_hash))
    await asyncio.sleep(0.01)
    first.cancel()
    store.gate.set()
    assert await second == key
    assert first.cancelled() and cache.peek(key.secret_hash) == key


async def test_cache_size_is_bounded_and_unknown_hashes_cannot_push_keys_out() -> None:
    store = CountingMemoryStore()
    cache = KeyCache(store, max_entries=3, max_unknown=4)
    real = [record(f"k{i}", f"gwk_{i}") for i in range(5)]
    for key in real:
        await store.put_key(key)
        assert await cache.lookup(key.secret_hash) == key
    assert len(cache) == 3  # the oldest keys went first
    assert cache.peek(real[0].secret_hash) is MISSING and cache.peek(real[4].secret_hash) == real[4]
    for i in range(100):
        assert await cache.lookup(f"h{i}") is None
    assert len(cache) == 3 + 4
    assert cache.peek("h99") is None and cache.peek("h0") is MISSING
    assert [cache.peek(k.secret_hash) for k in real[2:]] == real[2:]  # every real key still cached


# -- the admin routes ----------------------------------------------------------------------------


@dataclass
class KeysAdmin:
    client: TestClient[web.Request, web.Application]
    plane: ControlPlane
    store: CountingMemoryStore
    state: Path
    app: web.Application

    async def call(self, method: str, path: str, token: str | None = ALICE, **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.client.request(method, path, headers=headers, **kwargs) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    async def raw(self, method: str, path: str) -> str:
        async with self.client.request(method, path, headers={"Authorization": f"Bearer {ALICE}"}) as r:
            return await r.text()

    def audit(self) -> list[dict[str, Any]]:
        return self.plane.audit(100)

    def cli(self, *argv: str, token: str = ALICE) -> argparse.Namespace:
        parser = argparse.ArgumentParser(prog="gateway")
        keys_cli.add_commands(parser.add_subparsers(dest="command", required=True))
        url = str(self.client.make_url("/"))
        return parser.parse_args(["keys", *argv, "--admin", url, "--token", token])


def served(app: web.Application) -> set[tuple[str, str]]:
    return {(route.method, route.resource.canonical) for route in app.router.routes() if route.resource}


async def _no_reload() -> None:
    raise AssertionError("no reload expected")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[KeysAdmin]:
    config = tmp_path / "routes.yaml"
    config.write_text(ROUTES)
    state = tmp_path / "state"
    plane = ControlPlane(str(config), state, _no_reload)
    store = CountingMemoryStore()
    app = admin.build_admin_app(plane, dict(TOKENS), store)
    async with TestClient(TestServer(app)) as client:
        yield KeysAdmin(client, plane, store, state, app)


async def test_create_shows_the_secret_once_and_stores_only_its_hash(
    api: KeysAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = {"name": "team-a", "models": ["fraud-detector"], "rate": "100/s", "burst": 20, "expires_in": "30d"}
    async with api.client.post("/api/keys", json=body, headers={"Authorization": f"Bearer {ALICE}"}) as r:
        assert r.status == 201 and r.headers["Cache-Control"] == "no-store"
        created = await r.json()
    secret = created["secret"]
    assert secret.startswith("gwk_") and "warning" in created and "secret_hash" not in created
    assert hash_secret(secret) not in json.dumps(created)
    assert created["name"] == "team-a" and created["models"] == ["fraud-detector"]
    assert created["rate"] == 100.0 and created["burst"] == 20 and created["created_by"] == "alice"
    assert created["expires_at"] == pytest.approx(time.time() + 30 * 86400, abs=5)
    (stored,) = await api.store.list_keys()
    assert stored.secret_hash == hash_secret(secret) and secret not in repr(stored)

    listing, one = await api.raw("GET", "/api/keys"), await api.raw("GET", "/api/keys/team-a")
    for text in (listing, one):
        assert secret not in text and stored.secret_hash not in text and "secret" not in text
    assert [k["name"] for k in json.loads(listing)["keys"]] == ["team-a"]
    assert json.loads(one) == {k: v for k, v in created.items() if k not in ("secret", "replaced", "warning")}

    (entry,) = api.audit()
    assert (entry["who"], entry["action"], entry["name"]) == ("alice", "keys.create", "team-a")
    audit_text = (api.state / snapshots.AUDIT).read_text()
    assert secret not in audit_text and stored.secret_hash not in audit_text
    assert secret not in caplog.text and stored.secret_hash not in caplog.text


async def test_duplicate_is_409_and_replace_rotates_keeping_settings(api: KeysAdmin) -> None:
    first = {"name": "team-a", "models": ["fraud-detector"], "rate": "10/s"}
    status, old = await api.call("POST", "/api/keys", json=first)
    assert status == 201
    status, body = await api.call("POST", "/api/keys", json={"name": "team-a"}, token=BOB)
    assert status == 409 and '"replace": true' in body["error"] and old["secret"] not in json.dumps(body)
    status, new = await api.call("POST", "/api/keys", json={"name": "team-a", "replace": True}, token=BOB)
    assert status == 201 and new["replaced"] is True and new["secret"] != old["secret"]
    assert new["models"] == ["fraud-detector"] and new["rate"] == 10.0  # a rotation never widens a key
    assert new["created_by"] == "bob"
    assert await api.store.get_key(hash_secret(old["secret"])) is None
    assert (await api.store.get_key(hash_secret(new["secret"]))) is not None
    status, wider = await api.call(
        "POST", "/api/keys", json={"name": "team-a", "replace": True, "models": []}
    )
    assert status == 201 and wider["models"] == []  # widening is explicit
    assert [e["action"] for e in api.audit()] == ["keys.create", "keys.rotate", "keys.rotate"]
    assert [e["who"] for e in api.audit()] == ["alice", "bob", "alice"]


async def test_revoke(api: KeysAdmin) -> None:
    status, created = await api.call("POST", "/api/keys", json={"name": "team-a"})
    status, body = await api.call("DELETE", "/api/keys/team-a", token=BOB)
    assert status == 200 and body == {"name": "team-a", "revoked": True}
    assert await api.store.get_key(hash_secret(created["secret"])) is None
    assert (await api.call("GET", "/api/keys/team-a"))[0] == 404
    status, body = await api.call("DELETE", "/api/keys/team-a")
    assert status == 404 and "no API key named 'team-a'" in body["error"]
    assert [(e["who"], e["action"], e["name"]) for e in api.audit()][-1] == ("bob", "keys.revoke", "team-a")
    assert len(api.audit()) == 2  # the refused second revoke is not an action


async def test_patch_disables_enables_and_changes(api: KeysAdmin) -> None:
    status, created = await api.call("POST", "/api/keys", json={"name": "team-a", "rate": "5/s"})
    status, body = await api.call("PATCH", "/api/keys/team-a", json={"disabled": True})
    assert status == 200 and body["disabled"] is True
    key = await api.store.get_key(hash_secret(created["secret"]))  # same secret, now disabled
    assert key is not None and key.disabled
    status, body = await api.call("PATCH", "/api/keys/team-a", json={"disabled": False}, token=BOB)
    assert status == 200 and body["disabled"] is False
    status, body = await api.call("PATCH", "/api/keys/team-a", json={"rate": "600/m", "models": ["m1", "m1"]})
    assert status == 200 and body["rate"] == 10.0 and body["models"] == ["m1"]
    status, body = await api.call("PATCH", "/api/keys/team-a", json={"rate": None, "burst": 3})
    assert status == 400 and "needs a" in body["error"]
    status, body = await api.call("PATCH", "/api/keys/team-a", json={})
    assert status == 400 and "nothing to change" in body["error"]
    status, body = await api.call("PATCH", "/api/keys/nobody", json={"disabled": True})
    assert status == 404
    actions = [(e["who"], e["action"]) for e in api.audit()]
    assert actions == [
        ("alice", "keys.create"),
        ("alice", "keys.disable"),
        ("bob", "keys.enable"),
        ("alice", "keys.update"),
    ]
    assert api.audit()[-1]["changes"] == {"rate": 10.0, "models": ["m1"]}


async def test_model_limits_are_set_shown_and_changed(api: KeysAdmin) -> None:
    body = {
        "name": "team-a",
        "models": ["fraud-detector", "churn"],
        "model_limits": {"fraud-detector": {"rate": "600/m", "burst": 20}, "churn": {"rate": 2.5}},
    }
    status, created = await api.call("POST", "/api/keys", json=body)
    assert status == 201, created
    # A burst left out gets routes.yaml's default: the rate per second, rounded up.
    expected = {"fraud-detector": {"rate": 10.0, "burst": 20}, "churn": {"rate": 2.5, "burst": 3}}
    assert created["model_limits"] == expected
    stored = await api.store.get_key(hash_secret(created["secret"]))
    assert stored is not None
    assert stored.model_limits == {"fraud-detector": Limit(10.0, 20), "churn": Limit(2.5, 3)}
    assert (await api.call("GET", "/api/keys/team-a"))[1]["model_limits"] == expected
    _, listing = await api.call("GET", "/api/keys")
    assert listing["keys"][0]["model_limits"] == expected
    assert created["secret"] not in json.dumps(listing)

    # A rotation keeps them; a PATCH that sends model_limits replaces the whole set.
    status, rotated = await api.call("POST", "/api/keys", json={"name": "team-a", "replace": True})
    assert status == 201 and rotated["model_limits"] == expected
    patch = {"model_limits": {"churn": {"rate": "1/s", "burst": 1}}}
    status, changed = await api.call("PATCH", "/api/keys/team-a", json=patch)
    assert status == 200 and changed["model_limits"] == {"churn": {"rate": 1.0, "burst": 1}}
    assert api.audit()[-1]["changes"] == {"model_limits": {"churn": {"rate": 1.0, "burst": 1}}}
    (stored,) = await api.store.list_keys()
    assert stored.model_limits == {"churn": Limit(1.0, 1)}

    # Narrowing "models" past a limited model is refused rather than leaving a limit nobody can reach.
    status, refused = await api.call("PATCH", "/api/keys/team-a", json={"models": ["fraud-detector"]})
    assert status == 400 and "'churn', which the key may not call" in refused["error"]
    status, cleared = await api.call("PATCH", "/api/keys/team-a", json={"model_limits": None})
    assert status == 200 and cleared["model_limits"] == {}
    assert (await api.store.list_keys())[0].model_limits == {}

    # A key allowed every model may limit any of them.
    status, wide = await api.call(
        "POST", "/api/keys", json={"name": "team-b", "model_limits": {"anything": {"rate": "5/s"}}}
    )
    assert status == 201 and wide["model_limits"] == {"anything": {"rate": 5.0, "burst": 5}}


@pytest.mark.parametrize(
    ("model_limits", "message"),
    [
        (["m"], '"model_limits" must be an object of model -> limit'),
        ({"m": "100/s"}, '"model_limits" for \'m\' must be {"rate": "100/s"}'),
        ({"m": {}}, '"model_limits" for \'m\' must be {"rate"'),
        ({"m": {"rate": "1/s", "per": "s"}}, 'with an optional "burst"'),
        ({"a/b": {"rate": "1/s"}}, "\"model_limits\": model name 'a/b' may only use"),
        ({"m": {"rate": "100"}}, '"model_limits" for \'m\': "rate" must be a rate like'),
        ({"m": {"rate": "0/s"}}, '"model_limits" for \'m\': "rate" must be more than zero'),
        ({"m": {"rate": 0}}, '"rate" must be a rate like "100/s", "600/m" or "3600/h", or a number'),
        ({"m": {"rate": -1.5}}, "or a number of requests per second above zero, not -1.5"),
        ({"m": {"rate": True}}, "above zero, not True"),
        ({"m": {"rate": None}}, "above zero, not None"),
        ({"m": {"rate": "1/s", "burst": 0}}, '"model_limits" for \'m\': "burst" must be a whole number'),
        ({"m": {"rate": "1/s", "burst": 2.5}}, '"burst" must be a whole number'),
        ({"churn": {"rate": "1/s"}}, "names 'churn', which the key may not call (its \"models\": m)"),
    ],
)
async def test_model_limit_refusals_are_400_with_a_reason(
    api: KeysAdmin, model_limits: Any, message: str
) -> None:
    body = {"name": "a", "models": ["m"], "model_limits": model_limits}
    status, answer = await api.call("POST", "/api/keys", json=body)
    assert status == 400 and message in answer["error"], answer
    status, _ = await api.call("POST", "/api/keys", json={"name": "a", "models": ["m"]})
    assert status == 201
    status, answer = await api.call("PATCH", "/api/keys/a", json={"model_limits": model_limits})
    assert status == 400 and message in answer["error"], answer
    (stored,) = await api.store.list_keys()
    assert stored.model_limits == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, '"name" is required'),
        ({"name": ""}, '"name" must be 1 to 64'),
        ({"name": "a b"}, '"name" must be 1 to 64'),
        ({"name": "x" * 65}, '"name" must be 1 to 64'),
        ({"name": ".."}, '"name" must be'),
        ({"name": 7}, '"name" must be'),
        ({"name": "a", "models": "fraud-detector"}, '"models" must be a list'),
        ({"name": "a", "models": ["a/b"]}, '"models": model name'),
        ({"name": "a", "rate": "100"}, '"rate" must be a rate like'),
        ({"name": "a", "rate": 100}, '"rate" must be a string'),
        ({"name": "a", "rate": "0/s"}, "more than zero"),
        ({"name": "a", "rate": "1/s", "burst": 0}, '"burst" must be a whole number'),
        ({"name": "a", "rate": "1/s", "burst": 1.5}, '"burst" must be a whole number'),
        ({"name": "a", "burst": 5}, '"burst" needs a "rate"'),
        ({"name": "a", "expires_in": "soon"}, '"expires_in" must be a duration'),
        ({"name": "a", "expires_in": -5}, '"expires_in" must be more than zero'),
        ({"name": "a", "replace": "yes"}, '"replace" must be true or false'),
        ({"name": "a", "secret": "mine"}, "unknown field(s) 'secret'"),
        (["a"], "JSON object"),
    ],
)
async def test_create_refusals_are_400_with_a_reason(api: KeysAdmin, body: Any, message: str) -> None:
    status, answer = await api.call("POST", "/api/keys", json=body)
    assert status == 400 and message in answer["error"], answer
    assert api.audit() == [] and await api.store.list_keys() == []


async def test_malformed_json_is_400(api: KeysAdmin) -> None:
    status, answer = await api.call("POST", "/api/keys", data=b"{name: a")
    assert status == 400 and "body must be JSON" in answer["error"]


async def test_every_key_route_needs_the_admin_token(api: KeysAdmin) -> None:
    routes = {(method, path) for method, path in served(api.app) if path.startswith("/api/keys")}
    assert routes == {
        ("GET", "/api/keys"),
        ("POST", "/api/keys"),
        ("GET", "/api/keys/{name}"),
        ("PATCH", "/api/keys/{name}"),
        ("DELETE", "/api/keys/{name}"),
    }
    for method, path in sorted(routes):
        for token in (None, "wrong"):
            status, body = await api.call(
                method, path.replace("{name}", "a"), token=token, json={"name": "a"}
            )
            assert status == 401 and "admin token" in body["error"], (method, path, token)
    assert await api.store.list_keys() == [] and api.audit() == []


async def test_an_expired_key_shows_as_expired(api: KeysAdmin) -> None:
    status, _ = await api.call("POST", "/api/keys", json={"name": "brief", "expires_in": 0.01})
    assert status == 201
    await asyncio.sleep(0.02)
    status, body = await api.call("GET", "/api/keys/brief")
    assert status == 200 and body["expired"] is True


async def test_store_down_is_503_without_the_store_url(
    api: KeysAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(*args: Any) -> Any:
        raise StoreUnavailable("redis://:hunter2@10.0.0.1:6379 timed out")

    monkeypatch.setattr(api.store, "list_keys", down)
    for method, path in (("GET", "/api/keys"), ("POST", "/api/keys"), ("DELETE", "/api/keys/a")):
        if method == "DELETE":
            monkeypatch.setattr(api.store, "delete_key", down)
        status, body = await api.call(method, path, json={"name": "a"})
        assert status == 503 and "unavailable" in body["error"] and "hunter2" not in json.dumps(body)
    assert api.audit() == []


async def test_revocation_through_the_api_reaches_a_data_plane_cache(api: KeysAdmin) -> None:
    cache = KeyCache(api.store)
    await cache.start()
    try:
        _, created = await api.call("POST", "/api/keys", json={"name": "team-a", "models": ["m"]})
        secret_hash = hash_secret(created["secret"])
        key = await cache.lookup(secret_hash)
        assert authorize(key, "m", time.time()) is None
        denial = authorize(key, "other", time.time())
        assert denial is not None and denial.status == 403
        await api.call("PATCH", "/api/keys/team-a", json={"disabled": True})
        assert cache.peek(secret_hash) is MISSING
        denial = authorize(await cache.lookup(secret_hash), "m", time.time())
        assert denial is not None and (denial.status, denial.reason) == (401, "disabled")
        await api.call("DELETE", "/api/keys/team-a")
        denial = authorize(await cache.lookup(secret_hash), "m", time.time())
        assert denial is not None and (denial.status, denial.reason) == (401, "unknown")
    finally:
        await cache.stop()


def test_openapi_fragment_matches_the_routes_and_resolves() -> None:
    app = web.Application()
    admin_keys.add_key_routes(app, MemoryStore(), snapshots.AuditLog(Path("/nonexistent")))
    documented = {
        (method.upper(), path)
        for path, item in admin_keys.KEYS_OPENAPI_PATHS.items()
        for method in item
        if method != "parameters"
    }
    assert documented == served(app)
    document: Any = json.loads(
        json.dumps(
            {
                **OPENAPI,
                "paths": {**OPENAPI["paths"], **admin_keys.KEYS_OPENAPI_PATHS},
                "components": {
                    **OPENAPI["components"],
                    "schemas": {**OPENAPI["components"]["schemas"], **admin_keys.KEYS_OPENAPI_SCHEMAS},
                },
            }
        )
    )

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in refs(v)]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []

    found = refs(admin_keys.KEYS_OPENAPI_PATHS) + refs(admin_keys.KEYS_OPENAPI_SCHEMAS)
    assert found
    for ref in found:
        target = document
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]  # a KeyError names a dangling reference
    for item in admin_keys.KEYS_OPENAPI_PATHS.values():
        for method, operation in item.items():
            if method != "parameters":
                assert "401" in operation["responses"]


# -- the CLI against the same server -------------------------------------------------------------


async def run_cli(api: KeysAdmin, *argv: str, token: str = ALICE) -> int:
    args = api.cli(*argv, token=token)
    result: int = await asyncio.to_thread(args.func, args)
    return result


async def test_cli_create_prints_the_secret_alone_on_stdout(
    api: KeysAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ("create", "--name", "team-a", "--models", "fraud-detector, churn", "--limit", "100/s")
    assert await run_cli(api, *argv, "--burst", "20", "--expires-in", "30d") == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert out == secret + "\n" and secret.startswith("gwk_")
    assert "ONLY THIS ONCE" in err and "created API key 'team-a'" in err and secret not in err
    assert "models: fraud-detector, churn; limit: 100/s burst 20; expires: " in err
    key = await api.store.get_key(hash_secret(secret))
    assert key is not None and key.models == ("fraud-detector", "churn") and key.created_by == "alice"

    assert await run_cli(api, "create", "--name", "team-a") == 1
    assert "add --replace" in capsys.readouterr().err
    assert await run_cli(api, "create", "--name", "team-a", "--replace", token=BOB) == 0
    out, err = capsys.readouterr()
    assert out.strip() != secret and "the old one no longer works" in err
    assert await api.store.get_key(hash_secret(secret)) is None

    assert await run_cli(api, "create", "--name", "bad name") == 1
    assert '"name" must be 1 to 64' in capsys.readouterr().err


async def test_cli_list_revoke_disable_enable(api: KeysAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli(api, "list") == 0
    assert "(no API keys)" in capsys.readouterr().out
    assert await run_cli(api, "create", "--name", "team-a", "--models", "m1,m2", "--limit", "600/m") == 0
    assert await run_cli(api, "create", "--name", "team-b") == 0
    secrets_shown = capsys.readouterr().out.split()
    assert await run_cli(api, "disable", "team-b") == 0
    assert "disabled API key 'team-b'" in capsys.readouterr().out
    assert await run_cli(api, "list") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "MODELS", "LIMIT", "MODEL_LIMITS", "EXPIRES", "DISABLED", "CREATED"]
    assert lines[1].split()[:6] == ["team-a", "m1,m2", "10/s", "-", "never", "no"]
    assert (
        lines[2].split()[:6] == ["team-b", "all", "default", "-", "never", "yes"] and "by alice" in lines[2]
    )
    assert not any(s in out for s in secrets_shown)
    assert await run_cli(api, "enable", "team-b") == 0
    assert "enabled API key 'team-b'" in capsys.readouterr().out
    assert await run_cli(api, "revoke", "team-a", token=BOB) == 0
    assert "revoked API key 'team-a'" in capsys.readouterr().out
    assert await run_cli(api, "revoke", "team-a") == 1
    assert "no API key named 'team-a'" in capsys.readouterr().err
    assert await run_cli(api, "list", "--json") == 0
    assert [k["name"] for k in json.loads(capsys.readouterr().out)["keys"]] == ["team-b"]
    assert await run_cli(api, "list", token="wrong") == 1
    assert "refused the token" in capsys.readouterr().err
    actions = [(e["who"], e["action"]) for e in api.audit()]
    assert actions[-2:] == [("alice", "keys.enable"), ("bob", "keys.revoke")]


async def test_cli_model_limits(api: KeysAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("create", "--name", "team-a", "--models", "fraud-detector,churn")
    limits = ("--model-limit", "fraud-detector=100/s:200", "--model-limit", "churn=600/m")
    assert await run_cli(api, *argv, *limits) == 0
    out, err = capsys.readouterr()
    assert "model limits: fraud-detector=100/s:200,churn=10/s:10; expires: never" in err
    key = await api.store.get_key(hash_secret(out.strip()))
    assert key is not None
    assert key.model_limits == {"fraud-detector": Limit(100.0, 200), "churn": Limit(10.0, 10)}
    assert await run_cli(api, "list") == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:4] == ["team-a", "fraud-detector,churn", "default", "fraud-detector=100/s:200,churn=10/s:10"]

    # What the list shows is what --model-limit takes.
    assert (
        await run_cli(api, "create", "--name", "team-a", "--replace", "--model-limit", "churn=10/s:10") == 0
    )
    capsys.readouterr()
    (key,) = await api.store.list_keys()
    assert key.model_limits == {"churn": Limit(10.0, 10)}

    # The admin API's refusal is shown as is; nothing changes.
    assert await run_cli(api, "create", "--name", "team-b", "--models", "m", "--model-limit", "x=1/s") == 1
    assert "names 'x', which the key may not call" in capsys.readouterr().err
    assert (
        await run_cli(api, "create", "--name", "team-b", "--model-limit", "x=1/s", "--model-limit", "x=2/s")
        == 1
    )
    assert "names the same model twice" in capsys.readouterr().err
    assert [k.name for k in await api.store.list_keys()] == ["team-a"]


@pytest.mark.parametrize("given", ["m", "=1/s", "m=", "m=1/s:", "m=1/s:x", "m=1/s:-1"])
def test_cli_model_limit_syntax(given: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="gateway")
    keys_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["keys", "create", "--name", "a", "--model-limit", given])
    assert "must be MODEL=RATE or MODEL=RATE:BURST" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("rate", "burst", "text"),
    [
        (100.0, None, "100/s"),
        (1 / 6, None, "10/m"),
        (2 / 3600, 5, "2/h burst 5"),
        (0.5, None, "30/m"),
        (None, None, "default"),
    ],
)
def test_format_limit(rate: float | None, burst: int | None, text: str) -> None:
    assert keys_cli.format_limit(rate, burst) == text
