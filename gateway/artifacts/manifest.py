"""MANIFEST.json: what an archive holds, written once at creation and checked on every read.

The manifest is written canonically (sorted keys, two-space indent, UTF-8, one final newline) and the
archive's digest is the sha256 of those bytes. Since it lists the sha256 of every other file, the digest
names the whole content: the same files give the same digest whether the archive is a zip, a gzipped tar
or a directory. docs/archives.md documents every field.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.artifacts.schema import Schema
from gateway.routing import units
from gateway.typed_json import Fields, RecordError, parse_json

FORMAT = "model-gateway-archive"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
MODEL_DIR = "model"  # config.pbtxt, files next to it, and the version folder: what Triton loads
EXTRA_DIR = "extra"  # for people and tools (requirements.txt, a sample request); never sent to Triton
SAMPLE_REQUEST = f"{EXTRA_DIR}/sample_request.json"
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str  # inside the archive, "/"-separated
    size: int
    sha256: str  # hex

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def read(cls, f: Fields) -> FileEntry:
        entry = cls(f.text("path"), f.integer("size"), f.text("sha256"))
        if not _HEX.fullmatch(entry.sha256):
            raise RecordError(f"{f.where}.sha256: expected 64 lower-case hex digits")
        if not safe_path(entry.path):
            raise RecordError(f"{f.where}.path: {entry.path!r} is not a safe relative path")
        return entry


@dataclass(frozen=True, slots=True)
class TritonModel:
    """Where the version lives in Triton: its model name and numeric version, and how it is served."""

    name: str
    version: int
    platform: str = ""  # e.g. onnxruntime_onnx, pytorch_libtorch; "" when a backend is named
    backend: str = ""  # e.g. python, onnxruntime
    max_batch_size: int = 0

    @property
    def target(self) -> str:
        return f"{self.name}/{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "platform": self.platform,
            "backend": self.backend,
            "max_batch_size": self.max_batch_size,
        }

    @classmethod
    def read(cls, f: Fields) -> TritonModel:
        return cls(
            f.text("name"),
            f.integer("version"),
            f.text("platform"),
            f.text("backend"),
            f.integer("max_batch_size"),
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    model: str  # the public model name, as in routes.yaml
    version: str  # the public version id
    triton: TritonModel
    schema: Schema
    files: tuple[FileEntry, ...]  # every file of the archive but the manifest, sorted by path
    created: str  # ISO 8601, UTC
    creator: str  # the tool that wrote the archive
    sample_request: str | None = None  # path of a KServe v2 JSON request, used to warm up on deploy
    metadata: Mapping[str, Any] = field(default_factory=dict)  # lineage, metrics, author, ...
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "model": self.model,
            "version": self.version,
            "created": self.created,
            "creator": self.creator,
            "triton": self.triton.to_json(),
            "schema": self.schema.to_json(),
            "files": [entry.to_json() for entry in self.files],
            "sample_request": self.sample_request,
            "metadata": dict(self.metadata),
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        """Raises RecordError naming the first field that is missing, of the wrong type or not allowed."""
        f = Fields(data, "MANIFEST.json")
        if f.text("format") != FORMAT:
            raise RecordError(f"MANIFEST.json.format: expected {FORMAT!r}, got {f.data['format']!r}")
        version = f.integer("format_version")
        if version != FORMAT_VERSION:
            raise RecordError(
                f"MANIFEST.json.format_version: this gateway reads version {FORMAT_VERSION}, "
                f"the archive is version {version}; use a gateway release that reads it"
            )
        manifest = cls(
            model=f.text("model"),
            version=f.text("version"),
            triton=TritonModel.read(f.child("triton")),
            schema=Schema.read(f.child("schema")),
            files=tuple(FileEntry.read(entry) for entry in f.entries("files")),
            created=f.text("created"),
            creator=f.text("creator"),
            sample_request=f.optional_text("sample_request"),
            metadata=f.json_object("metadata"),
            format_version=version,
        )
        for value, kind in ((manifest.model, "model"), (manifest.version, "version")):
            try:
                units.url_name(value, kind)
            except ValueError as exc:
                raise RecordError(f"MANIFEST.json.{kind}: {exc}") from None
        paths = [entry.path for entry in manifest.files]
        if paths != sorted(set(paths)):
            raise RecordError("MANIFEST.json.files: paths must be sorted and listed once each")
        if manifest.sample_request is not None and manifest.sample_request not in paths:
            raise RecordError(f"MANIFEST.json.sample_request: {manifest.sample_request} is not in files")
        return manifest


def canonical_json(data: Any) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def digest_of(manifest_bytes: bytes) -> str:
    """The archive's digest: names the version's content, whatever the archive's format."""
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def read_manifest(raw: bytes) -> Manifest:
    return Manifest.from_json(parse_json(raw))


def safe_path(path: str) -> bool:
    """A relative path inside the archive: no absolute path, no `..`, no empty or `.` segment."""
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def created_text(when: float) -> str:
    moment = datetime.datetime.fromtimestamp(int(when), tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_created(text: str) -> str:
    """--created as ISO 8601 (a date, or a time with zone) or Unix seconds, normalized to UTC."""
    text = text.strip()
    if re.fullmatch(r"[0-9]+", text):
        return created_text(float(text))
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--created must be ISO 8601 (2026-01-15T09:30:00Z) or Unix seconds, not {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return created_text(moment.timestamp())


def _value(text: str) -> Any:
    """A --metadata value: JSON when it reads as JSON (0.931, true, [1, 2]), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _merge(into: dict[str, Any], more: Mapping[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def build_metadata(
    documents: Iterable[Mapping[str, Any]],
    pairs: Iterable[str],
    *,
    git_commit: str | None = None,
    training_data: str | None = None,
    author: str | None = None,
) -> dict[str, Any]:
    """The manifest's metadata: files first, then key=value pairs (dots nest: metrics.auc=0.93), then
    the named options, each later one winning over what it repeats."""
    metadata: dict[str, Any] = {}
    for document in documents:
        _merge(metadata, document)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--metadata wants KEY=VALUE (like metrics.auc=0.931), not {pair!r}")
        node = metadata
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            child = node.get(parent)
            if not isinstance(child, dict):
                child = node[parent] = {}
            node = child
        node[leaf] = _value(text)
    lineage = {k: v for k, v in (("git_commit", git_commit), ("training_data", training_data)) if v}
    if lineage:
        _merge(metadata, {"lineage": lineage})
    if author:
        metadata["author"] = author
    return metadata
