"""Routing decisions: path parsing, weighted split over short windows, sticky cohorts."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import replace
from types import MappingProxyType

import pytest

from gateway.routing.decisions import Endpoint, Router, Target, parse_path, split_sequence, sticky_choice
from gateway.routing.table import Backend, Mirror, Model, RouteTable, Version


def make_table(split: tuple[tuple[str, int], ...], sticky: str | None = None) -> RouteTable:
    versions = {v: Version(v, "b", "m", str(i)) for i, (v, _) in enumerate(split, start=1)}
    model = Model("fraud-detector", MappingProxyType(versions), MappingProxyType({}), split, sticky)
    backend = Backend("b", "127.0.0.1", 1, 1.0)
    return RouteTable(MappingProxyType({"b": backend}), MappingProxyType({"fraud-detector": model}))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/models/fraud-detector/infer", Target(Endpoint.INFER, "fraud-detector")),
        ("/v2/models/fraud-detector/versions/2.1.3/infer", Target(Endpoint.INFER, "fraud-detector", "2.1.3")),
        ("/predict/fraud-detector", Target(Endpoint.INFER, "fraud-detector")),
        ("/predict/fraud-detector/stable", Target(Endpoint.INFER, "fraud-detector", "stable")),
        ("/predict/fraud-detector/", Target(Endpoint.INFER, "fraud-detector")),
        ("/v2/models/fraud-detector", Target(Endpoint.MODEL_METADATA, "fraud-detector")),
        ("/v2/models/m/versions/2026-11-05", Target(Endpoint.MODEL_METADATA, "m", "2026-11-05")),
        ("/v2/models/m/ready", Target(Endpoint.MODEL_READY, "m")),
        ("/v2/models/m/versions/abc123f/ready", Target(Endpoint.MODEL_READY, "m", "abc123f")),
        ("/v2/models/m/versions/3/config", Target(Endpoint.MODEL_CONFIG, "m", "3")),
        ("/v2/health/live", Target(Endpoint.HEALTH_LIVE)),
        ("/v2/health/ready", Target(Endpoint.HEALTH_READY)),
        ("/v2", Target(Endpoint.SERVER_METADATA)),
    ],
)
def test_paths_map_to_endpoints(path: str, expected: Target) -> None:
    assert parse_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1/models/m/infer",
        "/v2/models",
        "/v2/models/",
        "/v2/models/m/versions/",
        "/v2/models/m/explain",
        "/predict",
        "/predict/a/b/c",
        "/v2/health",
        "/v2/health/dead",
        "/v2/models/m/infer/extra",
    ],
)
def test_unknown_paths_are_refused(path: str) -> None:
    assert parse_path(path) is None


@pytest.mark.parametrize("weights", [(90, 10), (95, 5), (1, 99), (33, 33, 34), (50, 25, 25), (97, 2, 1)])
def test_split_matches_weights_over_every_window(weights: tuple[int, ...]) -> None:
    split = tuple((f"v{i}", w) for i, w in enumerate(weights))
    router = Router(make_table(split))
    model = router.table.models["fraud-detector"]
    picks = [router.choose(model, None).id for _ in range(2000)]  # type: ignore[union-attr]
    window = 200
    for start in range(0, len(picks) - window + 1, 7):
        counts = Counter(picks[start : start + window])
        for version, weight in split:
            share = 100 * counts[version] / window
            assert abs(share - weight) <= 1.0, (start, version, share, weight)


def test_zero_weight_version_gets_nothing_and_sequence_is_reduced() -> None:
    assert split_sequence((("a", 100), ("b", 0))) == ("a",)
    assert Counter(split_sequence((("a", 90), ("b", 10)))) == {"a": 9, "b": 1}
    assert split_sequence((("a", 0),)) == ()


def test_model_with_no_weight_gets_no_version() -> None:
    router = Router(make_table((("a", 100), ("b", 0))), weights={"fraud-detector": (("a", 0), ("b", 0))})
    assert router.choose(router.table.models["fraud-detector"], None) is None


def test_weight_override_replaces_the_files_split() -> None:
    table = make_table((("a", 90), ("b", 10)))
    router = Router(table, weights={"fraud-detector": (("a", 0), ("b", 100))})
    model = table.models["fraud-detector"]
    assert {router.choose(model, None).id for _ in range(50)} == {"b"}  # type: ignore[union-attr]


def test_sticky_callers_keep_their_version() -> None:
    table = make_table((("base", 50), ("canary", 50)), sticky="x-user-id")
    router = Router(table)
    model = table.models["fraud-detector"]
    first = {user: router.choose(model, user).id for user in (b"u%d" % i for i in range(500))}  # type: ignore[union-attr]
    for _ in range(3):
        for user, version in first.items():
            assert router.choose(model, user).id == version  # type: ignore[union-attr]
    shares = Counter(first.values())
    assert 200 < shares["canary"] < 300  # both cohorts are populated, roughly by weight


def test_sticky_shares_follow_weights() -> None:
    split = (("base", 95), ("canary", 5))
    counts = Counter(sticky_choice(split, b"user-%d" % i) for i in range(20000))
    assert abs(counts["canary"] / 20000 - 0.05) < 0.01


@pytest.mark.parametrize("new_canary", [10, 25, 50, 100])
def test_raising_canary_only_moves_callers_from_baseline_to_canary(new_canary: int) -> None:
    before = (("base", 95), ("canary", 5))
    after = (("base", 100 - new_canary), ("canary", new_canary))
    users = [b"user-%d" % i for i in range(10000)]
    moved_to_canary = 0
    for user in users:
        old, new = sticky_choice(before, user), sticky_choice(after, user)
        assert not (old == "canary" and new == "base"), user
        moved_to_canary += old == "base" and new == "canary"
    assert moved_to_canary > 0


def test_three_way_split_never_moves_callers_off_a_version_that_grew() -> None:
    before = (("a", 80), ("b", 10), ("c", 10))
    after = (("a", 70), ("b", 20), ("c", 10))
    for i in range(10000):
        old, new = sticky_choice(before, b"k%d" % i), sticky_choice(after, b"k%d" % i)
        # b grew: nobody leaves it; c is unchanged: its callers can only move to b, which grew.
        assert old != "b" or new == "b"
        assert old != "c" or new in ("b", "c")


def test_sticky_assignment_is_the_same_in_another_process() -> None:
    split = (("base", 90), ("canary", 10))
    users = [f"user-{i}" for i in range(200)]
    here = [sticky_choice(split, u.encode()) for u in users]
    code = (
        "from gateway.routing.decisions import sticky_choice\n"
        f"print(','.join(str(sticky_choice({split!r}, u.encode())) for u in {users!r}))"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert there.strip().split(",") == here


def test_mirror_share_is_exact_over_every_window() -> None:
    table = make_table((("base", 100), ("shadow", 0)))
    model = replace(table.models["fraud-detector"], mirror=Mirror("shadow", 10.0))
    table = replace(table, models=MappingProxyType({"fraud-detector": model}))
    router = Router(table)
    base = model.versions["base"]
    hits = [router.mirror_to(model, base) is not None for _ in range(1000)]
    for start in range(0, 900, 13):
        assert sum(hits[start : start + 100]) == 10
    assert router.mirror_to(model, model.versions["shadow"]) is None  # never a copy of its own request


def test_rebuilding_the_router_for_an_unrelated_reason_keeps_the_exact_shares() -> None:
    # A health flip, an override for another model or a reload builds a new Router; the shares of a
    # model whose split and mirror did not change must stay exact across it, even if it comes often.
    table = make_table((("base", 90), ("canary", 10)))
    model = replace(table.models["fraud-detector"], mirror=Mirror("canary", 25.0))
    table = replace(table, models=MappingProxyType({"fraud-detector": model}))
    router = Router(table)
    picks, copies = [], 0
    for i in range(400):
        if i % 3 == 0:
            router = Router(table, carried=router)
        version = router.choose(model, None)
        assert version is not None
        picks.append(version.id)
        copies += router.mirror_to(model, model.versions["base"]) is not None
    assert Counter(picks) == {"base": 360, "canary": 40}
    assert copies == 100  # 25% of 400, exactly


def test_a_changed_split_starts_its_cycle_afresh() -> None:
    table = make_table((("base", 90), ("canary", 10)))
    model = table.models["fraud-detector"]
    router = Router(table)
    for _ in range(7):
        router.choose(model, None)
    moved = Router(table, weights={"fraud-detector": (("base", 50), ("canary", 50))}, carried=router)
    picks = Counter(moved.choose(model, None).id for _ in range(10))  # type: ignore[union-attr]
    assert picks == {"base": 5, "canary": 5}
