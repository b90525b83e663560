"""Workers import exactly their supervisor's ksw1fast and run its codec, whatever the cwd."""
from __future__ import annotations

import asyncio
import importlib.machinery
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import ksw1fast
from ksw1fast import extensions
from ksw1fast.ops import children

from helpers import GatewayProcess, PackageCopy, free_port, http_get

pytestmark = pytest.mark.timeout(120)

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "ksw1fast")


async def _live_workers(proc: GatewayProcess, metrics_port: int) -> list[dict]:
    """/healthz's workers once it lists every child of the supervisor (bounded wait)."""
    deadline = time.monotonic() + 30
    while True:
        status, body = await asyncio.to_thread(http_get,
                                               f"http://127.0.0.1:{metrics_port}/healthz")
        assert status == 200
        health = json.loads(body)
        pids = {child.pid for child in psutil.Process(proc.pid).children()}
        if len(pids) == 2 and {w["pid"] for w in health["workers"]} == pids:
            assert health["version"] == ksw1fast.__version__
            return health["workers"]
        if time.monotonic() > deadline:
            pytest.fail(f"/healthz never listed both workers {pids}: {health}\n"
                        + "".join(proc.log))
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("codec, env", [("compiled", {}),
                                        ("pure", {extensions.NO_EXTENSIONS_VAR: "1"})])
async def test_workers_started_in_an_unbuilt_checkout_run_the_installed_package(
        tmp_path: Path, codec: str, env: dict[str, str]) -> None:
    """`ksw1fast serve --workers 2` from a checkout never built (what serve.sh does after
    `pip install .`): with an editable install the parent imports the real checkout, with
    a wheel site-packages; either way the copy in the cwd is what no process may import."""
    checkout = PackageCopy(tmp_path, built=False)
    metrics_port = free_port()
    proc = await asyncio.to_thread(GatewayProcess, "--workers", "2", "--metrics-port",
                                   str(metrics_port), env=env, command=[CONSOLE_SCRIPT],
                                   cwd=tmp_path)
    try:
        workers = await _live_workers(proc, metrics_port)
        status, text = await asyncio.to_thread(http_get,
                                               f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        log = await asyncio.to_thread(proc.stop)
    assert [w["codec"] for w in workers] == [codec, codec]
    assert status == 200
    for worker in workers:
        assert (f'ksw1fast_build_info{{codec="{codec}",pid="{worker["pid"]}",'
                f'version="{ksw1fast.__version__}"}} 1.0') in text
    assert checkout.imported_by == set()
    assert "extensions not built" not in log and "RuntimeWarning" not in log, log


async def test_workers_of_a_gateway_run_from_a_built_checkout_import_that_checkout(
        tmp_path: Path) -> None:
    """Development: `python -m ksw1fast` in a checkout imports it from sys.path[0]; its
    workers import that same checkout, not the package installed in the environment."""
    checkout = PackageCopy(tmp_path, built=True)
    metrics_port = free_port()
    proc = await asyncio.to_thread(GatewayProcess, "--workers", "2", "--metrics-port",
                                   str(metrics_port), cwd=tmp_path)
    try:
        workers = await _live_workers(proc, metrics_port)
    finally:
        await asyncio.to_thread(proc.stop)
    assert [w["codec"] for w in workers] == ["compiled", "compiled"]
    assert checkout.imported_by == {proc.pid, *(w["pid"] for w in workers)}


def _run_child_of(package: Path, *args: str) -> subprocess.CompletedProcess:
    """A child of a supervisor whose ksw1fast is `package`: the command children.py builds
    for this process, with `package`'s bootstrap instead of this one's."""
    argv, env = children.command("ksw1fast", args)
    argv[1] = str(package / "ops" / "children.py")
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_a_worker_that_cannot_load_the_compiled_codec_it_expects_exits_with_one_line(
        tmp_path: Path) -> None:
    assert extensions.COMPILED  # so its workers are told to run the compiled codec
    checkout = PackageCopy(tmp_path, built=False)
    # a broken build (with no file at all, an editable install's import hook would still
    # find the real checkout's)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (checkout.package / f"_codec{suffix}").write_bytes(b"not a shared object")
    # as a supervisor starts a worker, with stdout for its status pipe
    result = _run_child_of(checkout.package, "serve", "--port", "0", "--worker-process", "1")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"ksw1fast: {extensions.REQUIRE_EXTENSIONS_VAR} is set but the compiled "
                           "codec cannot be loaded ("), line


def test_a_child_that_cannot_import_its_parents_package_says_so(tmp_path: Path) -> None:
    checkout = PackageCopy(tmp_path, built=False)
    (checkout.package / "__init__.py").unlink()  # damaged while its gateway runs
    result = _run_child_of(checkout.package, "--version")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("ksw1fast: this child process imported ksw1fast from ") and \
        line.endswith(f"not from its parent's package {checkout.package}"), line
