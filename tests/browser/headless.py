"""Headless Chromium for the browser tests: Debian's build driven by Playwright, each
browser with a fresh profile (Playwright's) and a fresh HOME, every page's console
recorded, and a screenshot plus the console kept when a test fails."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from playwright.async_api import Browser, Error as PlaywrightError, Page, Playwright

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own download is not possible here
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-quic"]
LAUNCH_TIMEOUT_MS = 30_000
ACTION_TIMEOUT_MS = 30_000
RESULTS_TIMEOUT_MS = 60_000  # the page bounds each of its steps at 30 s


@dataclass
class PageRun:
    results: dict[str, Any]  # the test page's window.results
    console: list[str]


def trust_ca(home: Path, ca_pem: Path) -> None:
    """Make `ca_pem` a trusted root for a Chromium whose HOME is `home`: on Linux Chromium
    takes local roots from the NSS database in ~/.pki/nssdb."""
    db = f"sql:{home / '.pki' / 'nssdb'}"
    (home / ".pki" / "nssdb").mkdir(parents=True)
    for argv in (["certutil", "-N", "--empty-password", "-d", db],
                 ["certutil", "-A", "-n", "ksw1fast test CA", "-t", "C,,", "-i", str(ca_pem),
                  "-d", db]):
        subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=30)


class Chromium:
    def __init__(self, playwright: Playwright, scratch: Path) -> None:
        self._playwright = playwright
        self._scratch = scratch
        self._browsers: list[Browser] = []
        self._consoles: dict[Page, list[str]] = {}

    async def launch(self, ca_pem: Optional[Path] = None) -> Browser:
        """A new browser; it trusts `ca_pem` as a root when given."""
        home = self._scratch / f"home{len(self._browsers)}"
        home.mkdir()
        if ca_pem is not None:
            trust_ca(home, ca_pem)
        browser = await self._playwright.chromium.launch(
            executable_path=CHROMIUM, args=ARGS, env={**os.environ, "HOME": str(home)},
            timeout=LAUNCH_TIMEOUT_MS)
        self._browsers.append(browser)
        return browser

    async def open(self, url: str, browser: Optional[Browser] = None) -> Page:
        """Load `url` in a new page of `browser` (default: the first one, launched if need be)."""
        if browser is None:
            browser = self._browsers[0] if self._browsers else await self.launch()
        page = await browser.new_page()
        page.set_default_timeout(ACTION_TIMEOUT_MS)
        console = self._consoles[page] = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: console.append(f"uncaught: {error}"))
        await page.goto(url)
        return page

    def console(self, page: Page) -> list[str]:
        return self._consoles[page]

    async def run(self, url: str, browser: Optional[Browser] = None) -> PageRun:
        """Load the test page at `url` and wait until it has run all its steps."""
        return await self.results(await self.open(url, browser))

    async def results(self, page: Page) -> PageRun:
        """Wait until the test page open in `page` has run all its steps."""
        await page.wait_for_function("window.results?.done === true",
                                     timeout=RESULTS_TIMEOUT_MS)
        return PageRun(await page.evaluate("window.results"), self.console(page))

    async def save_evidence(self, folder: Path) -> None:
        """A full-page screenshot and the console log of every page, as CI artifacts."""
        folder.mkdir(parents=True, exist_ok=True)
        for number, (page, console) in enumerate(self._consoles.items(), 1):
            (folder / f"page{number}-console.log").write_text(
                f"{page.url}\n" + "".join(f"{line}\n" for line in console))
            try:
                await page.screenshot(path=folder / f"page{number}.png", full_page=True,
                                      timeout=10_000)
            except PlaywrightError as exc:  # a crashed or hung page has no picture
                (folder / f"page{number}.png.txt").write_text(f"no screenshot: {exc}\n")

    async def close(self) -> None:
        for browser in self._browsers:
            await browser.close()
