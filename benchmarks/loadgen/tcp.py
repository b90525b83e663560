"""Plain TCP lanes (the socat ceiling): one connection per lane, large reads, no copies."""
from __future__ import annotations

import asyncio
from typing import Optional, cast

from benchmarks.loadgen.lanes import Lane

READ_SIZE = 256 * 1024
BULK_CHUNK = 256 * 1024
_FILLER = memoryview(bytes(BULK_CHUNK))  # read-only: uvloop queues views of it uncopied


class TcpLane(asyncio.BufferedProtocol, Lane):
    """Reads into one buffer per lane (the job sees a view); bulk writes from a shared one."""

    def __init__(self) -> None:
        Lane.__init__(self)
        self.transport: Optional[asyncio.Transport] = None
        self._buffer = memoryview(bytearray(READ_SIZE))
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # pause as soon as the kernel leaves anything queued, as the WebSocket lanes do
        self.transport.set_write_buffer_limits(high=0)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.job.on_data(self, self._buffer[:nbytes])

    def eof_received(self) -> bool:
        self.job.on_eof(self)
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.job.on_eof(self)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def send_bulk(self, nbytes: int) -> None:
        self.bulk_left = nbytes
        self._pump()

    def _pump(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.bulk_left and not self._paused and not transport.is_closing():
            size = min(self.bulk_left, BULK_CHUNK)
            transport.write(_FILLER[:size])
            self.bulk_left -= size

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()


async def open_lane(port: int) -> TcpLane:
    _, protocol = await asyncio.get_running_loop().create_connection(TcpLane, "127.0.0.1", port)
    return cast(TcpLane, protocol)


def close_lanes(lanes: list[TcpLane]) -> None:
    for lane in lanes:
        if lane.transport is not None:
            lane.transport.abort()
