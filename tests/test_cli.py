"""The command line, the defaults, the logs and which codec runs."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import ksw1fast
from ksw1fast import extensions
from ksw1fast import client as kclient
from ksw1fast.protocol.errors import OpenError

from helpers import GatewayProcess, port_of, serve_tcp

pytestmark = pytest.mark.timeout(60)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m ksw1fast ARGS`; a `serve` that wrongly starts times out instead."""
    return subprocess.run([sys.executable, "-m", "ksw1fast", *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})},
                          stdin=subprocess.DEVNULL)


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ksw1fast {ksw1fast.__version__}"


def test_serve_help_documents_every_flag() -> None:
    out = _run("serve", "--help").stdout
    for flag in ("--host", "--port", "--path", "--max-streams", "--max-payload",
                 "--handshake-timeout", "--connect-timeout", "--dns-timeout", "--idle-ping",
                 "--log-level", "GATEWAY_HOST", "GATEWAY_PORT", "GATEWAY_PATH"):
        assert flag in out


_CHOSEN = ("from ksw1fast import framing; from ksw1fast.server import relaying; "
           "print(framing.FrameParser.__module__, relaying.TcpStream.__module__)")


def test_compiled_extensions_are_the_default() -> None:
    assert extensions.COMPILED
    result = subprocess.run([sys.executable, "-c", _CHOSEN], capture_output=True, text=True,
                            timeout=30)
    assert result.stdout.split() == ["ksw1fast._codec", "ksw1fast.server._relay"]


def test_no_extensions_selects_the_twins() -> None:
    result = subprocess.run([sys.executable, "-c", _CHOSEN], capture_output=True, text=True,
                            env={**os.environ, "KSW1FAST_NO_EXTENSIONS": "1"}, timeout=30)
    assert result.stdout.split() == ["ksw1fast.protocol.frames", "ksw1fast.server.relay"]


def test_environment_names_of_the_reference() -> None:
    proc = GatewayProcess(env={"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PATH": "/tunnel"})
    try:
        assert proc.address.startswith("ws://127.0.0.1:") and proc.address.endswith("/tunnel")
    finally:
        proc.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_serve_on_defaults_runs_the_browser_sequence() -> None:
    """`ksw1fast serve` with no flags: ws://127.0.0.1:8088/ws, and the polyfill's calls work."""
    if not _port_free(8088):
        pytest.fail("port 8088 is taken on this machine; the default-port test needs it")
    proc = await asyncio.to_thread(lambda: GatewayProcess(default_port=True))
    secret = b"payload-must-not-be-logged"

    async def echo(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    try:
        assert proc.address == "ws://127.0.0.1:8088/ws"
        async with await serve_tcp(echo) as target:
            client = await kclient.connect(proc.address, features=0x2E, max_streams=64)
            stream = await client.open_connection("127.0.0.1", port_of(target))
            stream.write(secret)
            assert await stream.readexactly(len(secret)) == secret
            await stream.close()
            assert "127.0.0.1" in await client.resolve("localhost")
            assert await client.ping(b"x") == b"x"
            with pytest.raises(OpenError):
                await client.open_connection("no-such-host.invalid", 1)
            await client.close()
    finally:
        log = await asyncio.to_thread(proc.stop)
    assert "connection open" in log and "connection closed" in log
    assert "open refused" in log and "no-such-host.invalid" in log
    assert secret.decode() not in log


@pytest.mark.parametrize("args, env, message", [
    (["--port", "70000"], {}, "argument --port: must be 0-65535, got 70000"),
    (["--port", "-1"], {}, "argument --port: must be 0-65535, got -1"),
    (["--port", "abc"], {}, "argument --port: invalid int value: 'abc'"),
    (["--metrics-port", "65536"], {}, "argument --metrics-port: must be 0-65535, got 65536"),
    ([], {"GATEWAY_PORT": "abc"}, "environment variable GATEWAY_PORT: invalid int value: 'abc'"),
    ([], {"GATEWAY_PORT": "70000"},
     "environment variable GATEWAY_PORT: must be 0-65535, got 70000"),
    (["--drain-timeout", "-5"], {}, "argument --drain-timeout: must be >= 0, got -5.0"),
    (["--workers", "0"], {}, "argument --workers: must be >= 1, got 0"),
    (["--pkcs11-pool-size", "-1"], {}, "argument --pkcs11-pool-size: must be >= 0, got -1"),
])
def test_a_bad_setting_is_named_by_its_flag_or_variable_under_serves_usage(
        args: list[str], env: dict[str, str], message: str) -> None:
    result = _run("serve", *args, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ksw1fast serve "), result.stderr
    assert result.stderr.splitlines()[-1] == f"ksw1fast serve: error: {message}"


def test_an_unset_pin_variable_is_refused_like_an_unset_token_secret() -> None:
    env = {name: value for name, value in os.environ.items() if name != "KSW1FAST_NO_PIN"}
    for flags, what in ((["--token-secret-env", "KSW1FAST_NO_PIN"], "the token secret"),
                        (["--pkcs11-lib", "/usr/lib/softhsm/libsofthsm2.so",
                          "--pkcs11-pin-env", "KSW1FAST_NO_PIN"], "the PKCS#11 PIN")):
        result = subprocess.run([sys.executable, "-m", "ksw1fast", "serve", "--port", "0",
                                 *flags], capture_output=True, text=True, timeout=30, env=env,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 2
        assert result.stderr.splitlines()[-1] == (
            f"ksw1fast serve: error: environment variable KSW1FAST_NO_PIN ({what}) is not "
            "set or empty")


# A missing optional package, simulated honestly: this sitecustomize.py (found first on
# PYTHONPATH, so Python imports it at start-up) puts a finder in front of every other that
# answers ModuleNotFoundError for the packages named in KSW1FAST_TEST_MISSING, exactly what
# an import of a package that is not installed raises.
_MISSING_SHIM = """\
import os, sys

_MISSING = set(os.environ["KSW1FAST_TEST_MISSING"].split(","))


class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Missing())
"""


def _without(package: str, tmp_path: Path) -> dict[str, str]:
    """Environment in which `package` is not importable (see _MISSING_SHIM)."""
    (tmp_path / "sitecustomize.py").write_text(_MISSING_SHIM)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "KSW1FAST_TEST_MISSING": package}


@pytest.mark.parametrize("package, flags, message", [
    ("PyKCS11", ["--pkcs11-lib", "/usr/lib/softhsm/libsofthsm2.so"],
     "--pkcs11-lib needs PyKCS11, which is not installed: pip install 'ksw1fast[pkcs11]'"),
    ("prometheus_client", ["--metrics-port", "0"],
     "--metrics-port needs prometheus_client, which is not installed: "
     "pip install 'ksw1fast[metrics]'"),
])
def test_a_missing_optional_package_is_one_line_with_the_install_hint(
        tmp_path: Path, package: str, flags: list[str], message: str) -> None:
    env = _without(package, tmp_path)
    probe = [sys.executable, "-c", f"import {package}"]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    missing = subprocess.run(probe, capture_output=True, text=True, timeout=30,
                             env={**os.environ, **env})
    assert f"ModuleNotFoundError: No module named '{package}'" in missing.stderr
    result = _run("serve", "--port", "0", *flags, env=env)
    assert (result.returncode, result.stderr) == (2, f"ksw1fast serve: error: {message}\n")


def test_serve_sh_installs_only_when_the_sources_changed(tmp_path: Path) -> None:
    """The real scripts/serve.sh and _venv.sh in a tree whose .venv is a fake: its python
    and ksw1fast only write down how they were called, so what runs is the script's own
    decision whether to install."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    for name in ("serve.sh", "_venv.sh"):
        shutil.copy2(scripts / name, tree / "scripts" / name)
    calls = tmp_path / "calls"
    (tree / ".venv" / "bin").mkdir(parents=True)
    for name in ("python", "ksw1fast"):
        fake = tree / ".venv" / "bin" / name
        fake.write_text(f'#!/bin/sh\necho "{name} $*" >>"{calls}"\n')
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    sources = {"pyproject.toml": "[project]\n", "setup.py": "setup()\n",
               "ksw1fast/__init__.py": "", "ksw1fast/_codec.pyx": "cdef int x\n",
               "ksw1fast/pkcs11/agent.py": ""}
    for name, text in sources.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)

    def serve() -> list[str]:
        calls.write_text("")
        subprocess.run(["bash", str(tree / "scripts" / "serve.sh"), "--port", "1"],
                       check=True, timeout=60, env={**os.environ, "PYTHON": sys.executable},
                       stdin=subprocess.DEVNULL)
        return calls.read_text().splitlines()

    install, run = "python -m pip install -q .", "ksw1fast serve --port 1"
    assert serve() == [install, run]  # never installed
    assert serve() == [run]
    (tree / "ksw1fast" / "_codec.c").write_text("/* generated */")  # build outputs
    (tree / "ksw1fast" / "__pycache__").mkdir()
    (tree / "ksw1fast" / "__pycache__" / "agent.cpython-311.pyc").write_bytes(b"\0")
    assert serve() == [run]
    (tree / "ksw1fast" / "pkcs11" / "agent.py").write_text("# changed\n")
    assert serve() == [install, run]
    assert serve() == [run]
    (tree / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert serve() == [install, run]
