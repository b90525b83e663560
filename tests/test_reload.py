"""SIGHUP reloads settings without dropping a connection (docs/operations.md, "Reloading
settings"): real `ksw1fast serve` processes, one with two workers.

For each reloadable input (egress rules, the Origin list, the token file, the JWKS file,
the TLS certificate) a tunnel streams through an echo target the whole time; the file is
edited and the gateway sent SIGHUP; every round trip must come back within a bound and
the stream stay open, while new handshakes and Opens meet the new setting.  Then an
invalid edit changes nothing, and one log line says why, in the words start-up uses."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import jwt
import pytest
import trustme
import websockets
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm

from ksw1fast import client as kclient
from ksw1fast.protocol.constants import OpenErrCode
from ksw1fast.protocol.errors import OpenError

from helpers import GatewayProcess, echo_handler, port_of, serve_tcp

pytestmark = pytest.mark.timeout(60)

Spawn = Callable[..., Awaitable[GatewayProcess]]
ROUND_TRIP_BOUND = 3.0  # seconds: a stall, not a slow machine, takes longer
REFUSED = "reload refused, nothing changed: "


class Streaming:
    """A tunnel kept busy through an echo target: a round trip of a few KiB every few
    milliseconds, each of which must come back within ROUND_TRIP_BOUND; on exit, the
    stream must still be open (one more round trip) and have made some."""

    def __init__(self, address: str, echo_port: int, **connect: Any) -> None:
        self.address, self.echo_port, self.connect = address, echo_port, connect
        self.round_trips = 0
        self.stalls: list[str] = []

    async def __aenter__(self) -> "Streaming":
        self.client = await kclient.connect(self.address, **self.connect)
        self.stream = await self.client.open_connection("127.0.0.1", self.echo_port)
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _round_trip(self) -> None:
        message = (b"%08d" % self.round_trips) * 512
        self.stream.write(message)
        echoed = await asyncio.wait_for(self.stream.readexactly(len(message)),
                                        ROUND_TRIP_BOUND)
        assert echoed == message
        self.round_trips += 1

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._round_trip()
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                self.stalls.append(f"round trip {self.round_trips}: {exc!r}")
                return
            await asyncio.sleep(0.005)

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await self._task
        try:
            assert not self.stalls, f"the tunnel stalled: {self.stalls}"
            before = self.round_trips
            await self._round_trip()  # still open after everything
            assert before >= 10, f"only {before} round trips"
        finally:
            await self.client.close()


async def reload(gw: GatewayProcess, tunnel: Streaming, expect: str,
                 count: int = 1) -> list[str]:
    """SIGHUP to `gw` while `tunnel` streams; the first `count` new log lines that contain
    `expect`, once the tunnel has made round trips since (it was busy all along)."""
    mark, before = len(gw.log), tunnel.round_trips
    os.kill(gw.pid, signal.SIGHUP)
    lines = await logged(gw, expect, count, mark)
    while tunnel.round_trips < before + 5 and not tunnel.stalls:
        await asyncio.sleep(0.01)  # (a stall ends the tunnel's task within its bound)
    return lines


async def logged(gw: GatewayProcess, expect: str, count: int = 1, mark: int = 0,
                 timeout: float = 10) -> list[str]:
    """The first `count` log lines from line `mark` on that contain `expect`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in gw.log[mark:] if expect in line]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {count} x {expect!r} in:\n" + "".join(gw.log[mark:]))


async def refused_with(address: str, **kwargs: Any) -> int:
    """The HTTP status an upgrade request is refused with."""
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(address, **kwargs):
            pass
    return info.value.response.status_code


async def accepted(address: str, **kwargs: Any) -> None:
    async with websockets.connect(address, **kwargs):
        pass


async def echoes(address: str, port: int, **connect: Any) -> None:
    """A new connection whose Open to `port` goes through; OpenError when refused."""
    client = await kclient.connect(address, **connect)
    try:
        stream = await client.open_connection("127.0.0.1", port)
        stream.write(b"ping")
        assert await asyncio.wait_for(stream.readexactly(4), 5) == b"ping"
    finally:
        await client.close()


def startup_error(*args: str) -> str:
    """What `ksw1fast <args>` (check-config, or a serve that cannot start) says on
    stderr, less its prefix."""
    done = subprocess.run([sys.executable, "-m", "ksw1fast", *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode != 0, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    return line.split(": ", 2)[-1] if line.startswith("ksw1fast serve: error") else \
        line.split(": ", 1)[1]


@pytest.fixture
async def echo_ports() -> Any:
    """Two echo targets on loopback."""
    servers = [await serve_tcp(echo_handler) for _ in range(2)]
    yield [port_of(s) for s in servers]
    for server in servers:
        server.close()


async def test_egress_rules_reload_in_every_worker(spawn_gateway: Spawn, tmp_path: Path,
                                                  echo_ports: list[int]) -> None:
    allowed, other = echo_ports
    config = tmp_path / "ksw1fast.toml"
    config.write_text(f'egress = ["allow tcp 127.0.0.1:{allowed}"]\n')
    gw = await spawn_gateway("--config", str(config), "--workers", "2")
    await logged(gw, "ksw1fast serving", count=2)  # each worker reads the file, then
    async with Streaming(gw.address, allowed) as tunnel:
        with pytest.raises(OpenError) as info:
            await echoes(gw.address, other)
        assert info.value.code == OpenErrCode.BLOCKED
        config.write_text(f'egress = ["allow tcp 127.0.0.1:{allowed}",\n'
                          f'          "allow tcp 127.0.0.1:{other}"]\n')
        lines = await reload(gw, tunnel, "reloaded: egress (2 rules)", count=2)
        assert len({line.split("]:")[0] for line in lines}) == 2  # each worker says so
        # a new Open of a connection that was open all along, and new connections
        stream = await tunnel.client.open_connection("127.0.0.1", other)
        stream.write(b"new rule")
        assert await stream.readexactly(8) == b"new rule"
        for _ in range(6):  # over both workers, most likely
            await echoes(gw.address, other)

        config.write_text(f'egress = ["allow tcp 127.0.0.1:{allowed}",\n'
                          '          "allow tcp 127.0.0.1:http"]\n')  # no port name
        mark = len(gw.log)
        (line,) = await reload(gw, tunnel, REFUSED)
        reason = startup_error("check-config", str(config))
        assert line.rstrip().endswith(REFUSED + reason) and f"{config}:2: key 'egress'" in line
        await asyncio.sleep(0.5)  # the workers were not told: they say nothing
        assert not [l for l in gw.log[mark:] if "reload" in l and l != line], gw.log[mark:]
        for _ in range(4):
            await echoes(gw.address, other)  # the rules of the last good reload


async def test_origins_reload_and_restart_only_settings_wait(spawn_gateway: Spawn,
                                                             tmp_path: Path,
                                                             echo_ports: list[int]) -> None:
    config = tmp_path / "ksw1fast.toml"
    config.write_text('allow_origins = ["https://a.example"]\n')
    gw = await spawn_gateway("--config", str(config))
    async with Streaming(gw.address, echo_ports[0]) as tunnel:
        await accepted(gw.address, origin="https://a.example")
        assert await refused_with(gw.address, origin="https://b.example") == 403
        config.write_text('allow_origins = ["https://b.example", "https://c.example"]\n'
                          'max_streams = 7\npath = "/elsewhere"\n')
        (line,) = await reload(gw, tunnel, "reloaded: origins (2 patterns)")
        (restart,) = [l for l in gw.log if "need a restart" in l]
        assert "path, max_streams changed but need a restart" in restart
        assert await refused_with(gw.address, origin="https://a.example") == 403
        await accepted(gw.address, origin="https://b.example")  # still on the old path

        config.write_text('allow_origins = ["b.example"]\n')
        (line,) = await reload(gw, tunnel, REFUSED)
        assert "origin pattern 'b.example': it does not start with scheme://" in line
        assert line.rstrip().endswith(startup_error("serve", "--port", "0", "--config",
                                                    str(config)))
        await accepted(gw.address, origin="https://c.example")
        assert await refused_with(gw.address, origin="https://a.example") == 403


async def test_token_file_reload(spawn_gateway: Spawn, tmp_path: Path,
                                 echo_ports: list[int]) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("token-one\ntoken-two\n")
    gw = await spawn_gateway("--token-file", str(tokens))
    async with Streaming(f"{gw.address}?token=token-two", echo_ports[0]) as tunnel:
        await accepted(f"{gw.address}?token=token-two")
        tokens.write_text("token-one\n# token-two is gone\ntoken-three\n")
        await reload(gw, tunnel, "reloaded: tokens")
        assert await refused_with(f"{gw.address}?token=token-two") == 403
        await accepted(f"{gw.address}?token=token-three")
        await echoes(f"{gw.address}?token=token-one", echo_ports[1])

        tokens.write_text("token-three\nsha256:not-hex\n")
        (line,) = await reload(gw, tunnel, REFUSED)
        assert f"{tokens}:2: sha256: needs 64 hex digits" in line
        await accepted(f"{gw.address}?token=token-one")  # the old file still counts
        assert await refused_with(f"{gw.address}?token=token-two") == 403
    # the tunnel of the removed token-two ran on to the end: open connections keep their
    # grants


def _jwks(path: Path, kid: str, key: ed25519.Ed25519PrivateKey) -> None:
    jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    path.write_text(json.dumps({"keys": [{**jwk, "kid": kid, "use": "sig"}]}))


def _jwt(kid: str, key: ed25519.Ed25519PrivateKey) -> str:
    return jwt.encode({"sub": kid, "exp": time.time() + 300}, key, algorithm="EdDSA",
                      headers={"kid": kid})


async def test_jwks_file_reload(spawn_gateway: Spawn, tmp_path: Path,
                                echo_ports: list[int]) -> None:
    old, new = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    jwks = tmp_path / "jwks.json"
    _jwks(jwks, "old", old)
    gw = await spawn_gateway("--jwt-jwks", str(jwks))
    async with Streaming(f"{gw.address}?token={_jwt('old', old)}", echo_ports[0]) as tunnel:
        assert await refused_with(f"{gw.address}?token={_jwt('new', new)}") == 403
        _jwks(jwks, "new", new)
        await reload(gw, tunnel, "reloaded: jwt")
        await accepted(f"{gw.address}?token={_jwt('new', new)}")
        assert await refused_with(f"{gw.address}?token={_jwt('old', old)}") == 403

        jwks.write_text('{"keys": [')
        (line,) = await reload(gw, tunnel, REFUSED)
        assert line.rstrip().endswith(f"JWKS file {jwks}: not JSON")
        await accepted(f"{gw.address}?token={_jwt('new', new)}")


def _install(cert: trustme.LeafCert, chain: Path, key: Path) -> None:
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_tls_certificate_reload(spawn_gateway: Spawn, tmp_path: Path,
                                      echo_ports: list[int]) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    _install(old_ca.issue_cert("127.0.0.1"), chain, key)
    gw = await spawn_gateway("--tls-cert", str(chain), "--tls-key", str(key))
    assert gw.address.startswith("wss://")
    async with Streaming(gw.address, echo_ports[0], ssl_context=_trusting(old_ca)) as tunnel:
        _install(new_ca.issue_cert("127.0.0.1"), chain, key)
        await reload(gw, tunnel, "reloaded: tls")
        await echoes(gw.address, echo_ports[1], ssl_context=_trusting(new_ca))
        with pytest.raises(ssl.SSLCertVerificationError):  # the old one is no longer shown
            await kclient.connect(gw.address, ssl_context=_trusting(old_ca))

        new_ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(key))  # not its key
        (line,) = await reload(gw, tunnel, REFUSED)
        assert line.rstrip().endswith(f"tls_key {key} is not the private key of tls_cert "
                                      f"{chain}")
        await echoes(gw.address, echo_ports[1], ssl_context=_trusting(new_ca))


def test_a_certificate_that_does_not_load_is_one_line_at_start_up_too(tmp_path: Path) -> None:
    """The TLS checks a reload makes, in the same words, at start-up and in check-config."""
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    _install(trustme.CA().issue_cert("127.0.0.1"), chain, key)
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(key))
    mismatch = f"tls_key {key} is not the private key of tls_cert {chain}"
    assert startup_error("serve", "--port", "0", "--tls-cert", str(chain),
                         "--tls-key", str(key)) == mismatch
    config = tmp_path / "ksw1fast.toml"
    config.write_text(f'tls_cert = "{chain}"\ntls_key = "{tmp_path / "absent.pem"}"\n')
    assert startup_error("check-config", str(config)) == (
        f"{config}: tls_key {tmp_path / 'absent.pem'}: cannot read it: no such file or "
        "directory")
    key.write_text("not a key\n")
    assert startup_error("serve", "--port", "0", "--config", str(config), "--tls-key",
                         str(key)).startswith(f"tls_cert {chain} and tls_key {key}: not a PEM")
