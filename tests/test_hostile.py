"""Hostile clients: every attack runs while a control connection keeps echoing through
the same gateway, and must neither stall it nor grow the gateway without bound.

Loopback only; every loop is bounded in count and time.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

import psutil
import pytest
from websockets.frames import Opcode

from ksw1fast import codec
from ksw1fast.constants import FrameType, Proto

from helpers import ControlEcho, GatewayProcess, RawPeer, echo_handler, port_of, serve_tcp

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
    return codec.encode_frame(FrameType.HELLO, 0, codec.encode_hello(0x2E, 64))


def _many(count: int, frame: Callable[[int], bytes]) -> bytes:
    return b"".join(frame(i) for i in range(1, count + 1))


# Requests the gateway answers at once, as the messages an attacker repeats (after Hello).
REQUESTS = {
    # 1 MiB Pings, each answered by a 1 MiB Pong
    "ping": codec.encode_frame(FrameType.PING, 0, bytes(MiB)),
    # Opens with an unknown address kind: each answered at once by an OpenErr
    "open-err": _many(4096, lambda sid: codec.encode_frame(
        FrameType.OPEN, sid, codec.encode_open(Proto.TCP, 9, 80, b"x"))),
    # Pkcs11Requests without a module: malformed ones, answered at once by ProtocolError
    "pkcs11-err": _many(4096, lambda qid: codec.encode_frame(
        FrameType.PKCS11_REQUEST, qid, codec.encode_pkcs11_request(0x0000, b""))),
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
