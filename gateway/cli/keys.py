"""`gateway keys ...`: API keys through the admin API, from a terminal.

`create` prints the secret alone on stdout and everything else on stderr, so that
`KEY=$(gateway keys create --name team-a)` captures just the secret while a person at a terminal still
sees the warning that it will not be shown again. Connection options, the admin token and error
wording are `gateway.cli.admin`'s, so every admin command behaves the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from gateway.cli.admin import AdminError, call, call_ok, connection_options, fail


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="create, list, revoke, disable and enable API keys")
    commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    create = commands.add_parser(
        "create", help="create an API key (or give one a new secret); prints its secret once"
    )
    create.add_argument("--name", required=True, help="unique name: letters, digits, '_', '.', '-'")
    create.add_argument(
        "--models", help="comma-separated models it may call (default: all; '' with --replace: all)"
    )
    create.add_argument("--limit", help="its own rate limit, like 100/s, 600/m or 3600/h")
    create.add_argument("--burst", type=int, help="requests it may send at once (needs --limit)")
    create.add_argument(
        "--model-limit",
        action="append",
        type=model_limit,
        metavar="MODEL=RATE[:BURST]",
        help="its limit on one model, like fraud-detector=100/s:200 (repeatable; on top of --limit); "
        "with --replace, replaces every model limit the key had",
    )
    create.add_argument("--expires-in", help="lifetime, like 30d, 12h or 90m (default: never expires)")
    create.add_argument(
        "--replace",
        action="store_true",
        help="if the name exists, give it a new secret (the old one stops working); "
        "settings not given keep their values",
    )
    connection_options(create)
    create.set_defaults(func=run_create)

    listing = commands.add_parser("list", help="every API key (names and settings, never secrets)")
    connection_options(listing)
    listing.set_defaults(func=run_list)

    for name, func, help_text in (
        ("revoke", run_revoke, "delete an API key; it stops working everywhere within a second"),
        ("disable", run_disable, "stop an API key working until it is enabled again"),
        ("enable", run_enable, "let a disabled API key work again"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("name", help="the key's name")
        connection_options(command)
        command.set_defaults(func=func)


def model_limit(text: str) -> tuple[str, dict[str, Any]]:
    """MODEL=RATE[:BURST] as (model, {"rate": RATE, "burst": BURST}); the admin API checks the values."""
    model, equals, limit = text.partition("=")
    rate, colon, burst = limit.partition(":")
    if not equals or not model.strip() or not rate.strip() or (colon and not burst.strip().isdigit()):
        raise argparse.ArgumentTypeError(
            f"must be MODEL=RATE or MODEL=RATE:BURST, like m=100/s:200, not {text!r}"
        )
    body: dict[str, Any] = {"rate": rate.strip()}
    if colon:
        body["burst"] = int(burst)
    return model.strip(), body


def _key_path(name: str) -> str:
    return "/api/keys/" + urllib.parse.quote(name, safe="")


def _report(command: str, exc: AdminError) -> int:
    print(f"gateway keys {command}: {exc}", file=sys.stderr)
    return 1


# -- create --------------------------------------------------------------------------------------


def create_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"name": args.name}
    if args.models is not None:
        body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.limit is not None:
        body["rate"] = args.limit
    if args.burst is not None:
        body["burst"] = args.burst
    if args.model_limit:
        body["model_limits"] = dict(args.model_limit)
        if len(body["model_limits"]) < len(args.model_limit):
            raise AdminError("--model-limit names the same model twice; give each model one limit")
    if args.expires_in is not None:
        body["expires_in"] = args.expires_in
    if args.replace:
        body["replace"] = True
    return body


def run_create(args: argparse.Namespace) -> int:
    try:
        status, data = call(args, "POST", "/api/keys", create_body(args))
        if status == 409:
            raise AdminError(f"an API key named {args.name!r} exists; add --replace to give it a new secret")
        if status != 201 or not isinstance(data, dict) or "secret" not in data:
            raise fail(status, data)
    except AdminError as exc:
        return _report("create", exc)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if data.get("replaced"):
        print(f"gave API key {data['name']!r} a new secret; the old one no longer works", file=sys.stderr)
    else:
        print(f"created API key {data['name']!r}", file=sys.stderr)
    print(f"  {describe(data)}", file=sys.stderr)
    print(
        "Its secret follows. It is shown ONLY THIS ONCE: store it now, it cannot be shown again.",
        file=sys.stderr,
    )
    sys.stderr.flush()
    print(data["secret"], flush=True)
    print("Send it as 'Authorization: Bearer <secret>' or 'X-API-Key: <secret>'.", file=sys.stderr)
    return 0


# -- list ----------------------------------------------------------------------------------------


def format_limit(rate: Any, burst: Any) -> str:
    """100/s, 10/m, 2/h, or "default" for a key without its own rate; "burst N" when set."""
    if rate is None:
        return "default"
    rate = float(rate)
    text = f"{rate:g}/s"
    for per, unit in ((1, "s"), (60, "m"), (3600, "h")):
        if abs(rate * per - round(rate * per)) < 1e-9 and round(rate * per) >= 1:
            text = f"{round(rate * per)}/{unit}"
            break
    return f"{text} burst {burst}" if burst is not None else text


def _when(epoch: Any) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(float(epoch)))


def format_model_limits(limits: Any) -> str:
    """model=RATE:BURST,... as --model-limit takes them; "-" for none."""
    if not limits:
        return "-"
    return ",".join(
        f"{model}={format_limit(limit.get('rate'), None)}:{limit.get('burst')}"
        for model, limit in limits.items()
    )


def describe(key: dict[str, Any]) -> str:
    models = ", ".join(key.get("models") or []) or "all"
    expires = "never" if key.get("expires_at") is None else _when(key["expires_at"])
    text = f"models: {models}; limit: {format_limit(key.get('rate'), key.get('burst'))}"
    if key.get("model_limits"):
        text += f"; model limits: {format_model_limits(key['model_limits'])}"
    return f"{text}; expires: {expires}"


def format_keys(keys: list[dict[str, Any]]) -> str:
    header = ("NAME", "MODELS", "LIMIT", "MODEL_LIMITS", "EXPIRES", "DISABLED", "CREATED")
    rows = [header]
    for key in keys:
        expires = "never" if key.get("expires_at") is None else _when(key["expires_at"])
        rows.append(
            (
                str(key.get("name", "?")),
                ",".join(key.get("models") or []) or "all",
                format_limit(key.get("rate"), key.get("burst")),
                format_model_limits(key.get("model_limits")),
                expires + (" (expired)" if key.get("expired") else ""),
                "yes" if key.get("disabled") else "no",
                f"{_when(key.get('created_at'))} by {key.get('created_by') or '?'}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    if len(rows) == 1:
        lines.append("(no API keys)")
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    try:
        data = call_ok(args, "GET", "/api/keys")
    except AdminError as exc:
        return _report("list", exc)
    print(json.dumps(data, indent=2) if args.json else format_keys(data.get("keys", [])))
    return 0


# -- revoke, disable, enable ---------------------------------------------------------------------


def _act(command: str, args: argparse.Namespace, method: str, body: Any, done: str) -> int:
    try:
        data = call_ok(args, method, _key_path(args.name), body)
    except AdminError as exc:
        return _report(command, exc)
    print(json.dumps(data, indent=2) if args.json else done.format(args.name))
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    done = "revoked API key {!r}; it stops working on every gateway process within a second"
    return _act("revoke", args, "DELETE", None, done)


def run_disable(args: argparse.Namespace) -> int:
    done = "disabled API key {!r}; it stops working within a second (enable it to undo)"
    return _act("disable", args, "PATCH", {"disabled": True}, done)


def run_enable(args: argparse.Namespace) -> int:
    return _act("enable", args, "PATCH", {"disabled": False}, "enabled API key {!r}")
