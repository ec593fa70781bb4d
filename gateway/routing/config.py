"""Parse and validate routes.yaml into an immutable `RouteTable`.

Validation runs to the end and reports every problem with its file, line and column, because a platform
engineer fixing a broken file should see all of it at once. Scalars are read as the raw text written in the
file (see `gateway.routing.yaml_nodes`), so version ids like `2.2` or `2026-11-05` stay exactly as written.
`${VAR}` and `${VAR:-default}` in values are replaced from the environment before anything is checked.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from yaml.nodes import MappingNode, Node, SequenceNode

from gateway.routing import units
from gateway.routing.table import (
    Backend,
    KeysPolicy,
    Limit,
    Mirror,
    Model,
    Rollout,
    RouteTable,
    ServerSettings,
    StoreConfig,
    Version,
    default_burst,
)
from gateway.routing.yaml_nodes import (
    ConfigError,
    ConfigIssue,
    Entry,
    Fields,
    Problems,
    checked,
    compose,
    describe,
    fields,
    is_null,
    plain,
    scalar,
    unknown_keys,
)

__all__ = ["ConfigError", "ConfigIssue", "load_table", "parse_table"]

T = TypeVar("T")

TOP_KEYS = ("backends", "models", "keys", "store", "server")
BACKEND_KEYS = (
    "url",
    "timeout",
    "connect_timeout",
    "max_connections",
    "queue_timeout",
    "max_queue",
    "grpc_url",
)
MODEL_KEYS = ("versions", "aliases", "split", "sticky", "mirror", "rollout", "limit")
VERSION_KEYS = ("backend", "target", "metadata", "archive", "allow_schema_change")
MIRROR_KEYS = ("to", "percent")
ROLLOUT_KEYS = (
    "baseline",
    "canary",
    "steps",
    "max_error_rate_increase",
    "max_latency_increase",
    "false_rollback_rate",
    "false_promotion_rate",
    "max_error_odds_ratio",
    "min_step_duration",
    "min_step_requests",
    "max_step_duration",
    "on_max_step_duration",
)
LIMIT_KEYS = ("rate", "burst")
KEYS_KEYS = ("required", "default_limit")
STORE_KEYS = ("url", "on_error", "timeout")
# How each optional setting is parsed; its default is its field default in the table's dataclass.
BACKEND_SETTINGS: Mapping[str, Callable[[str], Any]] = {
    "timeout": units.duration,
    "connect_timeout": units.duration,
    "max_connections": units.at_least_one,
    "queue_timeout": units.duration,
    "max_queue": units.at_least_one,
}
ROLLOUT_SETTINGS: Mapping[str, Callable[[str], Any]] = {
    "max_error_rate_increase": units.error_rate,
    "max_latency_increase": units.latency_margin,
    "false_rollback_rate": units.probability,
    "false_promotion_rate": units.probability,
    "max_error_odds_ratio": units.odds_ratio,
    "min_step_duration": units.duration,
    "min_step_requests": units.at_least_one,
    "max_step_duration": units.duration,
    "on_max_step_duration": units.on_max_step_duration,
}
STORE_SETTINGS: Mapping[str, Callable[[str], Any]] = {
    "url": units.store_url,
    "on_error": units.on_error,
    "timeout": units.duration,
}
SERVER_SETTINGS: Mapping[str, Callable[[str], Any]] = {
    "max_body_size": units.size,
    "max_header_size": units.size,
    "max_headers": units.at_least_one,
    "header_timeout": units.duration,
    "body_timeout": units.duration,
    "keepalive_timeout": units.duration,
    "write_timeout": units.duration,
    "max_buffered_bytes": units.size,
    "max_connections": units.at_least_one,
}
SERVER_KEYS = tuple(SERVER_SETTINGS)


def parse_table(text: str, source: str = "<string>", *, env: Mapping[str, str] | None = None) -> RouteTable:
    """The table described by `text`, or ConfigError listing every problem; `env` defaults to os.environ."""
    revision = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return _table(text, source, revision, os.environ if env is None else env)


def load_table(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> RouteTable:
    """The table in the file at `path`; its revision is the sha256 of the file's bytes."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(source, 1, 1, f"cannot read the file: {exc.strerror or exc}")]
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start].decode("utf-8", errors="replace")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        message = "the file is not UTF-8 text (an invalid byte here)"
        raise ConfigError([ConfigIssue(source, line, column, message)]) from None
    return _table(text, source, hashlib.sha256(raw).hexdigest(), os.environ if env is None else env)


@dataclass(frozen=True, slots=True)
class _Reader:
    """What every check needs: where to report, and the environment for ${VAR} references."""

    problems: Problems
    env: Mapping[str, str]

    def report(self, node: Node, message: str) -> None:
        self.problems.add(node, message)

    def fields(self, node: Node, what: str, known: tuple[str, ...]) -> Fields | None:
        entries = fields(node, self.problems, what)
        if entries is not None:
            unknown_keys(entries, known, self.problems, what)
        return entries

    def text(self, node: Node, what: str) -> str | None:
        return scalar(node, self.problems, self.env, what)

    def value(self, node: Node, what: str, parse: Callable[[str], T]) -> T | None:
        return checked(node, self.problems, self.env, what, parse)

    def optional(
        self, entries: Fields, key: str, what: str, parse: Callable[[str], T], default: T
    ) -> T | None:
        """The parsed value of an optional setting; an empty value (`key:`) also means the default."""
        entry = entries.get(key)
        if entry is None or is_null(entry.value):
            return default
        return self.value(entry.value, what, parse)

    def settings(
        self, entries: Fields, owner: str, parsers: Mapping[str, Callable[[str], Any]], unset: object
    ) -> dict[str, Any] | None:
        """Optional settings by name, each parsed by its parser, else the field default it has in `unset`
        (an instance of the table's dataclass: defaults live there alone). None if any was wrong; every
        one is checked, so all problems are reported."""
        values = {
            key: self.optional(entries, key, f"{key} of {owner}", parse, getattr(unset, key))
            for key, parse in parsers.items()
        }
        return None if any(value is None for value in values.values()) else values

    def name(self, node: Node, text: str, kind: str) -> bool:
        try:
            units.url_name(text, kind)
        except ValueError as exc:
            self.report(node, str(exc))
            return False
        return True


def _table(text: str, source: str, revision: str, env: Mapping[str, str]) -> RouteTable:
    root = compose(text, source)
    if root is None or is_null(root):
        raise ConfigError(
            [ConfigIssue(source, 1, 1, "the file is empty; it needs at least backends: and models:")]
        )
    r = _Reader(Problems(source), env)
    top = r.fields(root, "the top level of the file", TOP_KEYS)
    if top is None:
        raise ConfigError(r.problems.issues())
    backends, backend_names = _backends(r, root, top.get("backends"))
    models = _models(r, root, top.get("models"), backend_names)
    keys = _keys(r, top.get("keys"))
    store = _store(r, top.get("store"))
    server = _server(r, top.get("server"))
    # Every check that fails has reported; a missing part without a report would be a bug here.
    if r.problems:
        raise ConfigError(r.problems.issues())
    assert keys is not None and store is not None and server is not None
    return RouteTable(
        backends=MappingProxyType(backends),
        models=MappingProxyType(models),
        keys=keys,
        store=store,
        server=server,
        revision=revision,
        source=source,
    )


def _section(r: _Reader, root: Node, entry: Entry | None, name: str, example: str) -> Fields:
    """The entries of a required, non-empty top-level section (backends, models)."""
    if entry is None:
        r.report(root, f"{name}: is missing; add it with at least one entry, like {example}")
        return {}
    entries = {} if is_null(entry.value) else fields(entry.value, r.problems, name)
    if entries is not None and not entries:
        r.report(entry.key_node, f"{name} is empty; add at least one entry, like {example}")
    return entries or {}


def _backends(r: _Reader, root: Node, entry: Entry | None) -> tuple[dict[str, Backend], tuple[str, ...]]:
    entries = _section(r, root, entry, "backends", "triton-a: {url: http://127.0.0.1:8000}")
    backends: dict[str, Backend] = {}
    for name, item in entries.items():
        if r.name(item.key_node, name, "backend"):
            backend = _backend(r, name, item)
            if backend is not None:
                backends[name] = backend
    # Every name written counts as defined, so a backend with a bad url is not reported again at each use.
    return backends, tuple(entries)


def _backend(r: _Reader, name: str, item: Entry) -> Backend | None:
    what = f"backend {name}"
    settings = r.fields(item.value, what, BACKEND_KEYS)
    if settings is None:
        return None
    url = settings.get("url")
    if url is None:
        r.report(item.key_node, f"{what} has no url; add url: http://HOST:PORT")
        return None
    address = r.value(url.value, f"url of {what}", units.backend_url)
    grpc_url = settings.get("grpc_url")
    grpc: tuple[str, int] | None = ("", 0)
    if grpc_url is not None and not is_null(grpc_url.value):
        grpc = r.value(grpc_url.value, f"grpc_url of {what}", units.grpc_url)
    values = r.settings(settings, what, BACKEND_SETTINGS, Backend("", "", 0))
    if address is None or grpc is None or values is None:
        return None
    host, port = address
    return Backend(name, host, port, **values, grpc_host=grpc[0], grpc_port=grpc[1])


def _models(r: _Reader, root: Node, entry: Entry | None, backends: tuple[str, ...]) -> dict[str, Model]:
    entries = _section(r, root, entry, "models", "fraud-detector: {versions: {...}}")
    models: dict[str, Model] = {}
    for name, item in entries.items():
        if r.name(item.key_node, name, "model"):
            model = _model(r, name, item, backends)
            if model is not None:
                models[name] = model
    return models


@dataclass(frozen=True, slots=True)
class _Names:
    """The version ids and aliases of one model, for resolving what split, mirror and rollout name."""

    model: str
    versions: tuple[str, ...]  # every id written, valid or not
    aliases: Mapping[str, str]  # valid alias -> version id
    broken_aliases: frozenset[str]  # aliases already reported as wrong

    def resolve(self, r: _Reader, node: Node, text: str, what: str) -> str | None:
        """The version id that `text` names; None if it names nothing (reported) or a broken alias."""
        if text in self.versions:
            return text
        if text in self.aliases:
            return self.aliases[text]
        if text not in self.broken_aliases:
            r.report(
                node, f"{what} names {text}, which is neither a version nor an alias of {self.listing()}"
            )
        return None

    def reference(self, r: _Reader, node: Node, setting: str, what: str | None = None) -> str | None:
        """The version id named by a setting's value; `what` names the setting where `setting` reads badly."""
        text = r.text(node, setting)
        return None if text is None else self.resolve(r, node, text, what or setting)

    def listing(self) -> str:
        broken = sorted(self.broken_aliases.difference(self.versions))
        aliases = ", ".join([*self.aliases, *broken]) or "none"
        return f"{self.model} (versions: {', '.join(self.versions)}; aliases: {aliases})"


def _model(r: _Reader, name: str, item: Entry, backends: tuple[str, ...]) -> Model | None:
    what = f"model {name}"
    settings = r.fields(item.value, what, MODEL_KEYS)
    if settings is None:
        return None
    listed = settings.get("versions")
    if listed is None or is_null(listed.value):
        r.report(item.key_node, f"{what} has no versions; add versions: with at least one version")
        return None
    entries = fields(listed.value, r.problems, f"versions of {name}")
    if entries is None:
        return None
    if not entries:
        r.report(listed.key_node, f"versions of {name} is empty; add at least one version")
        return None
    versions: dict[str, Version] = {}
    for version_id, entry in entries.items():
        if r.name(entry.key_node, version_id, "version"):
            version = _version(r, name, version_id, entry, backends)
            if version is not None:
                versions[version_id] = version
    names = _aliases(r, name, tuple(entries), settings.get("aliases"))
    split = _split(r, item, settings.get("split"), names)
    sticky = _present(settings, "sticky")
    header = None if sticky is None else r.value(sticky.value, f"sticky for {name}", units.sticky_header)
    mirror = _present(settings, "mirror")
    rollout = _present(settings, "rollout")
    limit = _present(settings, "limit")
    return Model(
        name=name,
        versions=MappingProxyType(versions),
        aliases=MappingProxyType(dict(names.aliases)),
        split=split or (),
        sticky_header=header,
        mirror=None if mirror is None else _mirror(r, mirror, names),
        rollout=None if rollout is None else _rollout(r, rollout, names),
        limit=None if limit is None else _limit(r, limit, f"the limit for {name}"),
    )


def _present(entries: Fields, key: str) -> Entry | None:
    """An optional section, or None when it is absent or left empty."""
    entry = entries.get(key)
    return None if entry is None or is_null(entry.value) else entry


def _version(
    r: _Reader, model: str, version_id: str, item: Entry, backends: tuple[str, ...]
) -> Version | None:
    what = f"version {version_id} of {model}"
    settings = r.fields(item.value, what, VERSION_KEYS)
    if settings is None:
        return None
    defined = ", ".join(backends) or "none"
    backend_entry = settings.get("backend")
    backend = None
    if backend_entry is None:
        r.report(item.key_node, f"{what} has no backend; add backend: with one of the backends ({defined})")
    else:
        backend = r.text(backend_entry.value, f"backend of {what}")
        if backend is not None and backend not in backends:
            r.report(
                backend_entry.value,
                f"{what} uses backend {backend}, which is not defined under backends (defined: {defined})",
            )
            backend = None
    target_entry = settings.get("target")
    target = None
    if target_entry is None:
        r.report(
            item.key_node, f"{what} has no target; add target: TRITON_MODEL/VERSION, like fraud_detector/3"
        )
    else:
        target = r.value(target_entry.value, f"target of {what}", units.target)
    metadata: Mapping[str, Any] | None = MappingProxyType({})
    metadata_entry = _present(settings, "metadata")
    if metadata_entry is not None:
        metadata = _metadata(r, metadata_entry.value, f"metadata of {what}")
    archive = r.optional(settings, "archive", f"archive of {what}", units.archive_digest, "")
    allow = r.optional(
        settings, "allow_schema_change", f"allow_schema_change of {what}", units.boolean, False
    )
    if backend is None or target is None or metadata is None or archive is None or allow is None:
        return None
    positions = {"version": _position(item.key_node)}
    for key in ("archive", "target"):
        if key in settings:
            positions[key] = _position(settings[key].value)
    return Version(
        version_id, backend, target[0], target[1], metadata, archive, allow, MappingProxyType(positions)
    )


def _position(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _metadata(r: _Reader, node: Node, what: str) -> Mapping[str, Any] | None:
    if not isinstance(node, MappingNode):
        r.report(node, f"{what} must be a mapping of key: value, not {describe(node)}")
        return None
    value = plain(node, r.problems, r.env, what)
    return None if value is None else MappingProxyType(value)


def _aliases(r: _Reader, model: str, versions: tuple[str, ...], entry: Entry | None) -> _Names:
    valid: dict[str, str] = {}
    broken: set[str] = set()
    entries = (
        {}
        if entry is None or is_null(entry.value)
        else fields(entry.value, r.problems, f"aliases of {model}")
    )
    for alias, item in (entries or {}).items():
        what = f"alias {alias} of {model}"
        ok = r.name(item.key_node, alias, "alias")
        if alias in versions:
            r.report(
                item.key_node,
                f"{what} has the same name as a version; a request for {alias} would be ambiguous",
            )
            ok = False
        target = r.text(item.value, what)
        if target is not None and target not in versions:
            kind = (
                "another alias; an alias must name a version"
                if target in (entries or {})
                else "not a version"
            )
            r.report(
                item.value, f"{what} points to {target}, which is {kind} (versions: {', '.join(versions)})"
            )
            target = None
        if ok and target is not None:
            valid[alias] = target
        else:
            broken.add(alias)
    return _Names(model, versions, valid, frozenset(broken))


def _split(
    r: _Reader, model_item: Entry, entry: Entry | None, names: _Names
) -> tuple[tuple[str, int], ...] | None:
    model = names.model
    if entry is None or is_null(entry.value):
        if len(names.versions) == 1:
            return ((names.versions[0], 100),)
        r.report(
            model_item.key_node,
            f"{model} has {len(names.versions)} versions but no split; "
            "add split: to say which versions get requests that name no version",
        )
        return None
    what = f"split for {model}"
    entries = fields(entry.value, r.problems, what)
    if entries is None:
        return None
    weights: list[tuple[str, int]] = []
    written: dict[str, str] = {}  # version id -> the name the split used for it
    complete = True
    for key, item in entries.items():
        version = names.resolve(r, item.key_node, key, what)
        weight = r.value(item.value, f"weight of {key} in {what}", units.weight)
        if version is None or weight is None:
            complete = False
        elif version in written:
            first = written[version]
            how = f"as {first} and {key}" if first != key else "twice"
            r.report(item.key_node, f"{what} names version {version} {how}; give each version one weight")
            complete = False
        else:
            written[version] = key
            weights.append((version, weight))
    total = sum(weight for _, weight in weights)
    if complete and total != 100:
        r.report(entry.key_node, f"{what} adds up to {total}, not 100")
        return None
    return tuple(weights) if complete else None


def _mirror(r: _Reader, entry: Entry, names: _Names) -> Mirror | None:
    what = f"mirror for {names.model}"
    settings = r.fields(entry.value, what, MIRROR_KEYS)
    if settings is None:
        return None
    to = _required(r, settings, entry, "to", what, "the version that receives the copies")
    percent = _required(
        r, settings, entry, "percent", what, "the share of requests to copy, like percent: 10"
    )
    version = None if to is None else names.reference(r, to.value, f"to of {what}", what)
    share = None if percent is None else r.value(percent.value, f"percent of {what}", units.percent)
    return None if version is None or share is None else Mirror(version, share)


def _required(r: _Reader, entries: Fields, owner: Entry, key: str, what: str, meaning: str) -> Entry | None:
    entry = entries.get(key)
    if entry is None:
        r.report(owner.key_node, f"{what} has no {key}; add {key}: with {meaning}")
    return entry


def _rollout(r: _Reader, entry: Entry, names: _Names) -> Rollout | None:
    what = f"rollout for {names.model}"
    settings = r.fields(entry.value, what, ROLLOUT_KEYS)
    if settings is None:
        return None
    baseline_entry = _required(r, settings, entry, "baseline", what, "the version that serves now")
    canary_entry = _required(r, settings, entry, "canary", what, "the version being rolled out")
    baseline = (
        None if baseline_entry is None else names.reference(r, baseline_entry.value, f"baseline of {what}")
    )
    canary = None if canary_entry is None else names.reference(r, canary_entry.value, f"canary of {what}")
    if canary_entry is not None and canary is not None and canary == baseline:
        r.report(
            canary_entry.value, f"{what} uses version {canary} as both baseline and canary; they must differ"
        )
    unset = Rollout("", "")  # only its defaults are used
    steps_entry = _present(settings, "steps")
    steps = unset.steps if steps_entry is None else _steps(r, steps_entry.value, f"steps of {what}")
    values = r.settings(settings, what, ROLLOUT_SETTINGS, unset)
    if baseline is None or canary is None or steps is None or values is None:
        return None
    rollout = Rollout(baseline, canary, steps, **values)
    if rollout.max_step_duration < rollout.min_step_duration:
        place = settings.get("max_step_duration") or settings.get("min_step_duration") or entry
        r.report(
            place.value,
            f"max_step_duration of {what} ({rollout.max_step_duration:g} s) is shorter than its "
            f"min_step_duration ({rollout.min_step_duration:g} s): no step could ever be decided",
        )
        return None
    return rollout


def _steps(r: _Reader, node: Node, what: str) -> tuple[int, ...] | None:
    if not isinstance(node, SequenceNode) or not node.value:
        r.report(
            node, f"{what} must be a list of traffic percentages like [5, 25, 50, 100], not {describe(node)}"
        )
        return None
    steps: list[int] = []
    for item in node.value:
        step = r.value(item, what, units.step)
        if step is None:
            return None
        if steps and step <= steps[-1]:
            r.report(item, f"{what} must increase step by step, but {step} comes after {steps[-1]}")
            return None
        steps.append(step)
    if steps[0] >= 100:
        # Promotion is decided on the evidence of a step where the baseline still serves.
        r.report(node, f"{what} needs a step below 100, like [5, 25, 50, 100]: at 100% nothing is compared")
        return None
    return tuple(steps)


def _limit(r: _Reader, entry: Entry, what: str) -> Limit | None:
    settings = r.fields(entry.value, what, LIMIT_KEYS)
    if settings is None:
        return None
    rate_entry = _required(
        r, settings, entry, "rate", what, "requests per second, minute or hour, like 1000/s"
    )
    rate = None if rate_entry is None else r.value(rate_entry.value, f"rate in {what}", units.rate)
    fallback = 1 if rate is None else default_burst(rate)  # 1: only while rate is wrong (reported)
    burst = r.optional(settings, "burst", f"burst in {what}", units.at_least_one, fallback)
    return None if rate is None or burst is None else Limit(rate, burst)


def _keys(r: _Reader, entry: Entry | None) -> KeysPolicy | None:
    if entry is None or is_null(entry.value):
        return KeysPolicy()
    settings = r.fields(entry.value, "keys", KEYS_KEYS)
    if settings is None:
        return None
    required = r.optional(settings, "required", "required in keys", units.boolean, KeysPolicy().required)
    limit_entry = _present(settings, "default_limit")
    limit = None if limit_entry is None else _limit(r, limit_entry, "keys: default_limit")
    if required is None or (limit_entry is not None and limit is None):
        return None
    return KeysPolicy(required, limit)


def _store(r: _Reader, entry: Entry | None) -> StoreConfig | None:
    if entry is None or is_null(entry.value):
        return StoreConfig()
    settings = r.fields(entry.value, "store", STORE_KEYS)
    if settings is None:
        return None
    values = r.settings(settings, "store", STORE_SETTINGS, StoreConfig())
    return None if values is None else StoreConfig(**values)


def _server(r: _Reader, entry: Entry | None) -> ServerSettings | None:
    if entry is None or is_null(entry.value):
        return ServerSettings()
    settings = r.fields(entry.value, "server", SERVER_KEYS)
    if settings is None:
        return None
    values = r.settings(settings, "server", SERVER_SETTINGS, ServerSettings())
    return None if values is None else ServerSettings(**values)
