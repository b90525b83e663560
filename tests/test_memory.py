"""Bounded memory without FlowControl (protocol.md §6): a stalled side must not make the gateway buffer.

The gateway runs in a subprocess so its RSS is its own.  Each test pushes up to 1 GiB and
is bounded in time: it stops when the pusher stalls (backpressure reached it) or after
1 GiB, and asserts the gateway's RSS grew by less than 64 MiB.
"""
from __future__ import annotations

import asyncio
import time

import psutil
import pytest

from ksw1fast import client as kclient
from ksw1fast import framing
from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import AddrKind, FrameType, Proto

from helpers import GatewayProcess, RawClient, echo_handler, port_of, serve_tcp

pytestmark = pytest.mark.timeout(120)

GIB = 1 << 30
CHUNK = 1 << 20
RSS_BOUND = 64 << 20
STALL_SECONDS = 3.0   # no progress for this long means backpressure reached the pusher
TIME_LIMIT = 60.0


@pytest.fixture
async def gateway_proc():
    proc = await asyncio.to_thread(GatewayProcess)
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop)


class Progress:
    """Bytes pushed so far, and the gateway's RSS sampled while they move."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self.pushed = 0

    async def watch(self) -> None:
        """Return once the pusher stalled, pushed 1 GiB, or time ran out."""
        deadline = time.monotonic() + TIME_LIMIT
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline and self.pushed < GIB:
            await asyncio.sleep(0.1)
            self.peak = max(self.peak, self.process.memory_info().rss)
            if self.pushed != last:
                last, last_change = self.pushed, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS:
                return

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


async def _warm_up(address: str, port: int) -> None:
    """One full round trip first, so the baseline includes the relay's fixed buffers."""
    client = await kclient.connect(address)
    stream = await client.open_connection("127.0.0.1", port)
    stream.write(b"x" * 300_000)
    await stream.readexactly(300_000)
    await client.close()


async def test_client_that_never_reads(gateway_proc) -> None:
    """A target streams 1 GiB to a client that stops reading: the gateway must not hold it."""
    progress: Progress

    async def flood(reader, writer):
        block = bytes(CHUNK)
        try:
            while progress.pushed < GIB:
                writer.write(block)
                await writer.drain()
                progress.pushed += CHUNK
        except ConnectionError:
            pass
        writer.close()

    async with await serve_tcp(echo_handler) as echo, await serve_tcp(flood) as target:
        await _warm_up(gateway_proc.address, port_of(echo))
        progress = Progress(gateway_proc.pid)
        # websockets stops reading its socket once a few messages wait unread
        async with RawClient(gateway_proc.address, max_queue=4) as raw:
            await raw.hello()
            await raw.send(framing.encode_frame(FrameType.OPEN, 1, payloads.encode_open(
                Proto.TCP, AddrKind.HOSTNAME, port_of(target), b"127.0.0.1")))
            await progress.watch()
    assert progress.pushed < GIB, "the target was never slowed down"
    assert progress.growth < RSS_BOUND, f"gateway RSS grew {progress.growth >> 20} MiB"


async def test_target_that_never_reads(gateway_proc) -> None:
    """The client sends 1 GiB to a target that never reads: the gateway must not hold it."""
    held: list = []

    async def never_read(reader, writer):
        held.append(writer)  # keep the socket open, read nothing

    async with await serve_tcp(echo_handler) as echo, await serve_tcp(never_read) as target:
        await _warm_up(gateway_proc.address, port_of(echo))
        progress = Progress(gateway_proc.pid)
        client = await kclient.connect(gateway_proc.address)
        stream = await client.open_connection("127.0.0.1", port_of(target))

        async def push() -> None:
            block = bytes(kclient.WRITE_CHUNK)
            while progress.pushed < GIB:
                stream.write(block)
                await stream.drain()
                progress.pushed += len(block)

        pusher = asyncio.ensure_future(push())
        await progress.watch()
        pusher.cancel()
        client.ws.disconnect()
        for writer in held:
            writer.close()
    assert progress.pushed < GIB, "the client was never slowed down"
    assert progress.growth < RSS_BOUND, f"gateway RSS grew {progress.growth >> 20} MiB"
