"""The `gateway` command line: serve, validate, and the admin, archive and registry commands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gateway.app import server
from gateway.artifacts.guard import check_at_start
from gateway.cli import admin as admin_cli
from gateway.cli import archive as archive_cli
from gateway.cli import keys as keys_cli
from gateway.cli import rollout as rollout_cli
from gateway.cli import versions as versions_cli
from gateway.routing import config
from gateway.routing.table import RouteTable


def _load_or_report(path: str, consequence: str) -> RouteTable | None:
    """The table in `path`, or None after printing every error and what follows from them."""
    try:
        return config.load_table(path)
    except config.ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{path}: {len(exc.issues)} error(s); {consequence}", file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    table = _load_or_report(args.file, "nothing was loaded")
    if table is None:
        return 1
    versions = sum(len(m.versions) for m in table.models.values())
    summary = f"{len(table.models)} model(s), {versions} version(s), revision {table.revision[:12]}"
    print(f"{args.file}: OK, {summary}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    options = server.ServeOptions(
        config=args.config,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        reuse_port=args.reuse_port,
        shutdown_timeout=args.shutdown_timeout,
        admin_host=args.admin_host,
        admin_port=None if args.no_admin else args.admin_port,
        state_dir=args.state_dir,
        worker_index=args.worker_index,
        stats=not args.no_stats,
    )
    table = _load_or_report(args.config, "not serving, fix them first")
    if table is None:
        return 1
    if contradictions := check_at_start(table):
        print("\n".join(contradictions), file=sys.stderr)
        print(f"{args.config} contradicts the version registry; not serving, fix it first", file=sys.stderr)
        return 1
    argv = ["serve", "--config", args.config, "--host", args.host, "--port", str(args.port)]
    argv += ["--grpc-port", str(args.grpc_port)]
    argv += ["--shutdown-timeout", str(args.shutdown_timeout), "--log-level", args.log_level]
    if args.no_stats:
        argv.append("--no-stats")
    try:
        return server.run(table, options, argv)
    except OSError as exc:
        print(f"gateway: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser(
        "validate", help="check a routes file; exit 1 with every error if it is bad"
    )
    validate.add_argument("file")
    validate.set_defaults(func=_validate)

    serve = commands.add_parser("serve", help="serve inference traffic")
    serve.add_argument("--config", default="routes.yaml", help="routes file (default: routes.yaml)")
    serve.add_argument("--host", default="0.0.0.0", help="client address to listen on (default: all)")
    serve.add_argument("--port", type=int, default=8080, help="client port (default: 8080)")
    serve.add_argument(
        "--grpc-port", type=int, default=8001, help="KServe v2 gRPC client port (default: 8001; 0: none)"
    )
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to drain on SIGTERM")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--admin-host", default="127.0.0.1", help="admin address (default: loopback only)")
    serve.add_argument("--admin-port", type=int, default=8081, help="admin API, metrics (default: 8081)")
    serve.add_argument("--no-admin", action="store_true", help="serve no admin port")
    serve.add_argument(
        "--state-dir",
        help="shared state of this gateway's processes, private to its user (default "
        "$XDG_RUNTIME_DIR/model-gateway/PORT, else ~/.local/state/model-gateway/PORT)",
    )
    serve.add_argument(
        "--no-stats", action="store_true", help="count nothing per request (to measure what metrics cost)"
    )
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)
    admin_cli.add_commands(commands)
    keys_cli.add_commands(commands)
    rollout_cli.add_commands(commands)
    archive_cli.add_commands(commands)
    versions_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
