"""`gateway archive create`: one Triton model version and its extra files into a reproducible archive.

Reproducible: entries sorted, every timestamp fixed (zip entries at 1980-01-01, tar and gzip at 0), the
same permissions and owners for every file, and the manifest's creation time an input (--created,
SOURCE_DATE_EPOCH, or the newest modification time of the inputs). The same inputs therefore give the
same bytes, and the digest names the content.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.artifacts import triton_config
from gateway.artifacts.archive import CHUNK, FORMATS, ArchiveError
from gateway.artifacts.manifest import (
    EXTRA_DIR,
    MANIFEST,
    MODEL_DIR,
    SAMPLE_REQUEST,
    FileEntry,
    Manifest,
    TritonModel,
    created_text,
    digest_of,
)
from gateway.artifacts.schema import Schema, from_model_config
from gateway.routing import units

CREATOR = f"model-gateway {__version__}"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry
SKIPPED = ("__pycache__",)


@dataclass(frozen=True, slots=True)
class Source:
    """What goes into an archive."""

    model_dir: Path  # Triton's layout: config.pbtxt and numeric version folders
    triton_version: int
    model: str  # public model name
    version: str  # public version id
    extras: tuple[Path, ...] = ()
    sample_request: Path | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created: str | None = None  # ISO 8601 UTC; None: SOURCE_DATE_EPOCH or the inputs' newest mtime


@dataclass(frozen=True, slots=True)
class Created:
    path: Path
    digest: str
    manifest: Manifest


def _hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name in SKIPPED or path.suffix == ".pyc"


def _files(source: Source) -> dict[str, Path]:
    """Archive path -> source file, for everything the archive will hold but the manifest."""
    root = source.model_dir
    config = root / "config.pbtxt"
    if not config.is_file():
        raise ArchiveError(f"{root} has no config.pbtxt; give the directory of one Triton model")
    folder = root / str(source.triton_version)
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit())
        raise ArchiveError(
            f"{root} has no version folder {source.triton_version} "
            f"(version folders: {', '.join(found) or 'none'})"
        )
    files = {f"{MODEL_DIR}/config.pbtxt": config}
    for path in sorted(root.iterdir()):
        # Files beside config.pbtxt (labels) belong to the model; other versions' folders do not.
        if path.is_file() and path.name != "config.pbtxt" and not _hidden(path):
            files[f"{MODEL_DIR}/{path.name}"] = path
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(_hidden(Path(part)) for part in relative.parts):
            files[f"{MODEL_DIR}/{relative.as_posix()}"] = path
    if not any(name.startswith(f"{MODEL_DIR}/{source.triton_version}/") for name in files):
        raise ArchiveError(f"{folder} is empty; it should hold the model (model.py, model.onnx, ...)")
    for extra in source.extras:
        if not extra.is_file():
            raise ArchiveError(f"extra file {extra} does not exist or is not a file")
        name = f"{EXTRA_DIR}/{extra.name}"
        if name in files or name == SAMPLE_REQUEST:
            raise ArchiveError(f"two extra files are named {extra.name}; rename one")
        files[name] = extra
    if source.sample_request is not None:
        if not source.sample_request.is_file():
            raise ArchiveError(f"sample request {source.sample_request} does not exist")
        files[SAMPLE_REQUEST] = source.sample_request
    return dict(sorted(files.items()))


def _hash(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _check_sample(path: Path, schema: Schema) -> None:
    try:
        request = json.loads(path.read_bytes())
        names = [item["name"] for item in request["inputs"]]
    except (ValueError, KeyError, TypeError):
        raise ArchiveError(
            f'sample request {path} must be a KServe v2 JSON request: {{"inputs": [{{"name": ...}}]}}'
        ) from None
    unknown = sorted(set(names) - {t.name for t in schema.inputs})
    if unknown:
        known = ", ".join(t.name for t in schema.inputs)
        raise ArchiveError(
            f"sample request {path} sends {', '.join(unknown)}, which the model lacks (inputs: {known})"
        )


def _creation_time(source: Source, files: Mapping[str, Path]) -> str:
    if source.created is not None:
        return source.created
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch.isdigit():
        return created_text(float(epoch))
    return created_text(max(path.stat().st_mtime for path in files.values()))


def manifest_for(source: Source) -> tuple[Manifest, dict[str, Path]]:
    """The manifest an archive of `source` gets, and the files it lists; checks the inputs first."""
    for value, kind in ((source.model, "model"), (source.version, "version")):
        try:
            units.url_name(value, kind)
        except ValueError as exc:
            raise ArchiveError(f"{kind} {exc}") from None
    files = _files(source)
    try:
        config = triton_config.parse(files[f"{MODEL_DIR}/config.pbtxt"].read_text(encoding="utf-8"))
        schema = from_model_config(config)
    except (UnicodeDecodeError, ValueError) as exc:  # ConfigInvalid and RecordError are ValueErrors
        raise ArchiveError(f"{source.model_dir}/config.pbtxt: {exc}") from None
    triton_name = source.model_dir.resolve().name
    if config.get("name", triton_name) != triton_name:
        raise ArchiveError(
            f"{source.model_dir}/config.pbtxt names the model {config['name']!r}, but Triton names a model "
            f"after its directory ({triton_name!r}); make them agree"
        )
    if source.sample_request is not None:
        _check_sample(source.sample_request, schema)
    platform, backend = triton_config.serving(config)
    entries = []
    for name, path in files.items():
        size, sha = _hash(path)
        entries.append(FileEntry(name, size, sha))
    manifest = Manifest(
        model=source.model,
        version=source.version,
        triton=TritonModel(
            triton_name, source.triton_version, platform, backend, int(config.get("max_batch_size", 0))
        ),
        schema=schema,
        files=tuple(entries),
        created=_creation_time(source, files),
        creator=CREATOR,
        sample_request=SAMPLE_REQUEST if source.sample_request is not None else None,
        metadata=dict(source.metadata),
    )
    return manifest, files


def _write_zip(target: Path, manifest: bytes, files: Mapping[str, Path]) -> None:
    with zipfile.ZipFile(target, "w") as archive:
        for name, source in [(MANIFEST, None), *files.items()]:
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, whatever system writes it
            info.external_attr = 0o100644 << 16
            with archive.open(info, "w") as out:
                if source is None:
                    out.write(manifest)
                else:
                    with source.open("rb") as f:
                        shutil.copyfileobj(f, out, CHUNK)


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_tgz(target: Path, manifest: bytes, files: Mapping[str, Path]) -> None:
    with (
        target.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed,
        tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        archive.addfile(_tar_info(MANIFEST, len(manifest)), io.BytesIO(manifest))
        for name, source in files.items():
            with source.open("rb") as f:
                archive.addfile(_tar_info(name, source.stat().st_size), f)


def _write_dir(target: Path, manifest: bytes, files: Mapping[str, Path]) -> None:
    target.mkdir()
    (target / MANIFEST).write_bytes(manifest)
    for name, source in files.items():
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)


def default_output(model: str, version: str, fmt: str) -> Path:
    return Path(f"{model}-{version}" + {"zip": ".zip", "tgz": ".tgz", "dir": ""}[fmt])


def _make_room(output: Path, force: bool) -> None:
    if not output.exists() and not output.is_symlink():
        return
    if not force:
        raise ArchiveError(f"{output} already exists; pass --force to replace it")
    if output.is_dir() and not output.is_symlink():
        if not (output / MANIFEST).is_file():
            raise ArchiveError(
                f"{output} is a directory that is not an archive; not replacing it, even with --force"
            )
        shutil.rmtree(output)


def create(source: Source, output: Path, fmt: str = "zip", *, force: bool = False) -> Created:
    """Write the archive of `source` to `output`; refuses to replace an existing one unless `force`."""
    if fmt not in FORMATS:
        raise ArchiveError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    manifest, files = manifest_for(source)
    data = manifest.canonical()
    _make_room(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place, so a crash never leaves half an archive there.
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        {"zip": _write_zip, "tgz": _write_tgz, "dir": _write_dir}[fmt](partial, data, files)
        if fmt == "dir":
            _make_room(output, force)
        os.replace(partial, output)
    except BaseException:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise
    return Created(output, digest_of(data), manifest)
