"""A lean KSW1 client for load: frames parsed in place, lanes are plain objects.

Unlike `ksw1fast.client` (a buffer and a copy per chunk, futures per stream), a
received Data frame is one `struct.unpack_from` on picows' read buffer and one call
into the lane's job with a memoryview of the payload.  The gateway sends whole frames
in each message (protocol.md §1), so a message is walked frame by frame without carrying
bytes across messages.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
import struct
from typing import Optional

from picows import WSFrame, WSMsgType, WSTransport

from benchmarks.loadgen.lanes import Lane
from benchmarks.loadgen.wspeer import WsPeer
from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import AddrKind, Feature, Flag, FrameType, Proto

HEADER = struct.Struct("<4sBBBxII")  # magic, version, type, flags, stream id, payload length
_MAGIC, _VERSION = b"KSW1", 1
_DATA, _EOF = FrameType.DATA, Flag.EOF
FEATURES = Feature.HALF_CLOSE | Feature.DNS  # no FlowControl: the relay's plain path
MAX_STREAMS = 1024  # ask for the gateway's default limit


class Control(ABC):
    """Receives the control frames of a connection while a request cycle runs on it."""

    @abstractmethod
    def on_control(self, conn: "Ksw1Connection", type_: int, stream_id: int) -> None:
        """A control frame (OpenOk, CloseAck, DnsResult...) of the running cycle."""


class Ksw1Lane(Lane):
    def __init__(self, conn: "Ksw1Connection", stream_id: int) -> None:
        super().__init__()
        self.conn = conn
        self.stream_id = stream_id

    def send(self, data: bytes) -> None:
        self.conn.send_frame(_DATA, self.stream_id, data)

    def send_bulk(self, nbytes: int) -> None:
        self.conn.send_bulk(self, nbytes)


class Ksw1Connection(WsPeer):
    """One benchmark WebSocket to a KSW1 gateway."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes: dict[int, Ksw1Lane] = {}
        self.control: Optional[Control] = None  # a request cycle (opens, DNS) when set
        self._hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._opening: dict[int, asyncio.Future[None]] = {}
        self._next_id = 1

    @classmethod
    async def start(cls, url: str, ca: str = "") -> "Ksw1Connection":
        """Connect and complete Hello / HelloAck (`ca`: see WsPeer.connect)."""
        conn = await cls.connect(url, ca=ca)
        conn.send_frame(FrameType.HELLO, 0, payloads.encode_hello(FEATURES, MAX_STREAMS))
        await asyncio.wait_for(asyncio.shield(conn._hello), 30)
        return conn

    def next_id(self) -> int:
        stream_id, self._next_id = self._next_id, self._next_id + 1
        return stream_id

    def send_frame(self, type_: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> None:
        self.send_message(HEADER.pack(_MAGIC, _VERSION, type_, flags, stream_id, len(payload)),
                          payload)

    def send_open(self, stream_id: int, port: int) -> None:
        # the address as text, as the polyfill sends every address
        self.send_frame(FrameType.OPEN, stream_id,
                        payloads.encode_open(Proto.TCP, AddrKind.HOSTNAME, port, b"127.0.0.1"))

    async def open_lanes(self, port: int, count: int) -> list[Ksw1Lane]:
        """Open `count` streams to 127.0.0.1:port, all Opens in flight at once."""
        lanes = [Ksw1Lane(self, self.next_id()) for _ in range(count)]
        loop = asyncio.get_running_loop()
        for lane in lanes:
            self.lanes[lane.stream_id] = lane
            self._opening[lane.stream_id] = loop.create_future()
            self.send_open(lane.stream_id, port)
        await asyncio.gather(*(self._opening[lane.stream_id] for lane in lanes))
        return lanes

    def head(self, lane: Lane, size: int) -> bytes:
        assert isinstance(lane, Ksw1Lane)
        return HEADER.pack(_MAGIC, _VERSION, _DATA, 0, lane.stream_id, size)

    # -- receiving ------------------------------------------------------------------------

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.BINARY:
            if frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()
            return
        # The replies to this message's frames leave in one write, but a request cycle's
        # go one by one: held, the requests in flight move as one burst and gateway and
        # generator take turns instead of working at once (the gateway idled 15 % of an
        # opens run, at 0.87x the opens/s).
        if self.control is None:
            self.hold_writes()
        try:
            self._on_frames(frame.get_payload_as_memoryview())
        finally:
            self.release_writes()  # (nothing, if nothing was held)

    def _on_frames(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end:
            _, _, type_, flags, stream_id, size = HEADER.unpack_from(view, pos)
            start = pos + 16
            pos = start + size
            if type_ == _DATA:
                lane = self.lanes.get(stream_id)
                if lane is not None:
                    if size:
                        lane.job.on_data(lane, view[start:pos])
                    if flags & _EOF:
                        lane.job.on_eof(lane)
            else:
                self._on_control(type_, stream_id, view[start:pos])

    def _on_control(self, type_: int, stream_id: int, payload: memoryview) -> None:
        if self.control is not None:
            self.control.on_control(self, type_, stream_id)
        elif type_ == FrameType.OPEN_OK or type_ == FrameType.OPEN_ERR:
            waiter = self._opening.pop(stream_id, None)
            if waiter is not None and not waiter.done():
                if type_ == FrameType.OPEN_OK:
                    waiter.set_result(None)
                else:
                    err = payloads.decode_open_err(payload)
                    waiter.set_exception(ConnectionError(f"OpenErr {err.code}: {err.message}"))
        elif type_ == FrameType.CLOSE or type_ == FrameType.CLOSE_ACK:
            lane = self.lanes.pop(stream_id, None)
            if lane is not None:
                lane.job.on_eof(lane)
        elif type_ == FrameType.HELLO_ACK and not self._hello.done():
            self._hello.set_result(None)
        elif type_ == FrameType.PING:
            self.send_frame(FrameType.PONG, 0, bytes(payload))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for lane in self.lanes.values():
            lane.job.on_eof(lane)
        self.lanes.clear()
        error = ConnectionError("gateway closed the WebSocket")
        for waiter in (self._hello, *self._opening.values()):
            if not waiter.done():
                waiter.set_exception(error)
        super().on_ws_disconnected(transport)
