"""The pipeline's steps, in process: each decision from a snapshot and a request head, no sockets."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest

from gateway.access.admission import AdmissionDecision
from gateway.pipeline import steps
from gateway.pipeline.errors import Refusal
from gateway.pipeline.flow import Pipeline, Plan
from gateway.pipeline.snapshot import ModelRoute, RoutingSnapshot, VersionRoute
from gateway.routing.config import parse_table
from gateway.routing.decisions import Endpoint, Target
from gateway.routing.health import Health
from gateway.routing.table import RouteTable
from gateway.stats.counters import Choice

ROUTES = """
backends:
  a: {url: "http://127.0.0.1:9", timeout: 1s}
  b: {url: "http://127.0.0.1:10", timeout: 1s}
models:
  fraud:
    versions:
      "1.0": {backend: a, target: fraud/1}
      "2.0": {backend: b, target: fraud/2}
    aliases: {stable: "1.0", candidate: "2.0"}
    split: {"1.0": 75, "2.0": 25}
    mirror: {to: "2.0", percent: 50}
  sticky:
    versions:
      v1: {backend: a, target: s/1}
      v2: {backend: b, target: s/2}
    split: {v1: 50, v2: 50}
    sticky: header:x-user-id
keys: {required: %s}
"""


class Head:
    """A request head as any front door would present it."""

    def __init__(self, client: str = "10.0.0.1", **headers: str) -> None:
        self.client = client
        self._headers = {name.replace("_", "-").encode(): value.encode() for name, value in headers.items()}

    def header(self, name: bytes) -> bytes | None:
        return self._headers.get(name)


def table(keys_required: bool = False) -> RouteTable:
    return parse_table(ROUTES % ("true" if keys_required else "false"))


@pytest.fixture
def pipeline() -> Iterator[Pipeline]:
    loop = asyncio.new_event_loop()
    built = Pipeline(table(), loop)
    yield built
    built.close()
    loop.close()


def route_of(snapshot: RoutingSnapshot, model: str) -> ModelRoute:
    found = steps.find_model(snapshot, Target(Endpoint.INFER, model))
    assert isinstance(found, ModelRoute)
    return found


def chosen(result: tuple[VersionRoute, Choice] | Refusal) -> str:
    assert isinstance(result, tuple), result
    return result[0].version.id


# -- resolve_target ---------------------------------------------------------------------------------


def test_target_names_endpoint_model_and_pin() -> None:
    assert steps.resolve_target("POST", "/v2/models/fraud/versions/stable/infer") == Target(
        Endpoint.INFER, "fraud", "stable"
    )
    assert steps.resolve_target("GET", "/v2/health/ready") == Target(Endpoint.HEALTH_READY)


@pytest.mark.parametrize(
    ("method", "path", "status", "words"),
    [
        ("POST", "/v1/nothing", 404, "no such endpoint: /v1/nothing"),
        ("GET", "/v2/models/fraud/infer", 405, "inference takes POST, not GET"),
        ("PUT", "/v2/models/fraud/infer", 405, "inference takes POST, not PUT"),
        ("POST", "/v2/health/live", 405, "/v2/health/live accepts GET, not POST"),
    ],
)
def test_target_refusals(method: str, path: str, status: int, words: str) -> None:
    refusal = steps.resolve_target(method, path)
    assert refusal == Refusal(status, words)


def test_endless_distinct_paths_do_not_grow_the_cache() -> None:
    for i in range(steps.PATH_CACHE_SIZE + 10):
        steps.resolve_target("POST", f"/v2/models/m{i}/infer")
    assert len(steps._targets) <= steps.PATH_CACHE_SIZE


# -- require_key, find_model ------------------------------------------------------------------------


def test_missing_key_is_refused_before_the_model_is_looked_up(pipeline: Pipeline) -> None:
    pipeline.set_table(table(keys_required=True))
    refusal = steps.require_key(pipeline.snapshot, Head())
    assert isinstance(refusal, Refusal) and refusal.status == 401
    assert refusal.headers == [(b"www-authenticate", b"Bearer")]
    assert "fraud" not in refusal.message  # nothing about which models exist
    assert steps.require_key(pipeline.snapshot, Head(x_api_key="gwk_x")) is None
    assert steps.require_key(pipeline.snapshot, Head(authorization="Bearer gwk_x")) is None


def test_unknown_model_does_not_list_the_models_that_exist(pipeline: Pipeline) -> None:
    refusal = steps.find_model(pipeline.snapshot, Target(Endpoint.INFER, "nope"))
    assert refusal == Refusal(404, "unknown model 'nope'")


# -- choose_version ---------------------------------------------------------------------------------


def test_pins_by_path_header_id_and_alias(pipeline: Pipeline) -> None:
    snapshot = pipeline.snapshot
    fraud = route_of(snapshot, "fraud")
    assert chosen(steps.choose_version(snapshot, fraud, "2.0", Head())) == "2.0"
    assert chosen(steps.choose_version(snapshot, fraud, "stable", Head())) == "1.0"
    assert chosen(steps.choose_version(snapshot, fraud, "", Head(x_model_version="candidate"))) == "2.0"
    # The path wins over the header.
    assert chosen(steps.choose_version(snapshot, fraud, "1.0", Head(x_model_version="2.0"))) == "1.0"
    refusal = steps.choose_version(snapshot, fraud, "9.9", Head())
    assert refusal == Refusal(404, "model fraud has no version or alias '9.9'; versions: 1.0, 2.0")


def test_split_is_exact_over_a_cycle(pipeline: Pipeline) -> None:
    snapshot = pipeline.snapshot
    fraud = route_of(snapshot, "fraud")
    counts = Counter(chosen(steps.choose_version(snapshot, fraud, "", Head())) for _ in range(400))
    assert counts == {"1.0": 300, "2.0": 100}


def test_sticky_callers_keep_their_version(pipeline: Pipeline) -> None:
    snapshot = pipeline.snapshot
    route = route_of(snapshot, "sticky")
    assert route.sticky_header == b"x-user-id"
    assert b"x-user-id" in snapshot.captured_headers  # captured while the head is parsed
    for user in ("alice", "bob", "carol", "dave"):
        first = chosen(steps.choose_version(snapshot, route, "", Head(x_user_id=user)))
        again = {chosen(steps.choose_version(snapshot, route, "", Head(x_user_id=user))) for _ in range(20)}
        assert again == {first}


def test_unready_version_leaves_the_split_and_pins_get_503(pipeline: Pipeline) -> None:
    pipeline.set_routing(health={("fraud", "2.0"): Health(False, "backend b is down", 0.0)})
    snapshot = pipeline.snapshot
    fraud = route_of(snapshot, "fraud")
    picks = {chosen(steps.choose_version(snapshot, fraud, "", Head())) for _ in range(40)}
    assert picks == {"1.0"}
    refusal = steps.choose_version(snapshot, fraud, "2.0", Head())
    assert refusal == Refusal(503, "version 2.0 of fraud is not ready: backend b is down")


def test_no_version_taking_traffic_is_503_with_the_reasons(pipeline: Pipeline) -> None:
    down = Health(False, "cannot reach it", 0.0)
    pipeline.set_routing(health={("fraud", "1.0"): down, ("fraud", "2.0"): down})
    refusal = steps.choose_version(pipeline.snapshot, route_of(pipeline.snapshot, "fraud"), "", Head())
    assert isinstance(refusal, Refusal) and refusal.status == 503
    assert refusal.message == (
        "no version of model fraud is taking traffic "
        "(1.0 is not ready: cannot reach it; 2.0 is not ready: cannot reach it)"
    )


def test_not_checked_yet_keeps_its_weight(pipeline: Pipeline) -> None:
    pipeline.set_routing(health={("fraud", "1.0"): Health(True, "", 0.0)})  # 2.0 not checked yet
    assert dict(pipeline.snapshot.split_of("fraud")) == {"1.0": 75, "2.0": 25}


def test_override_weights_replace_the_split(pipeline: Pipeline) -> None:
    pipeline.set_routing(overrides={"fraud": (("1.0", 0), ("2.0", 100))})
    snapshot = pipeline.snapshot
    fraud = route_of(snapshot, "fraud")
    assert {chosen(steps.choose_version(snapshot, fraud, "", Head())) for _ in range(10)} == {"2.0"}


# -- shadow, admission refusals, request ids ----------------------------------------------------------


def test_mirror_copies_an_exact_share_and_never_to_the_answering_version(pipeline: Pipeline) -> None:
    snapshot = pipeline.snapshot
    fraud = route_of(snapshot, "fraud")
    stable = fraud.versions["1.0"]
    shadows = [steps.shadow_of(snapshot, fraud, stable) for _ in range(100)]
    assert sum(1 for s in shadows if s is not None) == 50
    assert {s.version.id for s in shadows if s is not None} == {"2.0"}
    assert steps.shadow_of(snapshot, fraud, fraud.versions["2.0"]) is None


def test_admission_refusals_keep_their_headers() -> None:
    limited = AdmissionDecision(429, "rate limited; retry after 1s", [(b"retry-after", b"1")])
    assert steps.admission_refusal(limited) == Refusal(429, limited.message, [(b"retry-after", b"1")])
    denied = steps.admission_refusal(AdmissionDecision(401, "the API key is not valid"))
    assert denied is not None and (b"www-authenticate", b"Bearer") in (denied.headers or [])


def test_request_ids_are_echoed_when_sane_and_generated_otherwise() -> None:
    assert steps.request_id(b"abc-123") == b"abc-123"
    generated = {steps.request_id(given) for given in (None, b"", b"has space", b"x" * 500, b"\x00")}
    assert len(generated) == 5  # each a new unique id
    assert all(b" " not in rid and 0 < len(rid) <= steps.MAX_REQUEST_ID for rid in generated)


# -- the snapshot ---------------------------------------------------------------------------------------


def test_a_change_builds_a_new_snapshot_and_leaves_the_old_one_whole(pipeline: Pipeline) -> None:
    before = pipeline.snapshot
    pipeline.set_table(
        parse_table(
            ROUTES.replace('      "2.0": {backend: b, target: fraud/2}\n', "")
            .replace(', candidate: "2.0"', "")
            .replace('split: {"1.0": 75, "2.0": 25}', 'split: {"1.0": 100}')
            .replace('    mirror: {to: "2.0", percent: 50}\n', "")
            % "false"
        )
    )
    after = pipeline.snapshot
    assert after is not before
    assert "2.0" not in after.models["fraud"].versions
    # A request that started on the old snapshot can still be routed to the removed version.
    old_fraud = route_of(before, "fraud")
    assert chosen(steps.choose_version(before, old_fraud, "2.0", Head())) == "2.0"
    assert old_fraud.versions["2.0"].path == b"/v2/models/fraud/versions/2/infer"


def test_plan_runs_every_head_step_and_uses_only_its_snapshot(pipeline: Pipeline) -> None:
    results: list[Plan | Refusal] = []
    crashes: list[BaseException] = []
    snapshot = pipeline.snapshot
    pipeline.set_table(table(keys_required=True))  # a reload after the request took its snapshot
    pipeline.plan(snapshot, Target(Endpoint.INFER, "fraud", "stable"), Head(), results.append, crashes.append)
    [plan] = results
    assert isinstance(plan, Plan) and plan.version.version.id == "1.0"
    assert not crashes
    pipeline.plan(pipeline.snapshot, Target(Endpoint.INFER, "fraud"), Head(), results.append, crashes.append)
    assert isinstance(results[-1], Refusal) and results[-1].status == 401
