"""`gateway rollout status|pause|resume|promote|rollback`, through the admin API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from gateway.admin_cli import AdminError, call_ok, connection_options

ACTIONS = ("pause", "resume", "promote", "rollback")


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
        record = view.get("record")
        head = f"{model}: {view['baseline']} -> {view['canary']}, steps {view['steps']}"
        if record is None:
            print(f"{head}: not started yet")
            continue
        state = record["state"]
        print(f"{head}: {state['phase']} at {state['weight']}%")
        reason = record.get("evidence", {}).get("reason")
        if reason:
            print(f"  now: {reason}")
        for event in record.get("history", [])[-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            print(f"  {when} {event['action']} -> {event['weight']}% by {event['by']}")
    return 0


def _act(args: argparse.Namespace) -> int:
    try:
        call_ok(args, "POST", f"/api/rollouts/{args.model}/{args.action}")
    except AdminError as exc:
        print(f"gateway rollout {args.action}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.action} of {args.model} accepted; it applies within a second (see: gateway rollout status)")
    return 0
