"""`gateway archive create|inspect|verify|deploy`: versions as immutable archives (docs/archives.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway.artifacts import deploy, registry
from gateway.artifacts.archive import FORMATS, ArchiveError, load_verified, verify
from gateway.artifacts.create import Source, create, default_output
from gateway.artifacts.manifest import Manifest, build_metadata, parse_created
from gateway.cli.admin import AdminError, call, call_ok, connection_options, fail
from gateway.routing import config


def add_commands(commands: Any) -> None:
    archive = commands.add_parser("archive", help="package, check and deploy model versions as archives")
    verbs = archive.add_subparsers(dest="verb", required=True)

    c = verbs.add_parser("create", help="package one version of a Triton model into an archive")
    c.add_argument(
        "model_dir", type=Path, help="the Triton model's directory (config.pbtxt, version folders)"
    )
    c.add_argument("--model", required=True, help="public model name, as in routes.yaml (fraud-detector)")
    c.add_argument("--version", required=True, help="public version id (2.1.3); one build per id, for good")
    c.add_argument("--triton-version", type=int, help="the version folder to package (default: the only one)")
    c.add_argument("-o", "--output", type=Path, help="default: MODEL-VERSION.zip (.tgz, or a directory)")
    c.add_argument(
        "--format", choices=FORMATS, default="zip", help="zip (default), tgz, or dir for development"
    )
    c.add_argument(
        "--extra", type=Path, action="append", default=[], help="a file for extra/ (requirements.txt)"
    )
    c.add_argument(
        "--sample-request", type=Path, help="KServe v2 JSON request; deploy warms the model up with it"
    )
    c.add_argument("--metadata", action="append", default=[], help="KEY=VALUE; dots nest (metrics.auc=0.931)")
    c.add_argument("--metadata-file", type=Path, action="append", default=[], help="a JSON or YAML mapping")
    c.add_argument("--git-commit", help="lineage: the commit the model was trained from")
    c.add_argument("--training-data", help="lineage: a fingerprint, or a file or directory to fingerprint")
    c.add_argument("--author", help="who trained or owns the model")
    c.add_argument(
        "--created",
        help="creation time (ISO 8601 or Unix seconds; default SOURCE_DATE_EPOCH, else "
        "the newest input's modification time), so a rebuild is byte-identical",
    )
    c.add_argument("--force", action="store_true", help="replace an existing archive at --output")
    c.set_defaults(func=_create)

    for name, helptext, func in (
        ("inspect", "show an archive's manifest and digest", _inspect),
        ("verify", "check every file's digest and the manifest; exit 1 naming what differs", _verify),
    ):
        verb = verbs.add_parser(name, help=helptext)
        verb.add_argument("archive", type=Path)
        verb.add_argument("--json", action="store_true", help="print JSON")
        verb.set_defaults(func=func)

    d = verbs.add_parser("deploy", help="load an archive into Triton (or a model repository) and register it")
    d.add_argument("archive", type=Path)
    where = d.add_mutually_exclusive_group(required=True)
    where.add_argument("--backend", help="a backend of the routes file (--config) to load it into")
    where.add_argument("--url", help="the Triton to load it into, http://HOST:PORT")
    where.add_argument("--repository", type=Path, help="unpack into this model repository instead")
    d.add_argument(
        "--config", default="routes.yaml", help="routes file naming --backend (default routes.yaml)"
    )
    d.add_argument("--replace", action="store_true", help="let the load replace other loaded versions")
    d.add_argument(
        "--load-timeout", type=float, default=120.0, help="seconds to wait for ready (default 120)"
    )
    d.add_argument("--no-register", action="store_true", help="do not record the version in the registry")
    connection_options(d)
    d.set_defaults(func=_deploy)


def _training_data(value: str | None) -> str | None:
    """A path becomes the sha256 of its files (names and contents, sorted); anything else is kept."""
    if value is None or not Path(value).exists():
        return value
    root = Path(value)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        name = path.name if path == root else path.relative_to(root).as_posix()
        with path.open("rb") as f:
            digest.update(name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return "sha256:" + digest.hexdigest()


def _documents(paths: list[Path]) -> list[dict[str, Any]]:
    documents = []
    for path in paths:
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"--metadata-file {path} must hold a mapping")
        documents.append(data)
    return documents


def _triton_version(model_dir: Path, given: int | None) -> int:
    if given is not None:
        return given
    folders = (
        sorted(p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
        if model_dir.is_dir()
        else []
    )
    if len(folders) != 1:
        raise ArchiveError(
            f"{model_dir} has version folders {', '.join(folders) or 'none'}; name one with --triton-version"
        )
    return int(folders[0])


def _create(args: argparse.Namespace) -> int:
    try:
        metadata = build_metadata(
            _documents(args.metadata_file),
            args.metadata,
            git_commit=args.git_commit,
            training_data=_training_data(args.training_data),
            author=args.author,
        )
        source = Source(
            model_dir=args.model_dir,
            triton_version=_triton_version(args.model_dir, args.triton_version),
            model=args.model,
            version=args.version,
            extras=tuple(args.extra),
            sample_request=args.sample_request,
            metadata=metadata,
            created=parse_created(args.created) if args.created else None,
        )
        output = args.output or default_output(args.model, args.version, args.format)
        made = create(source, output, args.format, force=args.force)
    except (ArchiveError, ValueError, OSError, yaml.YAMLError) as exc:
        print(f"gateway archive create: {exc}", file=sys.stderr)
        return 1
    print(
        f"{made.path}: {made.manifest.model} {made.manifest.version} "
        f"({made.manifest.triton.target}), {made.digest}"
    )
    return 0


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def describe(manifest: Manifest, digest: str) -> str:
    lines = [
        f"{manifest.model} {manifest.version}  {digest}",
        f"  triton:  {manifest.triton.target} ({manifest.triton.backend or manifest.triton.platform}, "
        f"max_batch_size {manifest.triton.max_batch_size})",
        f"  created: {manifest.created} by {manifest.creator}",
    ]
    for kind, tensors in (("input", manifest.schema.inputs), ("output", manifest.schema.outputs)):
        lines += [f"  {kind + ':':8} {t.name} {t.datatype} {_shape(t.shape)}" for t in tensors]
    lines.append("  files:")
    lines += [f"    {e.path}  {e.size} bytes  sha256:{e.sha256[:16]}..." for e in manifest.files]
    if manifest.sample_request:
        lines.append(f"  sample request: {manifest.sample_request}")
    if manifest.metadata:
        lines.append("  metadata: " + json.dumps(dict(manifest.metadata), sort_keys=True))
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    try:
        report = verify(args.archive)
    except ArchiveError as exc:
        print(f"gateway archive inspect: {exc}", file=sys.stderr)
        return 1
    if report.manifest is None or report.digest is None:
        print(f"gateway archive inspect: {args.archive}: {'; '.join(report.problems)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"digest": report.digest, "manifest": report.manifest.to_json()}, indent=2))
    else:
        print(describe(report.manifest, report.digest))
        if report.problems:
            print(
                f"  WARNING: it does not verify ({len(report.problems)} problem(s)); "
                "see gateway archive verify"
            )
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        report = verify(args.archive)
    except ArchiveError as exc:
        print(f"gateway archive verify: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {"ok": report.ok, "digest": report.digest, "problems": list(report.problems)}, indent=2
            )
        )
    elif report.ok:
        count = len(report.manifest.files) if report.manifest else 0
        print(f"{args.archive}: OK, {report.digest} ({count} files match the manifest)")
    else:
        print(f"{args.archive}: FAILED", file=sys.stderr)
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
    return 0 if report.ok else 1


def _backend_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    try:
        table = config.load_table(args.config)
    except config.ConfigError as exc:
        raise ArchiveError(
            f"{args.config} does not validate, so --backend cannot be looked up:\n{exc}"
        ) from None
    backend = table.backends.get(args.backend)
    if backend is None:
        raise ArchiveError(
            f"{args.config} has no backend {args.backend!r} (backends: {', '.join(table.backends)})"
        )
    return f"http://{backend.host}:{backend.port}"


def _precheck(args: argparse.Namespace, manifest: Manifest, digest: str) -> None:
    """Refuse before touching Triton what the registry would refuse after."""
    status, data = call(args, "GET", f"/api/versions/{manifest.model}/{manifest.version}")
    if status != 200 or not isinstance(data, dict):
        raise fail(status, data)
    existing = data.get("record")
    if existing is not None:
        problem = registry.conflict(
            registry.RegistryRecord.from_json(existing), registry.record_from_manifest(manifest, digest)
        )
        if problem:
            raise ArchiveError(problem)
    named = (data.get("routes") or {}).get("archive")
    if named and named != digest:
        raise ArchiveError(
            f"the routes file names archive {named} for {manifest.model} {manifest.version}, not this one "
            f"({digest}); give this build a new version id"
        )


def _deploy(args: argparse.Namespace) -> int:
    try:
        manifest, digest = load_verified(args.archive)
        register = not args.no_register
        if register:
            _precheck(args, manifest, digest)
        if args.repository is not None:
            where = deploy.unpack(args.archive, manifest, args.repository)
            print(f"unpacked {manifest.triton.target} into {where}")
            deployment = {"repository": str(args.repository)}
        else:
            url = _backend_url(args)
            loaded = deploy.load(args.archive, manifest, url, timeout=args.load_timeout, replace=args.replace)
            warm = f"; the sample request answered {', '.join(loaded.warmed_up)}" if loaded.warmed_up else ""
            print(f"loaded {loaded.target} into {url} in {loaded.seconds:.1f} s, ready{warm}")
            deployment = {"backend": args.backend or "", "url": url}
        if register:
            body = {
                "record": registry.record_from_manifest(manifest, digest).to_json(),
                "deployment": deployment,
            }
            answer = call_ok(args, "PUT", f"/api/versions/{manifest.model}/{manifest.version}", body)
            state = "registered" if answer.get("created") else "already registered as this build"
            print(f"{manifest.model} {manifest.version}: {state}, {digest}")
    except (ArchiveError, deploy.DeployError, AdminError, OSError, ValueError) as exc:
        print(f"gateway archive deploy: {exc}", file=sys.stderr)
        return 1
    return 0
