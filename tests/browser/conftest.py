"""Browser tests: Playwright for Python driving Debian's `chromium` against a real server.

Playwright cannot download its own browser here, so it launches the system Chromium
(`TUNEFORGE_CHROMIUM`, else `chromium` on PATH; `.ci/run` installs it with apt-get). Every page
fixture records each request the page makes; a request to any origin but the server's fails the
test. Screenshots of every page visited are written to `build/screenshots/` (a test artifact).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.integration.server import ServerProcess

SCREENSHOTS = Path(os.environ.get("TUNEFORGE_SCREENSHOTS", REPO / "build" / "screenshots"))


def chromium_path() -> str:
    path = os.environ.get("TUNEFORGE_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail("no Chromium found: install Debian's `chromium` (apt-get install chromium) "
                    "or point TUNEFORGE_CHROMIUM at a Chromium binary")
    return path


@pytest.fixture(scope="session")
def console_server(tmp_path_factory, models_dir) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("console"), models_dir,
                         env={"TUNEFORGE_MAX_RUNNING_JOBS": "2"}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def second_key(console_server) -> str:
    """A second, non-admin key of the same server."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tuneforge", "keys", "create", "--name",
                          "second", "--data-dir", str(console_server.data_dir)],
                         capture_output=True, text=True, check=True)
    return next(w for w in out.stdout.split() if w.startswith("tml-"))


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Module-scoped: Playwright's sync API keeps an event loop on the test thread while it
    runs, which must not outlive these tests (asyncio.run and the SDK's blocking calls refuse a
    thread with a running loop)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"])
        yield b
        b.close()


class Console:
    """One browser tab on the console, logged in, recording every request it makes."""

    def __init__(self, browser, server: ServerProcess, name: str) -> None:
        self.server = server
        self.name = name
        self.context = browser.new_context(viewport={"width": 1400, "height": 900},
                                           accept_downloads=True)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.set_default_timeout(30_000)
        self.shots = 0

    def open(self, route: str = "") -> None:
        self.page.goto(f"{self.server.base_url}/{route}")

    def login(self, key: str | None = None) -> None:
        self.open()
        self.page.fill("#api-key", key or self.server.api_key)
        self.page.click("#login")
        self.page.wait_for_url("**/#/runs")

    def go(self, route: str) -> None:
        self.page.evaluate(f"location.hash = {route!r}")

    def shot(self, label: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.shots += 1
        path = SCREENSHOTS / f"{self.name}-{self.shots:02d}-{label}.png"
        # from the top: a full-page shot of a scrolled page paints the sticky header mid-page
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def api(self, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        return httpx.request(method, f"{self.server.base_url}{path}", timeout=120,
                             headers={"X-API-Key": key or self.server.api_key}, **kw)

    def foreign_requests(self) -> list[str]:
        origin = self.server.base_url
        return [u for u in self.requests
                if not (u == origin or u.startswith(origin + "/") or u.startswith(("data:",
                                                                                   "blob:")))]


@pytest.fixture
def console(browser, console_server, request) -> Iterator[Console]:
    c = Console(browser, console_server, request.node.name.removeprefix("test_"))
    yield c
    try:
        assert not c.foreign_requests(), f"requests left the server's origin: " \
                                         f"{c.foreign_requests()}"
        assert not c.errors, f"errors in the page: {c.errors}"
    finally:
        c.context.close()
