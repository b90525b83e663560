"""An independent client: tests/node/ksw1_client.mjs speaks KSW1 on Node's `ws` package the
way the polyfill does, against real `ksw1fast serve` processes (defaults, two workers,
TLS), each with token auth and a SoftHSM2 token, for both feature sets the polyfill asks
for. The targets it reaches run here, on 127.0.0.1."""
from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import trustme

from helpers import GatewayProcess, SoftHSM, echo_handler, make_softhsm, port_of, serve_tcp

pytestmark = [pytest.mark.node, pytest.mark.softhsm, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = Path(__file__).resolve().parent / "node"
TOKEN = "node-client-token"
LABEL = "ksw1fast-node"
GREETING = b"hello from the target\n"          # what ksw1_client.mjs expects of --greeting
AFTER_EOF = 100 * 1024                         # what it writes after the target's EOF


@dataclass(frozen=True)
class Gateway:
    url: str
    ca: str | None = None


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHSM:
    """A token store of these tests' own."""
    return make_softhsm(tmp_path_factory.mktemp("node-softhsm"), LABEL)


@pytest.fixture(scope="module", params=["default", "workers", "tls"])
def gateway(request: pytest.FixtureRequest, softhsm: SoftHSM,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp(f"node-{request.param}")
    (folder / "tokens").write_text(f"{TOKEN}\n")
    args = ["--token-file", str(folder / "tokens")]
    ca_file = None
    if request.param == "workers":
        args += ["--workers", "2"]
    elif request.param == "tls":
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(folder / "chain.pem"))
        cert.private_key_pem.write_to_path(str(folder / "key.pem"))
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        args += ["--tls-cert", str(folder / "chain.pem"), "--tls-key", str(folder / "key.pem")]
        ca_file = str(folder / "ca.pem")
    proc = GatewayProcess(*args, env={"PKCS11_LIB": softhsm.module, **softhsm.env})
    try:
        if request.param == "workers":  # the address comes from the first; wait for both
            deadline = time.monotonic() + 30
            while "".join(proc.log).count("ksw1fast serving") < 2:
                assert time.monotonic() < deadline, "second worker did not start:\n" + \
                    "".join(proc.log)
                time.sleep(0.1)
        yield Gateway(proc.address, ca_file)
    finally:
        proc.stop()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


@dataclass
class Targets:
    ports: dict[str, int] = field(default_factory=dict)
    after_eof: list[int] = field(default_factory=list)  # bytes the early-EOF target read

    async def greeting(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        await echo_handler(reader, writer)

    async def sink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode())
        await writer.drain()
        writer.close()

    async def early_eof(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye\n")
        writer.write_eof()
        self.after_eof.append(len(await reader.read()))
        writer.close()


@pytest.fixture
async def targets() -> AsyncIterator[Targets]:
    found = Targets()
    servers = {"echo": await serve_tcp(echo_handler), "greeting": await serve_tcp(found.greeting),
               "sink": await serve_tcp(found.sink), "early-eof": await serve_tcp(found.early_eof)}
    found.ports = {name: port_of(server) for name, server in servers.items()}
    udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        _UdpEcho, local_addr=("127.0.0.1", 0))
    found.ports["udp"] = udp.get_extra_info("sockname")[1]
    try:
        yield found
    finally:
        udp.close()
        for server in servers.values():
            server.close()


def node_client() -> list[str]:
    """The command that runs the client; fails (not skips) when Node or `ws` is missing."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "ws" / "package.json").is_file():
        pytest.fail("Node.js or tests/node/node_modules is missing: run scripts/node.sh")
    return [node, str(NODE_DIR / "ksw1_client.mjs")]


@pytest.mark.parametrize("features", [0x2E, 0x2F], ids=["0x2e", "0x2f"])
async def test_node_ws_client(gateway: Gateway, targets: Targets, features: int) -> None:
    args = [f"--url={gateway.url}", f"--token={TOKEN}", f"--features={features:#x}",
            "--dns-name=localhost", "--dns-address=127.0.0.1",
            f"--pkcs11-label={LABEL}", f"--pkcs11-pin={SoftHSM.user_pin.decode()}",
            *(f"--{name}={port}" for name, port in targets.ports.items())]
    if gateway.ca:
        args.append(f"--ca={gateway.ca}")
    proc = await asyncio.create_subprocess_exec(
        *node_client(), *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:  # the client bounds itself at 60 s; this bounds a Node that never starts it
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the Node client did not exit within 90 s")
    assert proc.returncode == 0, \
        f"the Node client exited {proc.returncode}:\n{err.decode()}{out.decode()}"
    for _ in range(50):  # the target may still be reading when the client is done
        if targets.after_eof:
            break
        await asyncio.sleep(0.1)
    assert targets.after_eof == [AFTER_EOF], "bytes written after the target's EOF were lost"
