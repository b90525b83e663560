"""Fixtures of the browser tests: Chromium, the page server, targets, a SoftHSM token.

Evidence of a failed test (a screenshot and the console log of each page it opened) goes
to test-output/browser/<test name>/ under the repository root, or under
$KSW1FAST_TEST_OUTPUT/browser/ when that is set.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from playwright.async_api import async_playwright

from helpers import GatewayProcess, SoftHSM, make_softhsm

from .headless import Chromium
from .page_server import Pages, serve_pages

REPO = Path(__file__).resolve().parents[2]
OUTPUT = Path(os.environ.get("KSW1FAST_TEST_OUTPUT", REPO / "test-output")) / "browser"
_REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Keep each phase's report, so fixtures can tell at teardown whether the test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _script(name: str) -> str:
    """Run one of the repository's install scripts; its stdout."""
    done = subprocess.run(["bash", str(REPO / "scripts" / name)], text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=900)
    if done.returncode:
        raise RuntimeError(f"scripts/{name} failed:\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="session")
def chromium_installed() -> None:
    _script("chromium.sh")


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    """This test's artifact folder, emptied of an earlier run's."""
    folder = OUTPUT / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    return folder


@pytest.fixture
async def chromium(chromium_installed: None, request: pytest.FixtureRequest,
                   output_dir: Path, tmp_path: Path) -> AsyncIterator[Chromium]:
    async with async_playwright() as playwright:
        browsers = Chromium(playwright, tmp_path)
        try:
            yield browsers
            if any(report.failed for report in request.node.stash.get(_REPORTS, {}).values()):
                await browsers.save_evidence(output_dir)
        finally:
            await browsers.close()


@pytest.fixture
def pages() -> Iterator[Pages]:
    with serve_pages() as served:
        yield served


@pytest.fixture(params=["compiled", "pure-python"])
def serve(request: pytest.FixtureRequest,
          spawn_gateway: Callable[..., Awaitable[GatewayProcess]]
          ) -> Callable[..., Awaitable[GatewayProcess]]:
    """Starts `ksw1fast serve ARGS...` with the compiled relay or its pure-Python twin. A
    subprocess, so that a test can stop it as production does: SIGTERM and drain."""
    env = {"KSW1FAST_NO_EXTENSIONS": "1"} if request.param == "pure-python" else None
    return lambda *args: spawn_gateway(*args, env=env)


@pytest.fixture
def token() -> str:
    return "browser-test-token"


@pytest.fixture
def token_file(token: str, tmp_path: Path) -> str:
    """A gateway token file holding `token`: auth is on wherever it is used."""
    path = tmp_path / "tokens"
    path.write_text(f"{token}\n")
    return str(path)


@dataclass
class Sink:
    """A TCP target that reads to EOF, answers "<bytes> <sha256 hex>" and closes."""
    port: int = 0
    received: list[tuple[int, str]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest, count = hashlib.sha256(), 0
        while chunk := await reader.read(1 << 20):
            digest.update(chunk)
            count += len(chunk)
        self.received.append((count, digest.hexdigest()))
        writer.write(f"{count} {digest.hexdigest()}".encode())
        await writer.drain()
        writer.close()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    target = Sink()
    server = await asyncio.start_server(target.handle, "127.0.0.1", 0)
    async with server:
        target.port = server.sockets[0].getsockname()[1]
        yield target


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHSM:
    """A token store of the browser tests' own."""
    return make_softhsm(tmp_path_factory.mktemp("softhsm"), "browser")
