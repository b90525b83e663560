"""Request cycles on a KSW1 connection, `depth` in flight, until a deadline.

opens: Open -> OpenOk -> Close -> CloseAck, then the next Open (a new stream id).
dns:   DnsQuery("localhost") -> DnsResult, then the next query.
direct_dns: the same name with the event loop's getaddrinfo, no gateway (a ceiling).
direct_opens: TCP connect -> close to the Opens' target from here, no gateway: the
    baseline of the opens rate (the same connects a gateway makes for its Opens).
"""
from __future__ import annotations

import asyncio
from abc import abstractmethod
import socket
import time
from functools import partial
from typing import Awaitable, Callable

from benchmarks.loadgen.ksw1 import Control, Ksw1Connection
from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import FrameType

DNS_NAME = "localhost"  # answered from /etc/hosts: measures the gateway, not a DNS server


class Cycle(Control):
    """Counts completed requests; each completion starts the next one until the deadline."""

    def __init__(self, conn: Ksw1Connection, depth: int, seconds: float, port: int) -> None:
        self.conn = conn
        self.port = port  # the target of Opens
        self.depth = depth
        self.deadline = time.perf_counter() + seconds
        self.count = 0
        self._in_flight = 0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def run(self) -> int:
        self.conn.control = self
        try:
            for _ in range(self.depth):
                self._in_flight += 1
                self.request()
            return await self.done
        finally:
            self.conn.control = None

    @abstractmethod
    def request(self) -> None:
        """Send one request of the cycle."""

    def completed(self) -> None:
        self.count += 1
        if time.perf_counter() < self.deadline:
            self.request()
            return
        self._in_flight -= 1
        if not self._in_flight and not self.done.done():
            self.done.set_result(self.count)

    def fail(self, message: str) -> None:
        if not self.done.done():
            self.done.set_exception(AssertionError(message))


class OpenCycle(Cycle):
    def request(self) -> None:
        self.conn.send_open(self.conn.next_id(), self.port)

    def on_control(self, conn: Ksw1Connection, type_: int, stream_id: int) -> None:
        if type_ == FrameType.OPEN_OK:
            conn.send_frame(FrameType.CLOSE, stream_id, payloads.encode_close(0))
        elif type_ == FrameType.CLOSE_ACK:
            self.completed()
        elif type_ == FrameType.OPEN_ERR:
            self.fail(f"OpenErr on stream {stream_id}")


class DnsCycle(Cycle):
    _QUERY = payloads.encode_dns_query(4, DNS_NAME)

    def request(self) -> None:
        self.conn.send_frame(FrameType.DNS_QUERY, self.conn.next_id(), self._QUERY)

    def on_control(self, conn: Ksw1Connection, type_: int, stream_id: int) -> None:
        if type_ == FrameType.DNS_RESULT:
            self.completed()
        elif type_ == FrameType.DNS_ERR:
            self.fail(f"DnsErr for query {stream_id}")


async def _repeat(request: Callable[[], Awaitable[object]], depth: int,
                  seconds: float) -> int:
    """`request` again and again, `depth` in flight, until `seconds` pass: how many ended."""
    deadline = time.perf_counter() + seconds
    count = 0

    async def lane() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await request()
            count += 1

    await asyncio.gather(*(lane() for _ in range(depth)))
    return count


async def direct_dns(depth: int, seconds: float) -> int:
    """getaddrinfo on this process's loop (uvloop's thread pool): a ceiling for lookups
    of a name in /etc/hosts, not the gateway's resolver (c-ares)."""
    loop = asyncio.get_running_loop()
    return await _repeat(partial(loop.getaddrinfo, DNS_NAME, 0, family=socket.AF_INET,
                                 type=socket.SOCK_STREAM), depth, seconds)


async def direct_opens(port: int, depth: int, seconds: float) -> int:
    """Connect to 127.0.0.1:`port` and close, `depth` in flight, as the gateway connects."""
    loop = asyncio.get_running_loop()

    async def cycle() -> None:
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        transport.abort()

    return await _repeat(cycle, depth, seconds)
