"""The dashboard in a real headless Chromium, against a real gateway and real Triton versions.

One gateway serves two models under rollouts: fraud-detector, whose canary is healthy until the test
turns its fault knob (backends/knobs.py) and makes it fail, and churn, which the buttons act on. A
read token and the operate token sign in; a wrong one is told so. Screenshots are saved (path printed).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from backends.knobs import Knobs, write_knobs
from backends.local import TritonProcess, free_port, start_version
from tests.browser import Browser, chromium
from tests.conftest import TritonFleet
from tests.support import GatewayProcess
from tests.test_admin_e2e import admin
from tests.test_live_reload import BODY

VIEWER = "viewer-secret-token"
FD, CHURN = "fraud-detector", "churn"
SHOWN_WITHIN_S = 5.0  # the promise: a rollback is on screen within 5 s of the decision


def routes(triton: TritonFleet, canary: TritonProcess) -> str:
    return f"""
backends:
  triton-a: {{url: "{triton.v3.url}", timeout: 10s}}
  triton-b: {{url: "{triton.v4.url}", timeout: 10s}}
  triton-canary: {{url: "{canary.url}", timeout: 10s}}
models:
  {FD}:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3, metadata: {{git: 4f9c2ab, auc: 0.931}}}}
      2.2.0: {{backend: triton-canary, target: fraud_detector/8, metadata: {{git: b71e03d}}}}
    split: {{2.1.3: 100, 2.2.0: 0}}
    rollout: {{baseline: 2.1.3, canary: 2.2.0, steps: [30, 100], max_error_rate_increase: 0.0}}
  {CHURN}:
    versions:
      1.0.0: {{backend: triton-a, target: fraud_detector/3}}
      1.1.0: {{backend: triton-b, target: fraud_detector/4}}
    split: {{1.0.0: 100, 1.1.0: 0}}
    mirror: {{to: 1.1.0, percent: 100}}
    rollout: {{baseline: 1.0.0, canary: 1.1.0, steps: [10, 100]}}
keys: {{required: false}}
store: {{url: "memory://"}}
"""


@dataclass
class Setup:
    gateway: GatewayProcess
    knobs: Path
    stop: threading.Event


def post(port: int, path: str, count: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(count):
        conn.request("POST", path, BODY)
        conn.getresponse().read()
    conn.close()


def steady_traffic(port: int, stop: threading.Event) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        conn.request("POST", f"/v2/models/{FD}/infer", BODY)
        conn.getresponse().read()
        time.sleep(0.005)  # about a hundred requests a second: enough evidence, little CPU
    conn.close()


def phase(process: GatewayProcess, model: str) -> str | None:
    record = admin(process, "GET", "/api/rollouts")[1]["rollouts"][model]["record"]
    return None if record is None else str(record["state"]["phase"])


@pytest.fixture(scope="module")
def setup(triton: TritonFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    knobs = tmp_path_factory.mktemp("knobs") / "canary.json"
    write_knobs(knobs, Knobs())
    canary = start_version("fraud_detector", 8, free_port(), knobs_file=knobs)
    process = GatewayProcess(routes(triton, canary), more_tokens=f"viewer:{VIEWER}:read")
    stop = threading.Event()
    try:
        with process:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and {phase(process, FD), phase(process, CHURN)} != {
                "progressing"
            }:
                time.sleep(0.1)
            assert phase(process, FD) == phase(process, CHURN) == "progressing", process.log()
            thread = threading.Thread(target=steady_traffic, args=(process.port, stop), daemon=True)
            thread.start()
            yield Setup(process, knobs, stop)
            stop.set()
            thread.join(10)
    finally:
        canary.stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as found:
        yield found


def sign_in(page: Page, process: GatewayProcess, token: str) -> None:
    page.goto(process.admin_url + "/")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")


def shown(page: Page, model: str, version: str | None, field: str) -> str:
    scope = f'[data-model="{model}"]' + (f' tr[data-version="{version}"]' if version else "")
    return str(page.locator(f'{scope} [data-field="{field}"]').first.get_attribute("data-value"))


def test_a_wrong_token_gets_a_clear_message(setup: Setup, browser: Browser) -> None:
    sign_in(browser.page, setup.gateway, "not-the-right-token")
    expect(browser.page.locator("#login-error")).to_contain_text("refused this token", timeout=5000)
    expect(browser.page.locator("#app")).to_be_hidden()
    assert browser.page.evaluate("sessionStorage.length") == 0  # a refused token is not kept
    browser.screenshot("wrong-token")


def test_the_page_shows_what_the_admin_api_says(setup: Setup, browser: Browser) -> None:
    process, page = setup.gateway, browser.page
    sign_in(page, process, process.admin_token)
    expect(page.locator("#who")).to_have_text("tester · operate", timeout=5000)
    card = page.locator(f'[data-model="{CHURN}"]')
    expect(card.locator('tr[data-version="1.1.0"] [data-field="pinned_rps"]')).to_have_attribute(
        "data-value", "0", timeout=5000
    )  # two polls seen: rates by how versions were chosen are known, and nothing is flowing yet
    post(process.port, f"/v2/models/{CHURN}/infer", 40)
    post(process.port, f"/v2/models/{CHURN}/versions/1.1.0/infer", 25)
    for version, field in (("1.1.0", "pinned_rps"), ("1.1.0", "shadow_rps"), ("1.0.0", "split_rps")):
        cell = card.locator(f'tr[data-version="{version}"] [data-field="{field}"]')
        expect(cell).not_to_have_attribute("data-value", "0", timeout=5000)
    time.sleep(1.5)  # a poll after the last request was counted everywhere
    api_status = admin(process, "GET", "/api/status")[1]["models"]
    api_versions = admin(process, "GET", "/api/versions")[1]["models"]
    for version in ("1.0.0", "1.1.0"):
        api = api_status[CHURN]["versions"][version]
        assert (
            int(shown(page, CHURN, version, "requests_total"))
            == api_versions[CHURN][version]["total"]["requests"]
        )
        assert float(shown(page, CHURN, version, "error_rate")) == api["error_rate"]
        for q in ("p50", "p95", "p99"):
            assert float(shown(page, CHURN, version, q)) == api["latency_ms"][q], (version, q)
        assert int(shown(page, CHURN, version, "weight_in_file")) == api["weight_in_file"]
        assert int(shown(page, CHURN, version, "weight_live")) == api["weight_live"]
    assert sum(api_versions[CHURN][v]["total"]["requests"] for v in ("1.0.0", "1.1.0")) == 65
    # Pinned traffic is shown apart from the split's.
    assert float(shown(page, CHURN, "1.1.0", "pinned_rps")) > 0
    assert float(shown(page, CHURN, "1.0.0", "pinned_rps")) == 0
    # The shadow comparison of churn's mirror (1.0.0's answers against 1.1.0's, which differ).
    pairs = {p["primary"]: p for p in admin(process, "GET", "/api/shadow")[1]["pairs"] if p["model"] == CHURN}
    row = card.locator('tr[data-pair="1.0.0>1.1.0"]')
    assert pairs["1.0.0"]["compared"] > 0 and pairs["1.0.0"]["equal_share"] == 0
    for field, value in (
        ("compared", pairs["1.0.0"]["compared"]),
        ("equal_share", pairs["1.0.0"]["equal_share"]),
        ("diff_p95", pairs["1.0.0"]["max_abs_diff"]["p95"]),
    ):
        assert float(str(row.locator(f'[data-field="{field}"]').get_attribute("data-value"))) == value, field
    record = admin(process, "GET", "/api/rollouts")[1]["rollouts"][FD]["record"]
    assert shown(page, FD, None, "phase") == record["state"]["phase"] == "progressing"
    assert int(shown(page, FD, None, "canary_weight")) == record["state"]["weight"] == 30
    # The figures are written as the page says them, not only as attributes.
    p95 = api_status[CHURN]["versions"]["1.0.0"]["latency_ms"]["p95"]
    cell = card.locator('tr[data-version="1.0.0"] [data-field="p95"]')
    assert cell.inner_text() == f"{p95:.1f} ms"
    expect(page.locator('[data-model="fraud-detector"] .lineage')).to_contain_text("4f9c2ab")
    expect(page.locator("#store")).to_contain_text("store up")
    expect(page.locator("#events")).to_contain_text("controller: rollout.start")
    assert page.locator("#workers tbody tr").count() == 1
    browser.screenshot("healthy-rollout")
    assert browser.console_errors == []
    # Everything came from the gateway's admin port (no CDN), with no cookie and nothing kept beyond the tab.
    assert browser.requested and all(url.startswith(process.admin_url + "/") for url in browser.requested)
    assert page.context.cookies() == []
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("sessionStorage.length") == 1


def test_a_read_token_sees_everything_and_no_actions(setup: Setup, browser: Browser) -> None:
    sign_in(browser.page, setup.gateway, VIEWER)
    page = browser.page
    expect(page.locator("#who")).to_have_text("viewer · read", timeout=5000)
    expect(page.locator(f'[data-model="{FD}"] [data-field="phase"]')).to_have_attribute(
        "data-value", "progressing"
    )
    assert page.locator("[data-action]").filter(has=page.locator("xpath=self::button")).count() == 0
    assert page.locator(".override input").count() == 0
    expect(page.locator("#reload")).to_be_hidden()
    assert browser.console_errors == []


def test_pause_rollback_and_override_buttons_work(setup: Setup, browser: Browser) -> None:
    process, page = setup.gateway, browser.page
    sign_in(page, process, process.admin_token)
    card = page.locator(f'[data-model="{CHURN}"]')
    card.locator('button[data-action="pause"]').click()
    expect(page.locator("#confirm")).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("Pause the rollout of churn")
    page.click("#confirm-cancel")  # a cancelled confirmation does nothing
    time.sleep(1.5)
    assert phase(process, CHURN) == "progressing"
    card.locator('button[data-action="pause"]').click()
    page.click("#confirm-ok")
    expect(card.locator('[data-field="phase"]')).to_have_attribute("data-value", "paused", timeout=5000)
    assert phase(process, CHURN) == "paused"
    card.locator('button[data-action="rollback"]').click()
    expect(page.locator("#confirm-text")).to_contain_text("Roll back 1.1.0 of churn")
    page.click("#confirm-ok")
    expect(card.locator('[data-field="phase"]')).to_have_attribute("data-value", "rolled_back", timeout=5000)
    assert phase(process, CHURN) == "rolled_back"
    expect(card.locator(".timeline")).to_contain_text("rollback")
    expect(page.locator("#events")).to_contain_text("tester: rollout.rollback (model=churn)")
    assert card.locator("button[data-action]").count() == 0  # nothing left to do with an ended rollout

    # A weight override from the form, confirmed, then cleared.
    card.locator('.override input[data-version="1.0.0"]').fill("70")
    card.locator('.override input[data-version="1.1.0"]').fill("30")
    card.locator('.override input[aria-label="reason"]').fill("browser test")
    card.locator(".override button.act").click()
    expect(page.locator("#confirm-text")).to_contain_text("1.0.0 70%, 1.1.0 30%")
    page.click("#confirm-ok")
    expect(card.locator("p.muted").first).to_contain_text(
        "weight override by tester: browser test", timeout=5000
    )
    override = admin(process, "GET", "/api/routes")[1]["models"][CHURN]["override"]
    assert (override["weights"], override["set_by"], override["active"]) == (
        {"1.0.0": 70, "1.1.0": 30},
        "tester",
        True,
    )
    card.get_by_role("button", name="Clear override").click()
    page.click("#confirm-ok")
    expect(card.locator("p.muted").first).not_to_contain_text("weight override", timeout=5000)
    assert admin(process, "GET", "/api/routes")[1]["models"][CHURN]["override"] is None
    assert browser.console_errors == []


def test_a_canary_that_starts_failing_is_shown_rolled_back_within_5s(setup: Setup, browser: Browser) -> None:
    process, page = setup.gateway, browser.page
    sign_in(page, process, process.admin_token)
    phase_cell = page.locator(f'[data-model="{FD}"] [data-field="phase"]')
    expect(phase_cell).to_have_attribute("data-value", "progressing", timeout=5000)
    write_knobs(setup.knobs, Knobs(error_rate=1.0))
    phase_cell.and_(page.locator('[data-value="rolled_back"]')).wait_for(timeout=90_000)
    on_screen = time.time()
    record: dict[str, Any] = admin(process, "GET", "/api/rollouts")[1]["rollouts"][FD]["record"]
    decision = record["history"][-1]
    assert (decision["action"], decision["by"]) == ("rollback", "controller")
    lag = on_screen - decision["time"]
    print(f"rollback decided at {decision['time']:.3f}, on screen {lag:.2f} s later")
    assert 0 <= lag <= SHOWN_WITHIN_S
    expect(page.locator(f'[data-model="{FD}"] [data-field="reason"]')).to_contain_text(
        decision["evidence"]["reason"][:40]
    )
    expect(page.locator(f'[data-model="{FD}"] [data-field="canary_weight"]')).to_have_attribute(
        "data-value", "0"
    )
    time.sleep(1.0)
    browser.screenshot("rolled-back")
    assert browser.console_errors == []
