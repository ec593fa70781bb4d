"""The decisions every inference request goes through, in order, each a function of its inputs.

    resolve_target -> require_key -> find_model -> admit (gateway.access) -> choose_version
        -> forward (gateway.pipeline.forward) -> record

A step decides and returns: the next step's input, or a `Refusal`. None of them does I/O or reaches
into another step's objects; `Pipeline` (flow.py) runs them in this order against one snapshot, and
any front door (HTTP, gRPC) drives the pipeline. Everything but `record` needs only the request's head.
"""

from __future__ import annotations

import itertools
import os

from gateway.access import keys
from gateway.access.admission import AdmissionDecision, Caller
from gateway.pipeline.errors import BEARER, Refusal
from gateway.pipeline.snapshot import ModelRoute, RoutingSnapshot, VersionRoute
from gateway.routing.decisions import Endpoint, Target, parse_path
from gateway.stats.counters import Choice, Outcome

PATH_CACHE_SIZE = 4096
MAX_REQUEST_ID = 200

_targets: dict[str, Target | None] = {}  # parsed paths; clients reuse a handful of them

# Generated request ids: a random per-process prefix and a counter, unique across processes and far
# cheaper than a random number per request. They identify requests; they are not secrets.
_ID_PREFIX = os.urandom(6).hex().encode()
_id_counter = itertools.count(1)


def request_id(given: bytes | None) -> bytes:
    """The caller's X-Request-Id when it is a sane token, else a new unique one."""
    if given is not None and 0 < len(given) <= MAX_REQUEST_ID and all(33 <= byte <= 126 for byte in given):
        return given
    return b"%s-%x" % (_ID_PREFIX, next(_id_counter))


def resolve_target(method: str, path: str) -> Target | Refusal:
    """Which endpoint a request names, and whether the method fits it (Starlette's match, as data)."""
    try:
        target = _targets[path]
    except KeyError:
        target = parse_path(path)
        if len(_targets) >= PATH_CACHE_SIZE:
            _targets.clear()  # endless distinct paths get no cache, nothing worse
        _targets[path] = target
    if target is None:
        return Refusal(404, f"no such endpoint: {path}")
    if target.endpoint is not Endpoint.INFER:
        if method not in ("GET", "HEAD"):
            return Refusal(405, f"{path} accepts GET, not {method}")
    elif method != "POST":
        return Refusal(405, f"inference takes POST, not {method}")
    return target


def require_key(snapshot: RoutingSnapshot, caller: Caller) -> Refusal | None:
    """401 when keys are required and none is presented.

    Before the model lookup, so that callers without a key cannot probe which models exist.
    """
    if snapshot.table.keys.required and not (caller.header(b"authorization") or caller.header(b"x-api-key")):
        return Refusal(401, keys.KEY_REQUIRED.message, BEARER)
    return None


def find_model(snapshot: RoutingSnapshot, target: Target) -> ModelRoute | Refusal:
    route = snapshot.models.get(target.model)
    if route is None:
        # Not the list of models that exist: a caller learns only about the models it names.
        return Refusal(404, f"unknown model {target.model!r}")
    return route


def admission_refusal(decision: AdmissionDecision) -> Refusal:
    """The refusal for a decision that is not an admission (status > 0)."""
    if decision.status == 401:
        return Refusal(401, decision.message, decision.headers + BEARER)
    return Refusal(decision.status, decision.message, decision.headers)


def choose_version(
    snapshot: RoutingSnapshot, route: ModelRoute, path_pin: str, caller: Caller
) -> tuple[VersionRoute, Choice] | Refusal:
    """Pin (path, then X-Model-Version; an id or an alias), else sticky cohort, else the split.

    Also says how the version was chosen: only the split's and the sticky hash's choices are a
    rollout's evidence, since a caller who pins can pick what the canary is measured on.
    """
    model = route.model
    pin = path_pin or (caller.header(b"x-model-version") or b"").decode("latin-1")
    if pin:
        version = model.resolve(pin)
        if version is None:
            versions = ", ".join(model.versions)
            return Refusal(404, f"model {model.name} has no version or alias {pin!r}; versions: {versions}")
        how = Choice.PINNED
    else:
        sticky = caller.header(route.sticky_header) if route.sticky_header is not None else None
        version = snapshot.router.choose(model, sticky)
        if version is None:
            message = f"no version of model {model.name} is taking traffic"
            return Refusal(503, f"{message} ({route.not_ready})" if route.not_ready else message)
        how = Choice.SPLIT if sticky is None else Choice.STICKY
    chosen = route.versions[version.id]
    if chosen.unready:
        return Refusal(503, f"version {version.id} of {model.name} is not ready: {chosen.unready}")
    return chosen, how


def shadow_of(snapshot: RoutingSnapshot, route: ModelRoute, chosen: VersionRoute) -> VersionRoute | None:
    """The version that gets a shadow copy of this request, if any."""
    if route.model.mirror is None:
        return None
    shadow = snapshot.router.mirror_to(route.model, chosen.version)
    return None if shadow is None else route.versions[shadow.id]


def record(route: VersionRoute, how: Choice, status: int, outcome: Outcome, seconds: float) -> None:
    """The last step: count the answer for the version that gave it, apart by how it was chosen.

    `seconds` is the backend's time, request sent to response received (forward.py).
    """
    route.counters.record(status, outcome, seconds, how)
