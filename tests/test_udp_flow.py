"""UDP flows (protocol.md §7) and FlowControl credits (protocol.md §6)."""
from __future__ import annotations

import asyncio

import psutil
import pytest

from ksw1fast import client as kclient
from ksw1fast import framing
from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import AddrKind, Feature, FrameType, Proto

from helpers import GatewayProcess, RawClient, port_of, serve_tcp

pytestmark = pytest.mark.timeout(120)


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


@pytest.fixture
async def udp_echo_port():
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        _UdpEcho, local_addr=("127.0.0.1", 0))
    yield transport.get_extra_info("sockname")[1]
    transport.close()


def _open_udp(stream_id: int, port: int) -> bytes:
    return framing.encode_frame(FrameType.OPEN, stream_id, payloads.encode_open(
        Proto.UDP, AddrKind.HOSTNAME, port, b"127.0.0.1"))


async def test_udp_datagrams_keep_their_boundaries(gateway, udp_echo_port) -> None:
    async with RawClient(gateway) as raw:
        await raw.hello(features=0x2E)
        await raw.send(_open_udp(1, udp_echo_port))
        (ok,) = await raw.frames(1)
        assert ok.type == FrameType.OPEN_OK
        datagrams = [b"\x01", bytes(range(100)), bytes(1200)]
        for d in datagrams:
            await raw.send(framing.encode_frame(FrameType.DATA, 1, d))
        frames = await raw.frames(3)
        assert [(f.type, f.stream_id) for f in frames] == [(FrameType.DATA, 1)] * 3
        assert sorted(f.payload for f in frames) == sorted(datagrams)
        await raw.send(framing.encode_frame(FrameType.CLOSE, 1, payloads.encode_close(0)))
        (ack,) = await raw.frames(1)
        assert (ack.type, ack.stream_id) == (FrameType.CLOSE_ACK, 1)


async def test_udp_with_the_client_and_oversized_datagrams(gw, udp_echo_port) -> None:
    client = await kclient.connect(gw.address)
    flow = await client.open_udp("127.0.0.1", udp_echo_port)
    flow.send(bytes(65508))          # one byte over the UDP limit: dropped and counted
    flow.send(b"small")
    assert await asyncio.wait_for(flow.recv(), 10) == b"small"
    (conn,) = list(gw.connections)
    assert conn.streams[flow.stream_id].dropped == 1
    await flow.close()
    await client.close()


async def test_flow_control_is_negotiated(connect) -> None:
    client = await connect(features=0x2F)
    assert client.features & Feature.FLOW_CONTROL
    assert client.hello_ack.initial_credit == 1024 * 1024
    assert client.flow_control


async def test_overrunning_the_credit_closes_the_stream(gateway) -> None:
    held = []

    async def hold(reader, writer):
        held.append(writer)

    async with await serve_tcp(hold) as target, RawClient(gateway) as raw:
        await raw.hello(features=0x2F)
        await raw.send(framing.encode_frame(FrameType.OPEN, 1, payloads.encode_open(
            Proto.TCP, AddrKind.HOSTNAME, port_of(target), b"127.0.0.1")))
        (ok,) = await raw.frames(1)
        assert ok.type == FrameType.OPEN_OK
        await raw.send(framing.encode_frame(FrameType.DATA, 1, bytes(2 * 1024 * 1024)))
        frames = await raw.frames(1)
        while frames[0].type == FrameType.DATA_ACK:
            frames = await raw.frames(1)
        assert (frames[0].type, frames[0].stream_id) == (FrameType.CLOSE, 1)
        assert payloads.decode_close(frames[0].payload) == 1
    for writer in held:
        writer.close()


async def test_upload_with_flow_control_waits_for_credit(gateway) -> None:
    """8 MiB up through a 1 MiB window: the client must wait for DataAcks, and all arrives."""
    total = 8 * 1024 * 1024
    got = asyncio.get_running_loop().create_future()

    async def count(reader, writer):
        n = 0
        while data := await reader.read(1 << 18):
            n += len(data)
        got.set_result(n)
        writer.close()

    async with await serve_tcp(count) as target:
        client = await kclient.connect(gateway, features=0x2F)
        stream = await client.open_connection("127.0.0.1", port_of(target))
        stream.write(bytes(total))
        stream.write_eof()
        await asyncio.wait_for(stream.drain(), 30)
        assert await asyncio.wait_for(got, 30) == total
        await client.close()


async def test_a_stream_without_acks_stalls_alone() -> None:
    """Stream A never acks: it stops at 1 MiB while B moves 64 MiB; acking A resumes it."""
    big = 64 * 1024 * 1024
    stop = asyncio.Event()

    async def endless(reader, writer):
        block = bytes(1 << 18)
        try:
            for _ in range(4096):  # at most 1 GiB
                if stop.is_set():
                    break
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def sixty_four(reader, writer):
        block = bytes(1 << 20)
        for _ in range(big >> 20):
            writer.write(block)
            await writer.drain()
        writer.close()

    proc = await asyncio.to_thread(GatewayProcess)
    try:
        gateway = psutil.Process(proc.pid)
        async with await serve_tcp(endless) as a_target, await serve_tcp(sixty_four) as b_target:
            client = await kclient.connect(proc.address, features=0x2F)
            baseline = gateway.memory_info().rss
            a = await client.open_connection("127.0.0.1", port_of(a_target))
            a.auto_ack = False
            b = await client.open_connection("127.0.0.1", port_of(b_target))
            received = 0
            peak = baseline
            while received < big:
                received += len(await asyncio.wait_for(b.read(), 30))
                peak = max(peak, gateway.memory_info().rss)
            assert received == big
            await asyncio.sleep(0.2)
            assert len(a._buffer) == 1024 * 1024  # exactly the window, not a byte more
            a.ack(1024 * 1024)
            for _ in range(100):  # resumes: more than the first window arrives
                if len(a._buffer) > 1024 * 1024:
                    break
                await asyncio.sleep(0.05)
            assert len(a._buffer) > 1024 * 1024
            peak = max(peak, gateway.memory_info().rss)
            stop.set()
            await client.close()
        assert peak - baseline < 64 * 1024 * 1024
    finally:
        await asyncio.to_thread(proc.stop)


async def test_udp_to_the_client_needs_no_credit(gateway, udp_echo_port) -> None:
    """With FlowControl the polyfill still acknowledges no UDP data: more than the 1 MiB
    window must come back to a client that never sends DataAck."""
    async with RawClient(gateway) as raw:
        await raw.hello(features=0x2F)
        await raw.send(_open_udp(1, udp_echo_port))
        (ok,) = await raw.frames(1)
        assert ok.type == FrameType.OPEN_OK
        received, datagram = 0, bytes(60000)
        for _ in range(24):  # 1.4 MB, one datagram in flight at a time (none dropped)
            await raw.send(framing.encode_frame(FrameType.DATA, 1, datagram))
            while True:
                (frame,) = await raw.frames(1)
                if frame.type == FrameType.DATA:
                    break
                assert frame.type == FrameType.DATA_ACK  # credit for what we sent
            received += len(frame.payload)
        assert received == 24 * len(datagram) > 1024 * 1024
