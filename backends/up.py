"""`python -m backends.local up --routes routes.yaml`: host every local backend that a routes file names.

For each backend whose URL points at this machine, one Triton process hosts the targets (`name/N`) routed
to it. The routes file is read with plain PyYAML rather than the gateway's own parser, so this launcher
works (and fails clearly) even while the gateway's configuration code changes.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from backends.local import REPO_ROOT, TritonProcess, VersionSpec, port_is_free, start_versions, stop_all

LOCAL_HOSTS = {"127.0.0.1", "localhost"}
TARGET = re.compile(r"^(?P<model>[A-Za-z0-9._-]+)/(?P<version>[0-9]+)$")
# ${VAR} and ${VAR:-default}, as the gateway expands them, so a URL like http://127.0.0.1:${PORT:-8010} works.
ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


class RoutesError(ValueError):
    """The routes file cannot be turned into a set of local backends."""


@dataclass(frozen=True)
class LocalBackend:
    name: str
    port: int
    targets: tuple[tuple[str, int], ...]
    grpc_port: int | None = None  # from grpc_url, when the routes file gives one


def _expand(text: str) -> str:
    return ENV_REF.sub(lambda m: os.environ.get(m["name"], m["default"] or ""), text)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RoutesError(f"{where} must be a mapping")
    return value


def local_backends(routes: Mapping[str, Any]) -> list[LocalBackend]:
    """The backends on this machine and the Triton targets each must host, from a parsed routes file."""
    ports: dict[str, int] = {}
    grpc_ports: dict[str, int | None] = {}
    for name, backend in _mapping(routes.get("backends"), "backends").items():
        url = _expand(str(_mapping(backend, f"backend {name}").get("url", "")))
        parts = urlsplit(url)
        if parts.hostname not in LOCAL_HOSTS:
            continue
        if parts.port is None:
            raise RoutesError(f"backend {name}: url {url!r} needs an explicit port to be started locally")
        ports[name] = parts.port
        grpc_url = _expand(str(_mapping(backend, f"backend {name}").get("grpc_url", "")))
        if grpc_url:
            grpc_ports[name] = urlsplit(grpc_url if "://" in grpc_url else "grpc://" + grpc_url).port

    targets: dict[str, dict[str, tuple[int, str]]] = {name: {} for name in ports}
    for model_name, model in _mapping(routes.get("models"), "models").items():
        versions = _mapping(_mapping(model, f"model {model_name}").get("versions"), f"{model_name} versions")
        for version_id, version in versions.items():
            where = f"{model_name} version {version_id}"
            version = _mapping(version, where)
            backend = version.get("backend")
            if backend not in ports:
                continue
            match = TARGET.match(str(version.get("target", "")))
            if match is None:
                got = version.get("target")
                raise RoutesError(f"{where}: target must look like fraud_detector/3, got {got!r}")
            triton_model, number = match["model"], int(match["version"])
            hosted = targets[backend].get(triton_model)
            if hosted is not None and hosted[0] != number:
                raise RoutesError(
                    f"backend {backend} would host {triton_model}/{hosted[0]} (for {hosted[1]}) and "
                    f"{triton_model}/{number} (for {where}); one Triton process serves one version of a "
                    "model name, so give each version its own backend (its own port)"
                )
            targets[backend][triton_model] = (number, where)

    return [
        LocalBackend(
            name, ports[name], tuple((m, n) for m, (n, _) in sorted(hosted.items())), grpc_ports.get(name)
        )
        for name, hosted in targets.items()
        if hosted
    ]


def load_routes(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    # BaseLoader keeps every scalar a string: version ids like 2.10 or 2026-11-05 stay as written.
    with open(path) as f:
        data = yaml.load(f, Loader=yaml.BaseLoader)
    return _mapping(data, str(path))


def _side_ports(http_port: int) -> tuple[int | None, int | None]:
    # gRPC and metrics on the next two ports, so they are easy to guess; any free port if those are taken.
    grpc, metrics = http_port + 1, http_port + 2
    return (grpc if port_is_free(grpc) else None, metrics if port_is_free(metrics) else None)


def _up(args: argparse.Namespace) -> int:
    try:
        backends = local_backends(load_routes(args.routes))
    except (OSError, yaml.YAMLError, RoutesError) as exc:
        print(f"{args.routes}: {exc}", file=sys.stderr)
        return 2
    if not backends:
        print(f"{args.routes}: no backend on 127.0.0.1/localhost, nothing to start", file=sys.stderr)
        return 0
    log_dir = Path(args.log_dir)
    specs = []
    for b in backends:
        grpc, metrics = _side_ports(b.port)
        grpc = b.grpc_port or grpc
        specs.append(VersionSpec(b.targets, b.port, grpc, metrics, log_path=log_dir / f"{b.name}.log"))

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"starting {len(specs)} Triton process(es); logs in {log_dir}/", flush=True)
    try:
        procs = start_versions(specs, ready_timeout=args.ready_timeout)
    except Exception as exc:
        print(f"could not start the backends: {exc}", file=sys.stderr)
        return 1
    _print_ready(backends, procs)
    try:
        while not stop.wait(0.5):
            dead = [p for p in procs if not p.alive()]
            if dead:
                for p in dead:
                    print(f"{p!r} exited unexpectedly; last log lines:\n{p.logs()}", file=sys.stderr)
                return 1
        return 0
    finally:
        print("stopping the backends", flush=True)
        stop_all(procs)


def _print_ready(backends: list[LocalBackend], procs: list[TritonProcess]) -> None:
    for backend, proc in zip(backends, procs, strict=True):
        for model, number in backend.targets:
            print(
                f"{model}/{number} ready at {proc.url} (backend {backend.name}; grpc {proc.grpc_port}, "
                f"metrics {proc.metrics_port}, pid {proc.pid})",
                flush=True,
            )
    print("press Ctrl-C to stop", flush=True)


def add_parser(commands: Any) -> None:
    up = commands.add_parser("up", help="start every local backend of a routes file and wait for Ctrl-C")
    up.add_argument("--routes", default="routes.yaml", help="the gateway's routes file")
    up.add_argument("--log-dir", default=str(REPO_ROOT / "run" / "backends"), help="one log file per backend")
    up.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    up.set_defaults(func=_up)
