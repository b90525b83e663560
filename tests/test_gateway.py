"""End-to-end behaviour of the gateway with real loopback targets (protocol.md §3-§8)."""
from __future__ import annotations

import asyncio
import os
import socket
from typing import Iterator

import pytest

import ksw1fast
from ksw1fast import client as kclient
from ksw1fast import framing
from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import (AddrKind, DnsErrCode, Feature, FrameType, OpenErrCode,
                                Pkcs11Status, Proto)
from ksw1fast.protocol.errors import DnsError, OpenError

from helpers import RawClient, port_of, serve_tcp

pytestmark = pytest.mark.timeout(60)


async def test_hello_ack_intersects_features_and_limits(connect) -> None:
    client = await connect(features=0x2E, max_streams=64)  # the polyfill's request
    # Pkcs11 is granted even without a module: calls get a clear Internal error
    assert client.features == Feature.HALF_CLOSE | Feature.DNS | Feature.UDP | Feature.PKCS11
    assert client.max_streams == 64
    assert client.hello_ack.max_payload == 16 * 1024 * 1024
    other = await connect(features=0xFF, max_streams=0)
    assert other.max_streams == 256  # 0 means "client default", protocol.md §3


async def test_one_mebibyte_echo(connect, echo_port) -> None:
    client = await connect()
    stream = await client.open_connection("127.0.0.1", echo_port)
    assert stream.info is not None and stream.info.peer.port == echo_port
    payload = os.urandom(1024 * 1024)
    stream.write(payload)
    await stream.drain()
    assert await stream.readexactly(len(payload)) == payload
    await stream.close()


async def test_server_first_greeting(connect) -> None:
    async def greet(reader, writer):
        writer.write(b"220 hello from target\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    async with await serve_tcp(greet) as server:
        client = await connect()
        stream = await client.open_connection("localhost", port_of(server))
        assert await stream.readexactly(23) == b"220 hello from target\r\n"
        await stream.close()


async def test_target_fin_then_client_keeps_writing(connect) -> None:
    """Target half-closes first: Data+EOF reaches us and our writes still arrive."""
    received = asyncio.get_running_loop().create_future()

    async def speak_then_listen(reader, writer):
        writer.write(b"bye")
        writer.write_eof()
        received.set_result(await reader.read())
        writer.close()

    async with await serve_tcp(speak_then_listen) as server:
        client = await connect()
        stream = await client.open_connection("127.0.0.1", port_of(server))
        assert await stream.read_until_eof() == b"bye"
        stream.write(b"still talking")
        stream.write_eof()
        assert await asyncio.wait_for(received, 10) == b"still talking"
        assert await asyncio.wait_for(stream.wait_closed(), 10) == 0


async def test_client_eof_shuts_down_target_write_side(connect) -> None:
    """Client half-closes first: the target reads EOF after all data, then still answers."""
    async def read_all_then_reply(reader, writer):
        data = await reader.read()  # returns at EOF only
        writer.write(b"got %d" % len(data))
        await writer.drain()
        writer.close()

    async with await serve_tcp(read_all_then_reply) as server:
        client = await connect()
        stream = await client.open_connection("127.0.0.1", port_of(server))
        stream.write(b"x" * 300_000)
        stream.write_eof()
        assert await stream.read_until_eof() == b"got 300000"


async def test_refused_port(connect) -> None:
    with socket.socket() as s:  # bound, never listening: connect is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        client = await connect()
        with pytest.raises(OpenError) as info:
            await client.open_connection("127.0.0.1", port)
    assert info.value.code == OpenErrCode.CONN_REFUSED


async def test_unresolvable_name_is_resolve_fail(connect) -> None:
    client = await connect()
    with pytest.raises(OpenError) as info:
        await client.open_connection("no-such-host.invalid", 80)
    assert info.value.code == OpenErrCode.RESOLVE_FAIL


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _has_ipv6_loopback()


@pytest.mark.parametrize("family,host", [
    (socket.AF_INET, "127.0.0.1"),
    pytest.param(socket.AF_INET6, "::1", marks=pytest.mark.skipif(
        not HAS_IPV6, reason="this machine has no IPv6 loopback (::1)")),
])
@pytest.mark.parametrize("addr_kind", [AddrKind.HOSTNAME, "binary"])
async def test_ip_literals(connect, family, host, addr_kind) -> None:
    """IPv4/IPv6 as text (what the polyfill sends) and as raw address bytes."""
    async def echo(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, host, 0, family=family)
    async with server:
        client = await connect()
        if addr_kind == "binary":
            kind = AddrKind.IPV4 if family == socket.AF_INET else AddrKind.IPV6
            addr = socket.inet_pton(family, host)
        else:
            kind, addr = AddrKind.HOSTNAME, host.encode()
        stream = await client.open_stream(payloads.encode_open(Proto.TCP, kind, port_of(server), addr))
        assert stream.info.peer.host == host
        stream.write(b"ping")
        assert await stream.readexactly(4) == b"ping"


async def test_bad_ipv4_bytes_are_resolve_fail(connect) -> None:
    client = await connect()
    with pytest.raises(OpenError) as info:
        await client.open_stream(payloads.encode_open(Proto.TCP, AddrKind.IPV4, 80, b"\x7f\x00"))
    assert info.value.code == OpenErrCode.RESOLVE_FAIL


async def test_32_streams_interleaved(connect, echo_port) -> None:
    client = await connect()
    streams = await asyncio.gather(*(client.open_connection("127.0.0.1", echo_port)
                                     for _ in range(32)))
    payloads = [os.urandom(64 * 1024) for _ in streams]
    for offset in range(0, 64 * 1024, 4096):  # interleave small writes across all streams
        for stream, payload in zip(streams, payloads):
            stream.write(payload[offset:offset + 4096])
    await client.drain()
    results = await asyncio.gather(*(s.readexactly(64 * 1024) for s in streams))
    assert results == payloads
    await asyncio.gather(*(s.close() for s in streams))


async def test_same_id_as_stream_dns_and_pkcs11(connect, echo_port) -> None:
    """Id 1 in all three spaces at once (what the polyfill does): each gets its own answer."""
    client = await connect()
    assert client._next == {"stream": 1, "dns": 1, "pkcs11": 1}
    stream_task = asyncio.ensure_future(client.open_connection("127.0.0.1", echo_port))
    dns_task = asyncio.ensure_future(client.resolve("localhost", 4))
    p11_task = asyncio.ensure_future(client.pkcs11(0x0000, b"\x01"))
    stream, addresses, response = await asyncio.gather(stream_task, dns_task, p11_task)
    assert stream.stream_id == 1
    assert addresses == ["127.0.0.1"]
    assert response.status == Pkcs11Status.INTERNAL
    stream.write(b"abc")
    assert await stream.readexactly(3) == b"abc"


async def test_frames_coalesced_and_split_across_messages(gateway, echo_port) -> None:
    async with RawClient(gateway) as raw:
        await raw.hello()
        open_frame = framing.encode_frame(FrameType.OPEN, 7, payloads.encode_open(
            Proto.TCP, AddrKind.HOSTNAME, echo_port, b"127.0.0.1"))
        wire = open_frame + framing.encode_frame(FrameType.PING, 0, b"p1")
        await raw.send(wire[:5])        # split inside the header
        await raw.send(wire[5:20])
        await raw.send(wire[20:])       # the rest of Open and a whole Ping, coalesced
        answers = {f.type: f for f in await raw.frames(2)}
        assert answers[FrameType.OPEN_OK].stream_id == 7
        assert answers[FrameType.PONG].payload == b"p1"
        data = (framing.encode_frame(FrameType.DATA, 7, b"hello ")
                + framing.encode_frame(FrameType.DATA, 7, b"world"))
        await raw.send(data[:3])
        await raw.send(data[3:])
        echoed = b""
        while len(echoed) < 11:
            (frame,) = await raw.frames(1)
            assert (frame.type, frame.stream_id) == (FrameType.DATA, 7)
            echoed += frame.payload
        assert echoed == b"hello world"


async def test_ping_pong_same_payload(connect) -> None:
    client = await connect()
    assert await client.ping(b"\x00\x01 payload") == b"\x00\x01 payload"
    assert await client.ping() == b""


async def test_dns_query(connect) -> None:
    client = await connect()
    assert "127.0.0.1" in await client.resolve("localhost")
    assert await client.resolve("127.0.0.1", 4) == ["127.0.0.1"]
    if HAS_IPV6:
        assert await client.resolve("::1", 6) == ["::1"]
    with pytest.raises(DnsError) as info:
        await client.resolve("no-such-host.invalid")
    assert info.value.code == DnsErrCode.NX_DOMAIN
    with pytest.raises(DnsError) as info:
        await client.resolve("localhost", family=9)
    assert info.value.code == DnsErrCode.FORMAT_ERROR  # family 9


async def test_pkcs11_without_module_is_internal(connect) -> None:
    client = await connect()
    response = await client.pkcs11(0x0009)
    assert response.status == Pkcs11Status.INTERNAL
    assert response.body[4:] == b"no PKCS#11 module configured"


@pytest.mark.parametrize("fn_id, args, message", [
    (0x0000, b"", b"malformed GetSlotList args: "),        # the bool is missing
    (0x0004, b"\x00" * 9, b"malformed OpenSession args: "),  # a byte too many
    (0x4242, b"", b"unknown fn id 0x4242"),
])
async def test_pkcs11_without_module_validates_first(connect, fn_id: int, args: bytes,
                                                     message: bytes) -> None:
    """A malformed request is a ProtocolError with a module or without one."""
    client = await connect()
    response = await client.pkcs11(fn_id, args)
    assert response.status == Pkcs11Status.PROTOCOL_ERROR
    assert response.body[4:].startswith(message)


async def test_target_close_is_eof_and_client_close_is_acked(connect) -> None:
    async def close_at_once(reader, writer):
        writer.close()

    async with await serve_tcp(close_at_once) as server:
        client = await connect()
        stream = await client.open_connection("127.0.0.1", port_of(server))
        # a FIN looks like a half-close until we write: EOF, and the stream stays ours
        assert await stream.read_until_eof() == b""
        await asyncio.wait_for(stream.close(), 10)  # Close -> CloseAck
        assert stream.close_reason == 0


async def test_too_many_streams(connect, echo_port) -> None:
    client = await connect(max_streams=2)
    await client.open_connection("127.0.0.1", echo_port)
    await client.open_connection("127.0.0.1", echo_port)
    with pytest.raises(OpenError) as info:
        await client.open_connection("127.0.0.1", echo_port)
    assert info.value.code == OpenErrCode.TOO_MANY_STREAMS


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A listener whose accept queue is full: it drops SYNs, a connect to it hangs."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue (never accepted)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(full.getsockname())
            fillers.append(s)
        yield full.getsockname()[1]
    finally:
        for s in fillers:
            s.close()
        full.close()


async def test_connect_timeout_is_timeout(unanswered_port: int) -> None:
    import ksw1fast
    from ksw1fast import client as kclient

    async with await ksw1fast.start_gateway(port=0, connect_timeout=1.0) as gw:
        client = await kclient.connect(gw.address)
        with pytest.raises(OpenError) as info:
            await client.open_connection("127.0.0.1", unanswered_port)
        assert info.value.code == OpenErrCode.TIMEOUT
        await client.close()


async def test_close_while_connecting_ends_the_open(unanswered_port: int) -> None:
    """The client's Close wins over the connect: CloseAck, and no OpenErr at the timeout."""
    import ksw1fast

    async with await ksw1fast.start_gateway(port=0, connect_timeout=0.3) as gw:
        async with RawClient(gw.address) as raw:
            await raw.hello()
            await raw.send(framing.encode_frame(FrameType.OPEN, 1, payloads.encode_open(
                Proto.TCP, AddrKind.HOSTNAME, unanswered_port, b"127.0.0.1")))
            await asyncio.sleep(0.1)
            await raw.send(framing.encode_frame(FrameType.CLOSE, 1, payloads.encode_close()))
            (ack,) = await raw.frames(1)
            assert (ack.type, ack.stream_id) == (FrameType.CLOSE_ACK, 1)
            with pytest.raises(asyncio.TimeoutError):
                await raw.frames(1, timeout=0.6)  # past connect_timeout: nothing more comes


async def test_a_reused_stream_id_keeps_its_connect_timeout(unanswered_port: int) -> None:
    """Close(1) and a new Open(1) in one message: the new open still times out."""
    import ksw1fast

    open_1 = framing.encode_frame(FrameType.OPEN, 1, payloads.encode_open(
        Proto.TCP, AddrKind.HOSTNAME, unanswered_port, b"127.0.0.1"))
    async with await ksw1fast.start_gateway(port=0, connect_timeout=0.3) as gw:
        async with RawClient(gw.address) as raw:
            await raw.hello()
            await raw.send(open_1)
            await asyncio.sleep(0.1)
            await raw.send(framing.encode_frame(FrameType.CLOSE, 1, payloads.encode_close()) + open_1)
            ack, err = await raw.frames(2, timeout=5)
            assert (ack.type, ack.stream_id) == (FrameType.CLOSE_ACK, 1)
            assert (err.type, err.stream_id) == (FrameType.OPEN_ERR, 1)
            assert payloads.decode_open_err(err.payload).code == OpenErrCode.TIMEOUT
            (conn,) = gw.connections
            assert not conn.streams and not conn._tasks  # the slot is free again


async def test_dns_timeout_is_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup that hangs is answered DnsErr Timeout after dns_timeout, and abandoned."""
    import ksw1fast
    from ksw1fast import client as kclient
    from ksw1fast.security import resolve

    real_lookup = resolve.Resolver.lookup
    hung: list[asyncio.Future] = []

    async def lookup(self: resolve.Resolver, name: str, port: int = 0, family: int = 0) -> list:
        if name != "slow.example":
            return await real_lookup(self, name, port, family)
        hung.append(asyncio.get_running_loop().create_future())
        return await hung[-1]

    monkeypatch.setattr(resolve.Resolver, "lookup", lookup)
    async with await ksw1fast.start_gateway(port=0, dns_timeout=0.3) as gw:
        client = await kclient.connect(gw.address)
        started = asyncio.get_running_loop().time()
        slow = asyncio.ensure_future(client.resolve("slow.example"))
        assert await client.resolve("127.0.0.1", 4) == ["127.0.0.1"]  # others go on meanwhile
        with pytest.raises(DnsError) as info:
            await slow
        assert info.value.code == DnsErrCode.TIMEOUT
        assert 0.25 < asyncio.get_running_loop().time() - started < 5
        await asyncio.sleep(0)
        assert hung[0].cancelled()  # the lookup was given up, not left running
        assert await client.resolve("localhost", 4) == ["127.0.0.1"]
        await client.close()


async def test_handshake_timeout_drops_silent_sockets() -> None:
    import ksw1fast

    async with await ksw1fast.start_gateway(port=0, handshake_timeout=0.5) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without a request
        writer.close()


async def test_gateway_close_sends_going_away(echo_port) -> None:
    import ksw1fast

    gw = await ksw1fast.start_gateway(port=0)
    async with RawClient(gw.address) as raw:
        await raw.hello()
        await gw.close()
        assert await raw.close_code() == 1001


async def test_reads_grow_so_large_transfers_use_few_frames(gw) -> None:
    """Target reads start small and double while they fill: 4 MiB must not take 256 frames."""
    total = 4 * 1024 * 1024

    async def blast(reader, writer):
        writer.write(bytes(total))
        await writer.drain()
        writer.close()

    async with await serve_tcp(blast) as server:
        async with RawClient(gw.address) as raw:
            await raw.hello()
            await raw.send(framing.encode_frame(FrameType.OPEN, 1, payloads.encode_open(
                Proto.TCP, AddrKind.HOSTNAME, port_of(server), b"127.0.0.1")))
            sizes = []
            while sum(sizes) < total:
                (frame,) = await raw.frames(1)
                if frame.type == FrameType.DATA:
                    sizes.append(len(frame.payload))
    assert max(sizes) > 64 * 1024
    assert len(sizes) < total // (16 * 1024) // 2


async def test_keepalive_is_on_by_default() -> None:
    assert ksw1fast.GatewayConfig().idle_ping == 20


async def _upgraded(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket on a plain TCP stream: nothing answers pings unless the test does."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def test_keepalive_pings_a_silent_client_and_keeps_one_that_answers() -> None:
    """RFC 6455 pings (opcode 0x9) to a silent client; a client answering each with a
    pong (masked, as clients send) stays connected for many ping periods."""
    async with await ksw1fast.start_gateway(port=0, idle_ping=0.2) as gw:
        reader, writer = await _upgraded(gw.port)
        for _ in range(6):
            head = await asyncio.wait_for(reader.readexactly(2), 5)
            assert head == b"\x89\x00"  # FIN + PING, empty
            writer.write(b"\x8a\x80" + bytes(4))  # PONG, masked with a zero key
        assert len(gw.connections) == 1
        writer.close()


async def test_keepalive_closes_a_client_that_does_not_answer() -> None:
    async with await ksw1fast.start_gateway(port=0, idle_ping=0.2) as gw:
        reader, writer = await _upgraded(gw.port)
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x89\x00"
        head = await asyncio.wait_for(reader.readexactly(2), 5)
        assert head[0] == 0x88  # Close 1001 "no answer to ping"
        assert await reader.readexactly(head[1]) == b"\x03\xe9no answer to ping"
        writer.close()


async def test_keepalive_off() -> None:
    async with await ksw1fast.start_gateway(port=0, idle_ping=0) as gw:
        reader, writer = await _upgraded(gw.port)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 1)
        writer.close()


# payloads are str(i) * size for 32 streams: 8 -> one batch; 1000 -> 54 KB of frames that
# overflow a 32 KiB batch; 1500 -> frames of 3000 B (too big to batch) between batched ones
@pytest.mark.parametrize("size", [8, 1000, 1500])
async def test_small_frames_ready_together_share_messages(gw, size: int) -> None:
    """The compiled relay sends the small frames of one loop iteration together."""
    count = 32
    writers: list[asyncio.StreamWriter] = []
    connected = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        if len(writers) == count:
            connected.set()
        await reader.read()

    target = await serve_tcp(hold)
    async with target, RawClient(gw.address) as raw:
        await raw.hello()
        opens = b"".join(framing.encode_frame(FrameType.OPEN, sid, payloads.encode_open(
            Proto.TCP, AddrKind.IPV4, port_of(target), socket.inet_aton("127.0.0.1")))
            for sid in range(1, count + 1))
        await raw.send(opens)
        assert {f.type for f in await raw.frames(count)} == {FrameType.OPEN_OK}
        await asyncio.wait_for(connected.wait(), 10)
        for i, writer in enumerate(writers):  # all targets readable in one iteration
            writer.write(b"%d" % i * size)
        messages, frames = 0, []
        while len(frames) < count:
            message = await asyncio.wait_for(raw.ws.recv(), 10)
            messages += 1
            frames += raw.parser.feed(message)
        assert sorted(bytes(f.payload) for f in frames) == sorted(
            b"%d" % i * size for i in range(count))
        assert messages < count
        for writer in writers:
            writer.close()


async def test_open_and_dns_rate_per_connection() -> None:
    """--max-open-rate: Opens and DnsQueries share one bucket per connection; beyond it
    OpenErr TooManyStreams and DnsErr Refused, while other connections are unaffected."""
    async with await ksw1fast.start_gateway(port=0, max_open_rate=4) as gw:
        greedy = await kclient.connect(gw.address)
        answers = await asyncio.gather(
            *(greedy.resolve("127.0.0.1", 4) for _ in range(3)),
            *(greedy.open_connection("127.0.0.1", 9) for _ in range(3)),
            return_exceptions=True)
        refused = [a for a in answers if isinstance(a, (OpenError, DnsError))
                   and a.code in (OpenErrCode.TOO_MANY_STREAMS, DnsErrCode.REFUSED)]
        assert len(refused) == 2, answers  # 4 a second, 6 asked at once
        other = await kclient.connect(gw.address)
        assert await other.resolve("127.0.0.1", 4) == ["127.0.0.1"]
        await greedy.close()
        await other.close()
