"""`gateway status` and `gateway reload`: the admin API from a terminal.

Only the standard library talks HTTP here, so the commands work from any machine that has the package,
with nothing else to install. The token comes from --token, GATEWAY_ADMIN_TOKEN, or the file a gateway
started without a token writes (`<state dir>/admin-token`), in that order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gateway.admin.auth import TokenError, parse_tokens

DEFAULT_ADMIN = "http://127.0.0.1:8081"
TOKEN_FILE = "admin-token"  # the same name as gateway.state.files.ADMIN_TOKEN


class AdminError(Exception):
    """Something the operator has to fix before the command can work, said in words."""


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = subparsers.add_parser("status", help="models, versions, weights and live stats of a gateway")
    connection_options(status)
    status.set_defaults(func=run_status)

    reload = subparsers.add_parser("reload", help="make every worker reload the routes file now")
    connection_options(reload)
    reload.set_defaults(func=run_reload)


def connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        default=os.environ.get("GATEWAY_ADMIN_URL", DEFAULT_ADMIN),
        help=f"admin API URL (default: $GATEWAY_ADMIN_URL or {DEFAULT_ADMIN})",
    )
    # No default from the environment here: argparse would print the secret in --help.
    parser.add_argument(
        "--token",
        help="admin token (default: $GATEWAY_ADMIN_TOKEN, else <state dir>/admin-token); "
        "prefer the variable, a command line is visible to other users",
    )
    parser.add_argument(
        "--state-dir", help="the gateway's state directory, to read its generated admin-token"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)"
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")


def resolve_token(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    configured = os.environ.get("GATEWAY_ADMIN_TOKEN", "").strip()
    if configured:
        # The gateway's own reading of the variable; an operate token if there is one, for actions.
        try:
            tokens = parse_tokens(configured)
        except TokenError as exc:
            raise AdminError(str(exc)) from None
        return next((t for t in tokens if t.role == "operate"), tokens[0]).secret
    if args.state_dir:
        path = Path(args.state_dir) / TOKEN_FILE
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise AdminError(f"cannot read the admin token from {path}: {exc.strerror}") from None
        if token:
            return token
        raise AdminError(f"{path} is empty; restart the gateway or set GATEWAY_ADMIN_TOKEN")
    raise AdminError(
        "no admin token: set GATEWAY_ADMIN_TOKEN, or pass --state-dir DIR to use the token a gateway "
        "started without one wrote to DIR/admin-token (by default $XDG_RUNTIME_DIR/model-gateway/<client "
        "port>, else ~/.local/state/model-gateway/<client port>)"
    )


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, parsed JSON) of one admin API call with an optional JSON body; AdminError for anything
    a person must fix."""
    base = str(args.admin).rstrip("/")
    headers = {"Authorization": f"Bearer {resolve_token(args)}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except urllib.error.URLError as exc:
        reason = exc.reason.strerror if isinstance(exc.reason, OSError) else exc.reason
        raise AdminError(
            f"cannot connect to the admin API at {base}: {reason or exc.reason}; is the gateway "
            "running, and is --admin (or GATEWAY_ADMIN_URL) its admin address?"
        ) from None
    except TimeoutError:
        raise AdminError(f"the admin API at {base} did not answer within {args.timeout:g}s") from None
    except OSError as exc:
        raise AdminError(f"talking to the admin API at {base} failed: {exc}") from None
    if status == 401:
        raise AdminError(
            f"the admin API at {base} refused the token (401): set GATEWAY_ADMIN_TOKEN to one of the "
            "gateway's admin tokens (or pass --state-dir to read the generated one)"
        )
    try:
        return status, json.loads(raw)
    except ValueError:
        raise AdminError(
            f"{method} {base + path} answered {status} with something that is not JSON ({raw[:80]!r}); "
            "is --admin pointing at the gateway's admin port?"
        ) from None


def call_ok(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """The answer of one successful call; AdminError (with the API's own message) otherwise."""
    status, data = call(args, method, path, body)
    if status >= 300 or not isinstance(data, dict):
        raise fail(status, data)
    return data


def fail(status: int, data: Any) -> AdminError:
    message = data.get("error") if isinstance(data, dict) else None
    return AdminError(f"the admin API answered {status}: {message or repr(data)}")


# -- gateway status ------------------------------------------------------------------------------


def run_status(args: argparse.Namespace) -> int:
    try:
        data = call_ok(args, "GET", "/api/status")
    except AdminError as exc:
        print(f"gateway status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(format_status(data))
    return 0


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _weight(value: Any) -> str:
    return "-" if value is None else str(value)


def _ready(version: dict[str, Any]) -> str:
    if version.get("ready") is None:
        return "?"
    if version["ready"]:
        return "yes"
    reason = version.get("not_ready_reason")
    return f"NO ({reason})" if reason else "NO"


def _clock(epoch: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(epoch or 0)))


def format_status(data: dict[str, Any]) -> str:
    header = ("MODEL", "VERSION", "FILE", "LIVE", "RPS", "ERRORS", "P50ms", "P95ms", "P99ms", "READY")
    rows: list[tuple[str, ...]] = [header]
    notes: list[str] = []
    for model, entry in data.get("models", {}).items():
        override = entry.get("override")
        for version, v in entry.get("versions", {}).items():
            live = _weight(v.get("weight_live"))
            if override and override.get("active") and v.get("weight_live") is not None:
                live += "*"
            rows.append(
                (
                    model,
                    version,
                    _weight(v.get("weight_in_file")),
                    live,
                    f"{v.get('rps', 0.0):.1f}",
                    f"{100 * v.get('error_rate', 0.0):.2f}%",
                    *(_ms(v.get("latency_ms", {}).get(q)) for q in ("p50", "p95", "p99")),
                    _ready(v),
                )
            )
        if not entry.get("live_split_agrees", True):
            notes.append(f"{model}: the workers route by different splits right now")
        if override:
            state = "active" if override.get("active") else "inactive, the file has changed this model since"
            reason = f" ({override['reason']})" if override.get("reason") else ""
            weights = ", ".join(f"{v}={w}" for v, w in override.get("weights", {}).items())
            notes.append(
                f"* {model}: weights overridden to {weights} by {override.get('set_by')} "
                f"at {_clock(override.get('set_at'))}{reason}, {state}"
            )
    numeric = {2, 3, 4, 5, 6, 7, 8}
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    if len(rows) == 1:
        lines.append("(no models)")
    lines += notes
    lines.append("")
    lines += _summary(data)
    return "\n".join(lines)


def _summary(data: dict[str, Any]) -> list[str]:
    lines = []
    workers = data.get("workers", {})
    revision = data.get("revision")
    served = data.get("worker_revisions", {})
    alive = f"{workers.get('alive', 0)} worker(s) alive" + (
        f", {workers['gone']} gone" if workers.get("gone") else ""
    )
    if revision:
        lines.append(f"revision {revision[:12]} ({data.get('source', 'routes file')}), {alive}")
    else:
        lines.append(f"{data.get('source', 'the routes file')} does not validate now; {alive}")
    if not served:
        lines.append("no worker is alive to serve it")
    elif data.get("in_sync"):
        lines.append("all workers serve this revision")
    elif not data.get("consistent"):
        lines.append(
            "workers DISAGREE: "
            + ", ".join(f"pid {pid} on {rev[:12]}" for pid, rev in sorted(served.items()))
        )
    elif served:
        lines.append(f"all workers serve revision {next(iter(served.values()))[:12]}, not the file's")
    error = data.get("last_reload_error")
    if error:
        failing = data.get("reload_failing", [])
        state = (
            f"still refused by pid(s) {', '.join(failing)}" if failing else "since then a reload succeeded"
        )
        lines.append(
            f"last reload error: pid {error.get('pid')} at {_clock(error.get('time'))} "
            f"({error.get('trigger', '?')}), {state}:"
        )
        lines += [f"  {message}" for message in error.get("errors", [])] or ["  (no message)"]
    return lines


# -- gateway reload ------------------------------------------------------------------------------


def run_reload(args: argparse.Namespace) -> int:
    try:
        status, data = call(args, "POST", "/api/reload")
        if status not in (200, 422, 504) or not isinstance(data, dict):
            raise fail(status, data)
    except AdminError as exc:
        print(f"gateway reload: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(format_reload(data))
    return 0 if status == 200 and data.get("ok") else 1


def format_reload(data: dict[str, Any]) -> str:
    lines = []
    for pid, event in sorted(data.get("workers", {}).items()):
        took = (
            f" in {event['duration_ms']:.1f} ms" if isinstance(event.get("duration_ms"), int | float) else ""
        )
        if event.get("ok"):
            lines.append(f"pid {pid}: ok, revision {str(event.get('revision') or '?')[:12]}{took}")
        else:
            lines.append(f"pid {pid}: REFUSED{took}; the last good table keeps serving")
            lines += [f"  {message}" for message in event.get("errors", [])]
    lines += [f"pid {pid}: did not report a reload in time" for pid in data.get("missing", [])]
    if not lines:
        lines.append("no worker reported a reload")
    if data.get("error"):
        lines.append(str(data["error"]))
    return "\n".join(lines)
