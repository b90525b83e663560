"""Hostile clients: every attack runs while a control connection keeps echoing through
the same gateway, and must neither stall it nor grow the gateway without bound.

Loopback only; every loop is bounded in count and time.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator, Callable

import psutil
import pytest
import websockets
from websockets.frames import Opcode

from ksw1fast import client as kclient
from ksw1fast import framing
from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import FrameType, Proto
from ksw1fast.pkcs11.wire import FUNCTION_IDS, Reader, Writer

from helpers import (ControlEcho, GatewayProcess, RawPeer, echo_handler, make_softhsm, port_of,
                     serve_tcp)

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
SEND_TIMEOUT = 2  # --send-timeout of the gateways here


@pytest.fixture(params=["compiled", "pure-python"])
async def hostile_gateway(request: pytest.FixtureRequest) -> AsyncIterator[GatewayProcess]:
    """A gateway process (so its memory can be measured) with a short send timeout."""
    env = {"KSW1FAST_NO_EXTENSIONS": "1"} if request.param == "pure-python" else {}
    proc = await asyncio.to_thread(GatewayProcess, "--send-timeout", str(SEND_TIMEOUT), env=env)
    yield proc
    await asyncio.to_thread(proc.stop)


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async with await serve_tcp(echo_handler) as server:
        yield port_of(server)


def _hello() -> bytes:
    return framing.encode_frame(FrameType.HELLO, 0, payloads.encode_hello(0x2E, 64))


def _many(count: int, frame: Callable[[int], bytes]) -> bytes:
    return b"".join(frame(i) for i in range(1, count + 1))


# Requests the gateway answers at once, as the messages an attacker repeats (after Hello).
REQUESTS = {
    # 1 MiB Pings, each answered by a 1 MiB Pong
    "ping": framing.encode_frame(FrameType.PING, 0, bytes(MiB)),
    # Opens with an unknown address kind: each answered at once by an OpenErr
    "open-err": _many(4096, lambda sid: framing.encode_frame(
        FrameType.OPEN, sid, payloads.encode_open(Proto.TCP, 9, 80, b"x"))),
    # Pkcs11Requests without a module: malformed ones, answered at once by ProtocolError
    "pkcs11-err": _many(4096, lambda qid: framing.encode_frame(
        FrameType.PKCS11_REQUEST, qid, payloads.encode_pkcs11_request(0x0000, b""))),
}


@pytest.mark.parametrize("request_kind", REQUESTS)
async def test_replies_a_client_does_not_read_are_bounded(
        hostile_gateway: GatewayProcess, echo_port: int, request_kind: str) -> None:
    """A client that keeps asking and never reads: once its unread replies pass the send
    buffer limit the gateway stops reading it (its sends block), its memory stays
    bounded, and after --send-timeout it is closed with 1008."""
    gateway = psutil.Process(hostile_gateway.pid)
    async with ControlEcho(hostile_gateway.address, echo_port):
        before = gateway.memory_info().rss
        attacker = RawPeer(hostile_gateway.address)
        await attacker.upgrade()
        await attacker.send_frame(Opcode.BINARY, _hello())
        sent = await attacker.flood(REQUESTS[request_kind], count=600)
        grown = gateway.memory_info().rss - before
        assert sent < 600, "the gateway never stopped reading the attacker"
        assert grown < 48 * MiB, f"gateway grew by {grown / MiB:.0f} MiB"
        await asyncio.sleep(SEND_TIMEOUT + 0.5)
        assert await attacker.close_code() == 1008
        attacker.close()


def test_a_hung_resolver_degrades_only_lookups(tmp_path) -> None:
    """Names whose DNS server never answers hang only their own lookups: Opens of
    literals, round trips and /etc/hosts lookups of other clients go on, and every
    lookup slot is free again once c-ares gives up. Runs tests/netns_hung_resolver.py
    in a network namespace with only loopback and a resolv.conf of its own (as root:
    unshare and a bind mount), so no query can leave the machine."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\n")
    scenario = Path(__file__).with_name("netns_hung_resolver.py")
    done = subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c",
         f'mount --bind "{resolv}" /etc/resolv.conf && exec "{sys.executable}" "{scenario}"'],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.softhsm
async def test_pipelined_pkcs11_answers_a_client_does_not_read_are_bounded(
        tmp_path: Path, echo_port: int) -> None:
    """1000 pipelined GenerateRandom(1 MiB) without reading: at most --pkcs11-max-calls
    are in flight (the rest are answered Internal at once), the gateway stops reading
    once the answers pass the send buffer limit, and its memory stays bounded."""
    store = make_softhsm(tmp_path, "hostile")
    proc = await asyncio.to_thread(GatewayProcess, "--pkcs11-lib", store.module,
                                   "--send-timeout", str(SEND_TIMEOUT), env=store.env)
    try:
        gateway = psutil.Process(proc.pid)
        async with ControlEcho(proc.address, echo_port):
            attacker = RawPeer(proc.address)
            await attacker.upgrade()
            await attacker.send_frame(Opcode.BINARY, _hello())
            session = await _open_session(attacker)
            before = gateway.memory_info().rss
            random = Writer().u32(session).u32(MiB).getvalue()
            burst = _many(50, lambda qid: framing.encode_frame(
                FrameType.PKCS11_REQUEST, qid, payloads.encode_pkcs11_request(
                    FUNCTION_IDS["GenerateRandom"], random)))
            sent = await attacker.flood(burst, count=20)  # 1000 requests
            await asyncio.sleep(3)  # the agent answers what it took
            grown = gateway.memory_info().rss - before
            assert grown < 64 * MiB, f"gateway grew by {grown / MiB:.0f} MiB ({sent} bursts)"
            await asyncio.sleep(SEND_TIMEOUT + 0.5)
            assert await attacker.close_code() == 1008
            attacker.close()
    finally:
        await asyncio.to_thread(proc.stop)


async def _open_session(peer: RawPeer) -> int:
    """A session on the token's slot, through the raw client (it reads the answers)."""
    parser = framing.FrameParser()
    answers: list = []

    async def call(qid: int, fn: str, args: bytes) -> Reader:
        await peer.send_frame(Opcode.BINARY, framing.encode_frame(
            FrameType.PKCS11_REQUEST, qid, payloads.encode_pkcs11_request(FUNCTION_IDS[fn], args)))
        while not answers:
            answers.extend(f for f in parser.feed(await peer.recv_message())
                           if f.type == FrameType.PKCS11_RESPONSE)
        response = payloads.decode_pkcs11_response(bytes(answers.pop(0).payload))
        assert response.status == 0, response
        return Reader(response.body)

    await peer.recv_message()  # HelloAck
    slot = (await call(1, "GetSlotList", Writer().bool(True).getvalue())).list(Reader.u64)[0]
    return (await call(2, "OpenSession", Writer().u32(slot).u32(0x3).getvalue())).u32()


async def test_a_connection_flood_meets_the_limits(echo_port: int) -> None:
    """300 WebSockets from one address against a per-address limit of 50: the rest are
    answered 503 at the handshake, and the control connection (already in) never waits."""
    proc = await asyncio.to_thread(GatewayProcess, "--max-connections-per-ip", "50")
    try:
        async with ControlEcho(proc.address, echo_port):
            statuses: list[int] = []
            held = []
            for _ in range(300):
                try:
                    held.append(await websockets.connect(proc.address))
                    statuses.append(101)
                except websockets.InvalidStatus as refused:
                    statuses.append(refused.response.status_code)
            assert statuses.count(101) == 49  # the control connection is the 50th
            assert statuses.count(503) == 251
            for ws in held:
                await ws.close()
    finally:
        await asyncio.to_thread(proc.stop)


@pytest.mark.softhsm
async def test_pkcs11_agents_are_capped_per_worker(tmp_path: Path, echo_port: int) -> None:
    """12 connections each make a PKCS#11 call against --pkcs11-max-agents 3: at most 3
    agent processes run, the other calls are refused at once, the control echoes on."""
    store = make_softhsm(tmp_path, "hostile-agents")
    proc = await asyncio.to_thread(GatewayProcess, "--pkcs11-lib", store.module,
                                   "--pkcs11-max-agents", "3", env=store.env)
    try:
        async with ControlEcho(proc.address, echo_port):
            clients = [await kclient.connect(proc.address) for _ in range(12)]
            answers = await asyncio.gather(*(c.pkcs11(FUNCTION_IDS["GetInfo"]) for c in clients))
            agents = [p for p in psutil.Process(proc.pid).children(recursive=True)
                      if "ksw1fast.pkcs11.agent" in " ".join(p.cmdline())]
            assert len(agents) <= 3
            assert sum(a.status == 0 for a in answers) <= 3
            assert all(a.status == 0 or b"agent limit" in a.body for a in answers), answers
            for c in clients:
                await c.close()
    finally:
        await asyncio.to_thread(proc.stop)
