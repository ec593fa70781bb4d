"""`gateway archive deploy`: a verified archive into a running Triton, or into a model repository on disk.

Into Triton through its model repository API (explicit model control): the files travel base64-encoded
in the load request with the configuration as JSON, so Triton needs no shared disk. Then the version
must become ready, report the manifest's schema, and answer the archive's sample request with every
declared output. Into a repository: `NAME/config.pbtxt`, `NAME/N/...`, never replacing a version folder
or configuration that differs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.artifacts import triton_config
from gateway.artifacts.archive import CHUNK, Reader, opened, read_bytes
from gateway.artifacts.manifest import MODEL_DIR, Manifest
from gateway.artifacts.schema import from_metadata
from gateway.typed_json import RecordError

LOAD_LIMIT = 1 << 30  # bytes; Triton's HTTP load request carries every file at once


class DeployError(Exception):
    """The deployment failed or was refused; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Loaded:
    url: str
    target: str  # name/N
    seconds: float
    warmed_up: tuple[str, ...]  # outputs the sample request returned; () without a sample


def _call(url: str, method: str, path: str, body: Any, timeout: float) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DeployError(f"cannot reach Triton at {url}: {reason}") from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def _error(payload: Any) -> str:
    return str(payload.get("error")) if isinstance(payload, dict) and payload.get("error") else repr(payload)


def model_files(manifest: Manifest) -> list[str]:
    """Paths under model/ as Triton sees them (config.pbtxt, labels.txt, 3/model.py)."""
    prefix = f"{MODEL_DIR}/"
    return [e.path.removeprefix(prefix) for e in manifest.files if e.path.startswith(prefix)]


def _load_parameters(reader: Reader, manifest: Manifest) -> dict[str, str]:
    config = triton_config.parse(read_bytes(reader, f"{MODEL_DIR}/config.pbtxt").decode("utf-8"))
    parameters = {"config": triton_config.load_json(config, manifest.triton.version)}
    for name in model_files(manifest):
        if name != "config.pbtxt":
            content = read_bytes(reader, f"{MODEL_DIR}/{name}", LOAD_LIMIT)
            parameters[f"file:{name}"] = base64.b64encode(content).decode("ascii")
    return parameters


def loaded_versions(url: str, name: str, timeout: float = 10.0) -> list[str]:
    status, payload = _call(url, "GET", f"/v2/models/{name}", None, timeout)
    if status == 200 and isinstance(payload, dict):
        return [str(v) for v in payload.get("versions", [])]
    return []


def load(
    archive: Path, manifest: Manifest, url: str, *, timeout: float = 120.0, replace: bool = False
) -> Loaded:
    """Load a verified archive into the Triton at `url`, wait until ready, check it, warm it up."""
    started = time.monotonic()
    triton = manifest.triton
    base = f"/v2/models/{triton.name}/versions/{triton.version}"
    others = [v for v in loaded_versions(url, triton.name) if v != str(triton.version)]
    if others and not replace:
        raise DeployError(
            f"{url} serves {triton.name} version(s) {', '.join(others)}; loading {triton.target} replaces "
            "the model, so they would be unloaded. Pass --replace if that is intended, or deploy to "
            "another backend"
        )
    with opened(archive) as reader:
        parameters = _load_parameters(reader, manifest)
        sample = read_bytes(reader, manifest.sample_request) if manifest.sample_request else None
    status, payload = _call(
        url, "POST", f"/v2/repository/models/{triton.name}/load", {"parameters": parameters}, timeout
    )
    if status != 200:
        raise DeployError(f"Triton at {url} refused to load {triton.target}: {_error(payload)}")
    while (ready := _call(url, "GET", f"{base}/ready", None, 10.0))[0] != 200:
        if time.monotonic() - started > timeout:
            raise DeployError(f"{triton.target} loaded but not ready after {timeout:g} s: {_error(ready[1])}")
        time.sleep(0.1)
    status, payload = _call(url, "GET", base, None, 10.0)
    try:
        live = from_metadata(payload)
    except RecordError as exc:
        raise DeployError(f"Triton's metadata for {triton.target} does not read: {exc}") from None
    if live != manifest.schema:
        raise DeployError(
            f"Triton reports {live.to_json()} for {triton.target}, but the manifest says "
            f"{manifest.schema.to_json()}; the archive's configuration is not what Triton serves"
        )
    outputs = _warm_up(url, base, manifest, sample, timeout) if sample is not None else ()
    return Loaded(url, triton.target, time.monotonic() - started, outputs)


def _warm_up(url: str, base: str, manifest: Manifest, sample: bytes, timeout: float) -> tuple[str, ...]:
    status, payload = _call(url, "POST", f"{base}/infer", json.loads(sample), timeout)
    if status != 200 or not isinstance(payload, dict):
        raise DeployError(
            f"the sample request failed on {manifest.triton.target}: {status} {_error(payload)}"
        )
    answered = {o.get("name"): o for o in payload.get("outputs", []) if isinstance(o, dict)}
    requested = [o.get("name") for o in json.loads(sample).get("outputs", []) if isinstance(o, dict)]
    for tensor in manifest.schema.outputs:
        if requested and tensor.name not in requested:
            continue
        got = answered.get(tensor.name)
        if got is None:
            raise DeployError(f"the sample request's answer lacks the declared output {tensor.name}")
        if got.get("datatype") != tensor.datatype:
            raise DeployError(
                f"output {tensor.name} came back as {got.get('datatype')}, "
                f"the manifest declares {tensor.datatype}"
            )
    return tuple(sorted(str(name) for name in answered))


def _same(manifest: Manifest, name: str, existing: Path) -> bool:
    """Whether a file already in the repository is the archive's (the manifest's size and sha256; the
    archive was verified against them)."""
    entry = next(e for e in manifest.files if e.path == f"{MODEL_DIR}/{name}")
    if not existing.is_file() or existing.stat().st_size != entry.size:
        return False
    digest = hashlib.sha256()
    with existing.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == entry.sha256


def unpack(archive: Path, manifest: Manifest, repository: Path) -> Path:
    """Write the model files into `repository/NAME/`; refuses to replace files that differ."""
    model_dir = repository / manifest.triton.name
    folder = model_dir / str(manifest.triton.version)
    names = model_files(manifest)
    with opened(archive) as reader:
        conflicts = [
            name
            for name in names
            if (model_dir / name).exists() and not _same(manifest, name, model_dir / name)
        ]
        ours = {n for n in names if n.startswith(f"{manifest.triton.version}/")}
        if folder.exists():
            present = {p.relative_to(model_dir).as_posix() for p in folder.rglob("*") if p.is_file()}
            conflicts += sorted(present - ours)
        if conflicts:
            raise DeployError(
                f"{model_dir} already holds a different {', '.join(sorted(set(conflicts))[:5])}; refusing to "
                f"replace it (a version folder is one build, and config.pbtxt configures every version). "
                "Remove it first, or give the new build another Triton version"
            )
        staging = model_dir / f".{manifest.triton.version}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        for name in names:
            if (model_dir / name).exists():
                continue
            target = staging / name if name in ours else model_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with reader.open(f"{MODEL_DIR}/{name}") as source, target.open("wb") as out:
                shutil.copyfileobj(source, out)
        if staging.exists():
            # The version folder appears whole or not at all: Triton may be polling this repository.
            staged = staging / str(manifest.triton.version)
            if folder.exists():
                for path in staged.rglob("*"):
                    if path.is_file():
                        destination = folder / path.relative_to(staged)
                        destination.parent.mkdir(parents=True, exist_ok=True)
                        path.replace(destination)
            else:
                staged.replace(folder)
            shutil.rmtree(staging, ignore_errors=True)
    return model_dir
