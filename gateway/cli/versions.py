"""`gateway versions list|show`: the version registry and each version's history, through the admin API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from gateway.cli.admin import AdminError, call_ok, connection_options


def add_commands(commands: Any) -> None:
    versions = commands.add_parser("versions", help="registered versions of a model and their history")
    verbs = versions.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="every version of MODEL: registration, routes, when served")
    listing.add_argument("model")
    connection_options(listing)
    listing.set_defaults(func=_list)
    show = verbs.add_parser("show", help="one version: its registration, schema, metadata and history")
    show.add_argument("model")
    show.add_argument("version")
    connection_options(show)
    show.set_defaults(func=_show)


def _clock(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _short(digest: Any) -> str:
    return f"{digest[:19]}..." if isinstance(digest, str) and len(digest) > 19 else str(digest or "-")


def _list(args: argparse.Namespace) -> int:
    try:
        data = call_ok(args, "GET", f"/api/versions/{args.model}")
    except AdminError as exc:
        print(f"gateway versions list: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("VERSION", "REGISTERED", "DIGEST", "TARGET", "IN ROUTES", "FIRST SERVED", "LAST SERVED")]
    for version, entry in data.get("versions", {}).items():
        summary = entry.get("summary", {})
        routes = entry.get("routes") or {}
        rows.append(
            (
                version,
                _clock(summary.get("registered_at")) if summary.get("registered") else "no",
                _short(summary.get("digest") or routes.get("archive")),
                str(summary.get("target") or routes.get("target") or "-"),
                "yes" if routes.get("in_file") else "no",
                _clock(summary.get("first_served")),
                _clock(summary.get("last_served")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    if len(rows) == 1:
        print(f"(no version of {args.model} is registered or in the routes file)")
    return 0


def format_event(event: Mapping[str, Any]) -> str:
    kind, at = event.get("kind"), _clock(event.get("at"))
    if kind == "registered":
        return f"{at}  registered by {event.get('by') or 'unknown'} as {event.get('digest')}"
    if kind == "deployed":
        where = event.get("backend") or event.get("url") or event.get("repository") or "?"
        return f"{at}  deployed to {where} by {event.get('by') or 'unknown'}"
    if kind == "served":
        return f"{_clock(event.get('since'))}  served requests, until {at}"
    if kind == "rollout":
        action = str(event.get("action", "?")).replace("_", " ")
        line = (
            f"{at}  rollout {action} as {event.get('role')} (against {event.get('peer')}), "
            f"canary at {event.get('weight')}% by {event.get('by')}"
        )
        return line + (f": {event['reason']}" if event.get("reason") else "")
    if kind == "schema_refused":
        return f"{at}  schema gate refused it traffic ({event.get('where')}): {event.get('message')}"
    if kind == "schema_change_allowed":
        changes = "; ".join(event.get("differences", []))
        baseline = event.get("baseline")
        return f"{at}  schema change against {baseline} let through (allow_schema_change): {changes}"
    details = {k: v for k, v in event.items() if k not in ("kind", "at")}
    return f"{at}  {kind} {json.dumps(details, sort_keys=True)}"


def format_version(data: Mapping[str, Any]) -> str:
    record, summary, routes = data.get("record"), data.get("summary", {}), data.get("routes") or {}
    lines = [f"{data.get('model')} {data.get('version')}"]
    if record:
        lines.append(
            f"  registered {_clock(record.get('registered_at'))} by "
            f"{record.get('registered_by') or 'unknown'}: {record.get('digest')}"
        )
        lines.append(
            f"  triton target {record.get('triton_model')}/{record.get('triton_version')}, "
            f"archive built {record.get('created')}"
        )
        schema = record.get("schema", {})
        for kind in ("inputs", "outputs"):
            for tensor in schema.get(kind, []):
                shape = ", ".join(str(d) for d in tensor.get("shape", []))
                lines.append(f"  {kind[:-1]:6} {tensor.get('name')} {tensor.get('datatype')} [{shape}]")
        if record.get("metadata"):
            lines.append(f"  metadata: {json.dumps(record['metadata'], sort_keys=True)}")
    else:
        lines.append("  not registered (no archive of it was deployed with registration)")
    if routes.get("in_file"):
        archive = f", archive {routes['archive']}" if routes.get("archive") else ", no archive named"
        lines.append(
            f"  in the routes file: backend {routes.get('backend')}, target {routes.get('target')}{archive}"
        )
    else:
        lines.append("  not in the routes file")
    lines.append(
        f"  first served {_clock(summary.get('first_served'))}, "
        f"last served {_clock(summary.get('last_served'))}"
    )
    history = data.get("history", [])
    lines.append("history:" if history else "history: (none yet)")
    lines += [f"  {format_event(event)}" for event in history]
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    try:
        data = call_ok(args, "GET", f"/api/versions/{args.model}/{args.version}")
    except AdminError as exc:
        print(f"gateway versions show: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else format_version(data))
    return 0
