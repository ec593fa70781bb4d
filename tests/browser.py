"""A real headless Chromium for the dashboard tests: Debian's `chromium`, driven by Playwright for Python.

Playwright is pointed at the system browser (`executable_path`), so no browser build is downloaded
(`playwright install` is never run). The Makefile installs the Debian package when it is missing.
Screenshots go to a directory under the system's temporary folder, printed so a person can look.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import ConsoleMessage, Page, sync_playwright

CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(tempfile.gettempdir()) / "gateway-dashboard-screenshots"


@dataclass
class Browser:
    page: Page
    console_errors: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)  # every URL the page asked for

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


@contextmanager
def chromium(width: int = 1500, height: int = 1100) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root (CI does), where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            found = Browser(page)

            def on_console(message: ConsoleMessage) -> None:
                if message.type == "error":
                    found.console_errors.append(f"{message.text} at {message.location}")

            page.on("console", on_console)
            page.on("request", lambda request: found.requested.append(request.url))
            page.on("pageerror", lambda error: found.console_errors.append(f"uncaught: {error}"))
            yield found
        finally:
            browser.close()
