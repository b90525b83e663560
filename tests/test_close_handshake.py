"""The WebSocket close handshake (protocol.md §11, RFC 6455 §5.5.1 and §7.4), byte for byte.

The answers are read off the socket as raw bytes (helpers.RawPeer: the `websockets`
library's sans-I/O protocol, an implementation nobody here wrote, driving a plain
socket), so every Close frame below, valid or not, really crosses the wire.
"""
from __future__ import annotations

import asyncio
import ssl
import struct

import pytest
import trustme
import websockets
from hypothesis import given, strategies as st
from websockets.frames import Opcode
from websockets.server import ServerProtocol

import ksw1fast
from ksw1fast import client as kclient
from ksw1fast import framing
from ksw1fast.protocol import payloads
from ksw1fast.protocol.close import MAX_REASON, close_reason, closed_code, may_send, reply_to_close

from helpers import RawPeer

pytestmark = pytest.mark.timeout(60)


def _close(code: int | None, reason: bytes = b"") -> bytes:
    """A Close frame as a server sends it (unmasked)."""
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return bytes([0x88, len(payload)]) + payload


def _invalid(code: int) -> bytes:
    return _close(1002, b"Received CLOSE with invalid close code: %d" % code)


# what the client's Close carries -> the exact frame the gateway answers with
CASES = {
    "empty": (b"", _close(None)),
    "1000": (struct.pack("!H", 1000), _close(1000)),
    "1001": (struct.pack("!H", 1001), _close(1001)),
    "3000": (struct.pack("!H", 3000), _close(3000)),
    "4999": (struct.pack("!H", 4999), _close(4999)),
    "0": (struct.pack("!H", 0), _invalid(0)),
    "999": (struct.pack("!H", 999), _invalid(999)),
    "1004": (struct.pack("!H", 1004), _invalid(1004)),
    "1005": (struct.pack("!H", 1005), _invalid(1005)),
    "1006": (struct.pack("!H", 1006), _invalid(1006)),
    "1015": (struct.pack("!H", 1015), _invalid(1015)),
    "2999": (struct.pack("!H", 2999), _invalid(2999)),
    "5000": (struct.pack("!H", 5000), _invalid(5000)),
    "non-utf8 reason": (struct.pack("!H", 1000) + b"\xff\xfe",
                        _close(1007, b"Received CLOSE with invalid UTF-8 reason")),
    "123-byte reason": (struct.pack("!H", 1000) + b"r" * 123, _close(1000)),
}


@pytest.fixture
async def peer(gateway: str):
    """A connected RawPeer to the `gateway` fixture (compiled and pure-Python)."""
    p = RawPeer(gateway)
    await p.upgrade()
    yield p
    p.close()


# -- the rules, as pure functions -----------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_reply_rule(name: str) -> None:
    received, answer = CASES[name]
    reply = reply_to_close(received)
    assert _close(reply.code, reply.reason) == answer


def test_one_byte_payload_is_a_protocol_error() -> None:
    assert reply_to_close(b"\x03").code == 1002


def test_may_send_is_rfc_6455() -> None:
    sendable = {c for c in range(0x10000) if may_send(c)}
    registered = set(range(1000, 1015)) - {1004, 1005, 1006}
    assert sendable == registered | set(range(3000, 5000))


@given(st.text())
def test_close_reason_fits_a_control_frame_and_stays_utf8(reason: str) -> None:
    encoded = close_reason(reason)
    assert len(encoded) <= MAX_REASON
    assert reason.encode().startswith(encoded)
    encoded.decode()  # never cut inside a character


def test_closed_code_for_logs_and_metrics() -> None:
    assert closed_code(1001, 1000) == 1001   # we closed first
    assert closed_code(None, 1000) == 1000   # the peer's code, echoed
    assert closed_code(None, 0) == 1005      # a Close without code (picows reads 0)
    assert closed_code(None, None) == 1006   # no Close at all


# -- on the wire, both implementations -------------------------------------------------

@pytest.mark.parametrize("name", CASES)
async def test_client_close_is_answered_exactly(peer: RawPeer, name: str) -> None:
    received, answer = CASES[name]
    await peer.send_frame(Opcode.CLOSE, received)
    assert await peer.read_frame() == answer
    assert await peer.at_eof()


async def test_server_close_waits_for_the_peers_close(peer: RawPeer) -> None:
    """A text message is closed with 1003; the socket stays open (so a client still
    sending gets the code, not a reset) until the client answers, then closes."""
    await peer.send_frame(Opcode.TEXT, b"hello")
    assert await peer.read_frame() == _close(1003, b"KSW1 is carried in binary messages only")
    await peer.send_frame(Opcode.BINARY, b"still sending")  # ignored, no reset
    assert not await peer.at_eof(timeout=0.5)
    await peer.send_frame(Opcode.CLOSE, struct.pack("!H", 1003))
    assert await peer.at_eof()


async def test_a_flooding_client_still_gets_the_close_code(gateway: str) -> None:
    """Protocol error while the client keeps sending: the code arrives, no reset."""
    async with websockets.connect(gateway, max_size=None) as ws:
        await ws.send(b"XXXX" + bytes(12))  # bad magic: 1002
        for _ in range(64):
            try:
                await ws.send(bytes(64 * 1024))
            except websockets.ConnectionClosed:
                break
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1002


async def test_unanswered_server_close_ends_after_the_timeout(monkeypatch) -> None:
    from ksw1fast.server import _relay  # the relay an in-process gateway runs

    monkeypatch.setattr(_relay, "CLOSE_TIMEOUT", 0.2)
    async with await ksw1fast.start_gateway(port=0) as gw:
        p = RawPeer(gw.address)
        await p.upgrade()
        await p.send_frame(Opcode.TEXT, b"x")
        assert (await p.read_frame())[2:4] == struct.pack("!H", 1003)
        assert await p.at_eof(timeout=5)
        p.close()


async def test_long_reasons_are_cut_to_fit(gw) -> None:
    """A server-side close whose reason is too long for a control frame goes out with
    the reason cut to 123 bytes."""
    p = RawPeer(gw.address)
    await p.upgrade()
    conn = next(iter(gw.connections))
    conn.fail(1008, "é" * 100)  # 200 bytes of UTF-8
    frame = await p.read_frame()
    assert frame[:4] == bytes([0x88, 2 + 122]) + struct.pack("!H", 1008)
    assert frame[4:] == ("é" * 61).encode()  # 122 bytes: the 62nd would not fit
    p.close()


async def test_gateway_shutdown_is_1001() -> None:
    gw = await ksw1fast.start_gateway(port=0)
    p = RawPeer(gw.address)
    await p.upgrade()
    closing = asyncio.ensure_future(gw.close())
    assert await p.read_frame() == _close(1001, b"gateway shutting down")
    await p.send_frame(Opcode.CLOSE, struct.pack("!H", 1001))
    assert await p.at_eof()
    await closing
    p.close()


# -- the Python client ---------------------------------------------------------------

async def test_python_client_close_is_1000_and_answered(gateway: str) -> None:
    c = await kclient.connect(gateway)
    await c.close()
    handshake = c.ws.close_handshake
    assert handshake.sent.code == 1000 and handshake.recv.code == 1000


@pytest.mark.parametrize("name", CASES)
async def test_python_client_answers_a_servers_close(name: str) -> None:
    """The client side of the same table: a raw server sends each Close."""
    received, answer = CASES[name]
    answered: asyncio.Future = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol = ServerProtocol()
        request = None
        while request is None:
            protocol.receive_data(await reader.read(65536))
            for request in protocol.events_received():
                pass
        protocol.send_response(protocol.accept(request))
        writer.write(b"".join(protocol.data_to_send()))
        hello = await reader.read(65536)  # the client's Hello (masked); answer HelloAck
        del hello
        ack = framing.encode_frame(0x02, 0, payloads.encode_hello_ack(0x2E, 64, 1 << 24, 1 << 20))
        writer.write(bytes([0x82, len(ack)]) + ack)
        writer.write(bytes([0x88, len(received)]) + received)
        await writer.drain()
        head = await reader.readexactly(2)
        mask = await reader.readexactly(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(
            await reader.readexactly(head[1] & 0x7F)))
        answered.set_result(bytes([head[0], head[1] & 0x7F]) + payload)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        c = await kclient.connect(f"ws://127.0.0.1:{port}/ws")
        assert await asyncio.wait_for(answered, 10) == answer
        await asyncio.wait_for(asyncio.shield(c.disconnected), 10)



@pytest.mark.parametrize("setup", ["default", "workers", "tls"])
async def test_websockets_library_close_through_workers_and_tls(spawn_gateway, tmp_path,
                                                                setup: str) -> None:
    """The `websockets` client (which fails a connection on any invalid close code)
    closes cleanly with 1000 against each way of serving."""
    args: list[str] = []
    ssl_context = None
    if setup == "workers":
        args = ["--workers", "2"]
    elif setup == "tls":
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "chain.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        args = ["--tls-cert", str(tmp_path / "chain.pem"), "--tls-key", str(tmp_path / "key.pem")]
        ssl_context = ssl.create_default_context()
        ca.configure_trust(ssl_context)
    gw = await spawn_gateway(*args)
    for _ in range(4):  # with two workers, the kernel spreads these over both
        async with websockets.connect(gw.address, ssl=ssl_context) as ws:
            await ws.send(framing.encode_frame(0xF0, 0, b"ping"))
            assert framing.FrameParser().feed(await ws.recv())[0].type == 0xF1
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
