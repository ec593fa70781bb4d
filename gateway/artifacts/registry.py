"""The version registry: each version id recorded once, with its archive digest, target, schema and
metadata, and each version's history (registered, deployed, served, rollouts and their outcomes).

It lives in the store, so every gateway process sees one registry. The store keeps records as JSON and
knows nothing of their fields; this module writes and reads them, and a record that does not read is
skipped with a warning, never an error. The decisions (`conflict`, `contradictions`, `served_span`) are
pure functions; the store calls are thin wrappers at the bottom.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.artifacts.manifest import Manifest
from gateway.artifacts.schema import Schema
from gateway.routing.config import ConfigIssue
from gateway.routing.table import RouteTable, Version
from gateway.store.base import Store
from gateway.typed_json import Fields, RecordError, WarnOnce

log = logging.getLogger("gateway.artifacts.registry")
_warned = WarnOnce()


@dataclass(frozen=True, slots=True)
class RegistryRecord:
    """A registered version: written once, never changed."""

    model: str
    version: str
    digest: str  # sha256:... of the archive's manifest
    triton_model: str
    triton_version: int
    schema: Schema
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""  # when the archive was built
    registered_at: float = 0.0
    registered_by: str = ""

    @property
    def target(self) -> str:
        return f"{self.triton_model}/{self.triton_version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "digest": self.digest,
            "triton_model": self.triton_model,
            "triton_version": self.triton_version,
            "schema": self.schema.to_json(),
            "metadata": dict(self.metadata),
            "created": self.created,
            "registered_at": self.registered_at,
            "registered_by": self.registered_by,
        }

    @classmethod
    def from_json(cls, data: object) -> RegistryRecord:
        f = Fields(data, "registry record")
        return cls(
            f.text("model"),
            f.text("version"),
            f.text("digest"),
            f.text("triton_model"),
            f.integer("triton_version"),
            Schema.read(f.child("schema")),
            f.json_object("metadata"),
            f.text("created"),
            f.number("registered_at"),
            f.text("registered_by"),
        )


def record_from_manifest(manifest: Manifest, digest: str, who: str = "", now: float = 0.0) -> RegistryRecord:
    return RegistryRecord(
        manifest.model,
        manifest.version,
        digest,
        manifest.triton.name,
        manifest.triton.version,
        manifest.schema,
        dict(manifest.metadata),
        manifest.created,
        now,
        who,
    )


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def conflict(existing: RegistryRecord, offered: RegistryRecord) -> str | None:
    """Why `offered` cannot be registered over `existing`; None when it is the same build."""
    if existing.digest == offered.digest:
        return None
    return (
        f"{existing.model} {existing.version} is already {existing.digest} (registered "
        f"{_when(existing.registered_at)} by {existing.registered_by or 'unknown'}), not {offered.digest}; "
        "a version id names one build for good: give the new build a new version id"
    )


def _issue(table: RouteTable, version: Version, field_name: str, message: str) -> ConfigIssue:
    line, column = version.positions.get(field_name) or version.positions.get("version") or (1, 1)
    return ConfigIssue(table.source or "routes.yaml", line, column, message)


def contradictions(
    table: RouteTable, registered: Mapping[str, Mapping[str, RegistryRecord]]
) -> list[ConfigIssue]:
    """Where the table says something of a registered version that its registration does not.

    Naming an archive binds a version's entry to the registry: the archive must be the registered one,
    and the Triton target the one that archive was deployed as (pointing the id at other weights is
    what the registry exists to stop). A version naming no archive, or not registered, contradicts
    nothing; the admin API shows which versions are registered.
    """
    issues = []
    for model in table.models.values():
        records = registered.get(model.name, {})
        for version in model.versions.values():
            record = records.get(version.id)
            if record is None or not version.archive:
                continue
            what = f"{model.name} {version.id}"
            if version.archive != record.digest:
                issues.append(
                    _issue(
                        table,
                        version,
                        "archive",
                        f"{what} names archive {version.archive}, but the registry has {what} as "
                        f"{record.digest} (registered {_when(record.registered_at)}); a version id names "
                        "one build: give the other build a new version id",
                    )
                )
            target = f"{version.triton_model}/{version.triton_version}"
            if target != record.target:
                issues.append(
                    _issue(
                        table,
                        version,
                        "target",
                        f"{what} is served from {target} here, but its registered archive "
                        f"({record.digest[:19]}...) is {record.target}; point target at {record.target}, "
                        "or give the other build a new version id",
                    )
                )
    return issues


def served_span(events: Sequence[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """(first served, last served) from a version's history."""
    spans = [e for e in events if e.get("kind") == "served"]
    if not spans:
        return None, None
    first = min(float(e.get("since", e.get("at", 0.0))) for e in spans)
    return first, max(float(e.get("at", 0.0)) for e in spans)


def summary(record: RegistryRecord | None, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the admin API and the metadata endpoint say about a version's registration."""
    first, last = served_span(events)
    return {
        "registered": record is not None,
        "digest": record.digest if record else None,
        "target": record.target if record else None,
        "registered_at": record.registered_at if record else None,
        "registered_by": record.registered_by if record else None,
        "first_served": first,
        "last_served": last,
        "rollouts": [e for e in events if e.get("kind") == "rollout"][-20:],
    }


def event(kind: str, now: float | None = None, /, **details: Any) -> dict[str, Any]:
    return {"kind": kind, "at": time.time() if now is None else now, **details}


def read_event(data: object) -> dict[str, Any] | None:
    try:
        f = Fields(data, "registry event")
        f.text("kind")
        f.number("at")
    except RecordError as exc:
        if _warned.first("event", str(exc)):
            log.warning("registry: skipping an unreadable history event: %s", exc)
        return None
    return f.data


# -- the store -------------------------------------------------------------------------------------


async def registered(store: Store, model: str) -> dict[str, RegistryRecord]:
    """The model's registered versions; unreadable records are skipped (and logged once)."""
    records = {}
    for version, data in (await store.get_versions(model)).items():
        try:
            records[version] = RegistryRecord.from_json(data)
        except RecordError as exc:
            if _warned.first((model, version), str(exc)):
                log.warning("registry: %s %s has an unreadable record, ignored: %s", model, version, exc)
    return records


async def register(store: Store, record: RegistryRecord) -> tuple[RegistryRecord, bool]:
    """(the registration now, whether this call made it); the first registration of an id wins."""
    existing = await store.register_version(record.model, record.version, record.to_json())
    if existing is None:
        return record, True
    return RegistryRecord.from_json(existing), False


async def history(store: Store, model: str, version: str) -> list[dict[str, Any]]:
    events = [read_event(e) for e in await store.get_version_events(model, version)]
    return [e for e in events if e is not None]


async def add_event(store: Store, model: str, version: str, entry: dict[str, Any]) -> None:
    # A "served" event extends the newest one while nothing else happened in between.
    await store.add_version_event(model, version, entry, coalesce=entry["kind"] == "served")
