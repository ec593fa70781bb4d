"""The `gateway` command line: serve, validate."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gateway import config, server


def _validate(args: argparse.Namespace) -> int:
    try:
        table = config.load_table(args.file)
    except config.ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{args.file}: {len(exc.issues)} error(s); nothing was loaded", file=sys.stderr)
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
        workers=args.workers,
        reuse_port=args.reuse_port,
        shutdown_timeout=args.shutdown_timeout,
    )
    try:
        table = config.load_table(args.config)
    except config.ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{args.config}: not serving, fix the error(s) above", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot read {args.config}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.workers > 1:
        argv = ["serve", "--config", args.config, "--host", args.host, "--port", str(args.port)]
        argv += ["--shutdown-timeout", str(args.shutdown_timeout), "--log-level", args.log_level]
        return server.supervise(options, argv)
    try:
        return server.run_worker(table, options)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
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
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to drain on SIGTERM")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
