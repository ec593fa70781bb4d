"""`make demo`: watch a canary rolled back live. Run `make run` first, in another terminal.

It sends steady traffic to the example model (requests that name no version, so the split and the
rollout decide), lets the healthy canary gather evidence for a while, then turns the canary backend's
fault knob (`run/knobs/<backend>.json`, read by the example model: backends/knobs.py's format) so that
a share of its requests fails. The rollout controller rolls it back on the evidence; the dashboard (the
URL `make run` printed) shows it within a second or two. With --screenshots DIR it also saves the
dashboard as DIR/dashboard-healthy.png and DIR/dashboard-rolled-back.png (needs playwright and
chromium, which `make test` installs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from backends.knobs import Knobs, write_knobs
from backends.up import load_routes

REPO = Path(__file__).resolve().parent.parent
MODEL = "fraud-detector"
BODY = json.dumps(
    {"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
)


class Admin:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip("/"), token

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def rollout(self) -> dict[str, Any]:
        return self.get("/api/rollouts")["rollouts"][MODEL]  # type: ignore[no-any-return]


def canary_backend(routes_path: str) -> tuple[str, str]:
    """(canary version, its backend) from the routes file's rollout of the example model."""
    model = load_routes(routes_path)["models"][MODEL]
    canary = str(model["rollout"]["canary"])
    canary = str(model.get("aliases", {}).get(canary, canary))
    return canary, str(model["versions"][canary]["backend"])


def traffic(port: int, rate: float, stop: threading.Event, sent: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    pause = 1.0 / rate
    while not stop.is_set():
        started = time.monotonic()
        try:
            conn.request("POST", f"/v2/models/{MODEL}/infer", BODY, {"Content-Type": "application/json"})
            conn.getresponse().read()
            sent[0] += 1
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            time.sleep(0.5)
        time.sleep(max(0.0, pause - (time.monotonic() - started)))
    conn.close()


def describe(admin: Admin) -> str:
    entry = admin.rollout()
    record = entry["record"]
    if record is None:
        return "rollout not started yet"
    state = record["state"]
    stats = admin.get("/api/status")["models"][MODEL]["versions"][entry["canary"]]
    return (
        f"{state['phase']}: canary {entry['canary']} at {state['weight']}%, "
        f"{stats['rps']:.1f} req/s, error rate {stats['error_rate'] * 100:.1f}% (last minute)"
    )


class Screenshots:
    """One dashboard page open for the whole demo, so its charts hold every point when it is saved."""

    def __init__(self, folder: str | None, url: str, token: str) -> None:
        self.folder = Path(folder) if folder else None
        self.url, self.token = url, token

    def __enter__(self) -> Screenshots:
        if self.folder is None:
            return self
        from playwright.sync_api import sync_playwright  # only for --screenshots

        self._playwright = sync_playwright().start()
        chromium = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's, as the tests use
        browser = self._playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        self.page = browser.new_page(viewport={"width": 1500, "height": 1000})
        self.page.goto(f"{self.url}/#token={self.token}")
        self.page.wait_for_selector(f'[data-model="{MODEL}"] [data-field="phase"]')
        return self

    def save(self, name: str) -> None:
        if self.folder is not None:
            path = self.folder / name
            self.page.screenshot(path=str(path), full_page=True)
            print(f"saved {path}")

    def __exit__(self, *exc: object) -> None:
        if self.folder is not None:
            self._playwright.stop()


def watch(args: argparse.Namespace, admin: Admin, knobs: Path, shots: Screenshots) -> int:
    started = time.monotonic()
    while time.monotonic() - started < args.healthy:
        time.sleep(5)
        print(f"  {time.monotonic() - started:4.0f} s  {describe(admin)}", flush=True)
    shots.save("dashboard-healthy.png")
    write_knobs(knobs, Knobs(error_rate=args.error_rate))
    print(f"now {args.error_rate:.0%} of the canary's requests fail ({knobs}); watch the dashboard")
    failing = time.monotonic()
    while time.monotonic() - failing < args.timeout:
        time.sleep(1)
        entry = admin.rollout()
        if entry["record"] and entry["record"]["state"]["phase"] == "rolled_back":
            took = time.monotonic() - failing
            print(f"rolled back {took:.0f} s after the canary started failing:")
            print(f"  {entry['record']['evidence'].get('reason', '')}")
            time.sleep(5)  # the dashboard's charts show the drop
            shots.save("dashboard-rolled-back.png")
            return 0
        if int(time.monotonic() - failing) % 5 == 0:
            print(f"  {describe(admin)}", flush=True)
    print(f"not rolled back within {args.timeout:g} s: {describe(admin)}", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--routes", default="routes.yaml")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--admin-port", type=int, default=8081)
    parser.add_argument("--log-dir", default=str(REPO / "run"), help="make run's folder (default: run/)")
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second (default 60)")
    parser.add_argument("--healthy", type=float, default=40.0, help="seconds before the canary fails")
    parser.add_argument("--error-rate", type=float, default=0.5, help="share of canary requests failing")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the rollback")
    parser.add_argument("--screenshots", help="folder for two dashboard screenshots")
    args = parser.parse_args()
    log_dir = Path(args.log_dir)
    token_file = log_dir / "state" / "admin-token"
    try:
        token = token_file.read_text().strip()
    except OSError:
        print(f"no {token_file}: start `make run` first (in another terminal)", file=sys.stderr)
        return 1
    admin = Admin(f"http://127.0.0.1:{args.admin_port}", token)
    canary, backend = canary_backend(args.routes)
    knobs = log_dir / "knobs" / f"{backend}.json"
    try:
        entry = admin.rollout()
    except (OSError, urllib.error.URLError) as exc:
        print(f"the gateway's admin port does not answer ({exc}); is `make run` running?", file=sys.stderr)
        return 1
    phase = entry["record"]["state"]["phase"] if entry["record"] else None
    if phase in ("rolled_back", "promoted"):
        print(f"the rollout is already {phase}; restart `make run` for a fresh one", file=sys.stderr)
        return 1
    write_knobs(knobs, Knobs())
    print(f"dashboard: {admin.url}/#token={token}")
    print(f"sending {args.rate:g} requests/s to {MODEL}; canary {canary} on {backend} is healthy", end=" ")
    print(f"for {args.healthy:g} s")
    stop, sent = threading.Event(), [0]
    sender = threading.Thread(target=traffic, args=(args.port, args.rate, stop, sent), daemon=True)
    sender.start()
    try:
        with Screenshots(args.screenshots, admin.url, token) as shots:
            return watch(args, admin, knobs, shots)
    finally:
        stop.set()
        sender.join(5)
        write_knobs(knobs, Knobs())
        print(f"sent {sent[0]} requests; the canary backend's knobs are healthy again")


if __name__ == "__main__":
    sys.exit(main())
