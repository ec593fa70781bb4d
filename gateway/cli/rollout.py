"""`gateway rollout status|pause|resume|promote|rollback`, through the admin API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from gateway.cli.admin import AdminError, call_ok, connection_options
from gateway.rollout.records import ACTIONS, RolloutRecord
from gateway.typed_json import RecordError


def add_commands(commands: Any) -> None:
    rollout = commands.add_parser("rollout", help="see and steer automatic canary rollouts")
    verbs = rollout.add_subparsers(dest="verb", required=True)
    status = verbs.add_parser("status", help="every rollout: phase, weight, and the last decision's reason")
    connection_options(status)
    status.set_defaults(func=_status)
    for action in ACTIONS:
        verb = verbs.add_parser(action, help=f"{action} the rollout of MODEL (applied within a second)")
        verb.add_argument("model")
        connection_options(verb)
        verb.set_defaults(func=_act, action=action)


def _status(args: argparse.Namespace) -> int:
    try:
        data = call_ok(args, "GET", "/api/rollouts")
    except AdminError as exc:
        print(f"gateway rollout status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = data.get("rollouts", {})
    if not rows:
        print("no model has a rollout in the routes file")
    for model, view in sorted(rows.items()):
        head = f"{model}: {view['baseline']} -> {view['canary']}, steps {view['steps']}"
        if view.get("record_error"):
            print(f"{head}: the stored record is unreadable: {view['record_error']}")
            continue
        if view.get("record") is None:
            print(f"{head}: not started yet")
            continue
        try:
            record = RolloutRecord.from_json(view["record"])
        except RecordError as exc:
            print(f"{head}: the admin API sent a record this CLI cannot read: {exc}")
            continue
        print(f"{head}: {record.state.phase} at {record.state.weight}%")
        reason = record.evidence.get("reason")
        if reason:
            print(f"  now: {reason}")
        traffic = record.evidence.get("traffic")
        if isinstance(traffic, dict):
            for version, line in _traffic_lines(traffic):
                print(f"  {version}: {line}")
        for event in record.history[-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(event.time))
            print(f"  {when} {event.action} -> {event.weight}% by {event.by}")
    return 0


def _traffic_lines(traffic: dict[str, Any]) -> list[tuple[str, str]]:
    """Per version, this step's evidence and what was served beside it without counting."""
    lines = []
    for version, rows in traffic.items():
        try:
            counted = sum(row["requests"] for row in rows.values() if row["evidence"])
            failed = sum(row["failures"] for row in rows.values() if row["evidence"])
            faults = sum(row["caller_faults"] for row in rows.values())
            apart = ", ".join(
                f"{choice} {row['requests']}" for choice, row in rows.items() if not row["evidence"]
            )
        except (AttributeError, KeyError, TypeError):
            continue  # another release's shape: the reason above still says what matters
        lines.append(
            (
                version,
                f"{counted} requests ({failed} failed) in evidence; not: {apart}, caller faults {faults}",
            )
        )
    return lines


def _act(args: argparse.Namespace) -> int:
    try:
        call_ok(args, "POST", f"/api/rollouts/{args.model}/{args.action}")
    except AdminError as exc:
        print(f"gateway rollout {args.action}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.action} of {args.model} accepted; it applies within a second (see: gateway rollout status)")
    return 0
