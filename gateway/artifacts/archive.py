"""Reading archives (zip, gzipped tar, or a directory) and verifying them against their manifest.

Every read goes through `open_archive`, which hands out entries by their path in the archive and never
follows a path out of it: an entry named with `..`, an absolute path, a link or a device is reported,
not read. `verify` reports every problem it finds, each naming the file, so a tampered archive says
exactly what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from gateway.artifacts import triton_config
from gateway.artifacts.manifest import MANIFEST, MODEL_DIR, Manifest, digest_of, read_manifest, safe_path
from gateway.typed_json import RecordError

CHUNK = 1 << 20
FORMATS = ("zip", "tgz", "dir")


class ArchiveError(Exception):
    """An archive that cannot be used, or an operation refused; the message says why in words."""


class Reader(Protocol):
    def names(self) -> list[str]:
        """Every regular file, by its "/"-separated path; unsafe entries are listed in `unsafe`."""
        ...

    def unsafe(self) -> list[str]: ...

    def open(self, name: str) -> IO[bytes]: ...

    def close(self) -> None: ...


class DirReader:
    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and not p.is_symlink()
        )

    def unsafe(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_symlink())

    def open(self, name: str) -> IO[bytes]:
        return (self.root / name).open("rb")

    def close(self) -> None:
        pass


class ZipReader:
    def __init__(self, path: Path) -> None:
        self.zip = zipfile.ZipFile(path)
        entries = [i for i in self.zip.infolist() if not i.is_dir()]
        self._names = sorted(i.filename for i in entries if safe_path(i.filename))
        self._unsafe = sorted(i.filename for i in entries if not safe_path(i.filename))

    def names(self) -> list[str]:
        return self._names

    def unsafe(self) -> list[str]:
        return self._unsafe

    def open(self, name: str) -> IO[bytes]:
        return self.zip.open(name)

    def close(self) -> None:
        self.zip.close()


class TarReader:
    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path, "r:gz")  # noqa: SIM115 - closed by close(), like the zip
        members = [m for m in self.tar.getmembers() if not m.isdir()]
        self._files = {m.name: m for m in members if m.isfile() and safe_path(m.name)}
        self._unsafe = sorted(m.name for m in members if m.name not in self._files)

    def names(self) -> list[str]:
        return sorted(self._files)

    def unsafe(self) -> list[str]:
        return self._unsafe

    def open(self, name: str) -> IO[bytes]:
        handle = self.tar.extractfile(self._files[name])
        assert handle is not None  # a regular file always has one
        return handle

    def close(self) -> None:
        self.tar.close()


def open_archive(path: str | Path) -> Reader:
    """A reader for a zip, a gzipped tar or an archive directory, told apart by content, not name."""
    target = Path(path)
    if target.is_dir():
        return DirReader(target)
    try:
        with target.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ArchiveError(f"cannot read {target}: {exc.strerror or exc}") from None
    try:
        if magic.startswith(b"PK"):
            return ZipReader(target)
        if magic.startswith(b"\x1f\x8b"):
            return TarReader(target)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"{target} is damaged: {exc}") from None
    raise ArchiveError(f"{target} is not an archive (a zip, a gzipped tar or a directory)")


@contextlib.contextmanager
def opened(path: str | Path) -> Iterator[Reader]:
    reader = open_archive(path)
    try:
        yield reader
    finally:
        reader.close()


def read_bytes(reader: Reader, name: str, limit: int = 64 << 20) -> bytes:
    with reader.open(name) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ArchiveError(f"{name} is larger than {limit} bytes")
    return data


def hash_entry(reader: Reader, name: str) -> tuple[int, str]:
    """(size, hex sha256) of one entry, read in chunks: weights can be gigabytes."""
    digest, size = hashlib.sha256(), 0
    with reader.open(name) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Report:
    """What `verify` found: the digest and manifest when the manifest reads, and every problem."""

    digest: str | None
    manifest: Manifest | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.manifest is not None and not self.problems


def _layout_problems(manifest: Manifest) -> list[str]:
    problems = []
    folder = f"{MODEL_DIR}/{manifest.triton.version}/"
    paths = [entry.path for entry in manifest.files]
    if f"{MODEL_DIR}/config.pbtxt" not in paths:
        problems.append(f"{MODEL_DIR}/config.pbtxt: missing; every archive holds the model's configuration")
    if not any(p.startswith(folder) for p in paths):
        problems.append(f"{folder}: the version folder is missing or empty")
    for path in paths:
        top, _, rest = path.partition("/")
        if top == MODEL_DIR and "/" in rest and not path.startswith(folder):
            problems.append(f"{path}: not in the version folder {folder} (one archive holds one version)")
        elif top not in (MODEL_DIR, "extra"):
            problems.append(f"{path}: outside {MODEL_DIR}/ and extra/")
    return problems


def _schema_problem(reader: Reader, manifest: Manifest) -> str | None:
    try:
        text = read_bytes(reader, f"{MODEL_DIR}/config.pbtxt").decode("utf-8")
        derived = triton_config.schema(text)
    except (UnicodeDecodeError, triton_config.ConfigInvalid, RecordError, ArchiveError) as exc:
        return f"{MODEL_DIR}/config.pbtxt: cannot be read as a Triton model configuration: {exc}"
    if derived != manifest.schema:
        return (
            f"MANIFEST.json schema does not match {MODEL_DIR}/config.pbtxt: the manifest says "
            f"{manifest.schema.to_json()}, the configuration gives {derived.to_json()}"
        )
    return None


def verify(path: str | Path) -> Report:
    """Check the manifest's fields and layout, every file's size and sha256, and that nothing was added."""
    with opened(path) as reader:
        names = reader.names()
        if MANIFEST not in names:
            return Report(None, None, (f"{MANIFEST}: missing; this is not a gateway archive",))
        raw = read_bytes(reader, MANIFEST)
        digest = digest_of(raw)
        try:
            manifest = read_manifest(raw)
        except RecordError as exc:
            return Report(digest, None, (f"{MANIFEST} is not valid: {exc}",))
        problems = [f"{name}: not a regular file inside the archive; refusing it" for name in reader.unsafe()]
        problems += _layout_problems(manifest)
        listed = {entry.path for entry in manifest.files}
        for entry in manifest.files:
            if entry.path not in names:
                problems.append(f"{entry.path}: listed in the manifest but missing from the archive")
                continue
            size, sha = hash_entry(reader, entry.path)
            if sha != entry.sha256:
                problems.append(
                    f"{entry.path}: content differs from the manifest (sha256 {sha[:16]}..., "
                    f"the manifest says {entry.sha256[:16]}...)"
                )
            elif size != entry.size:
                problems.append(f"{entry.path}: {size} bytes, the manifest says {entry.size}")
        problems += [
            f"{name}: in the archive but not in the manifest"
            for name in names
            if name != MANIFEST and name not in listed
        ]
        if f"{MODEL_DIR}/config.pbtxt" in names and (schema := _schema_problem(reader, manifest)):
            problems.append(schema)
        return Report(digest, manifest, tuple(problems))


def load_verified(path: str | Path) -> tuple[Manifest, str]:
    """The manifest and digest of an archive that verifies; ArchiveError listing the problems otherwise."""
    report = verify(path)
    if not report.ok or report.manifest is None or report.digest is None:
        listing = "\n  ".join(report.problems)
        raise ArchiveError(f"{path} does not verify:\n  {listing}")
    return report.manifest, report.digest
