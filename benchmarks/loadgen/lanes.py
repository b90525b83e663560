"""Lanes and the byte-stream jobs that drive them.

A lane is one byte stream between the load generator and a target: a KSW1 stream in a
multiplexed WebSocket, a plain TCP connection (through socat), or a whole WebSocket
carrying raw bytes (websockify).  The jobs (download, upload, echo) are written once
against that interface, so every implementation moves exactly the same bytes.

The hot path is a few Python operations per received chunk (one chunk is one KSW1
frame, one WebSocket message or one socket read, up to 256 KiB): lengths are counted,
payloads are never copied.  Bulk sends come from buffers built once (see the transports).
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
import struct
import time
from typing import Optional

COUNT = struct.Struct("<Q")  # the targets' 8-byte little-endian count (see targets.py)


class Lane(ABC):
    """One byte stream; a transport implements the two sends and calls the job back."""

    def __init__(self) -> None:
        self.job: Job = IDLE
        self.count = 0        # bytes seen so far (by the job, or while idle)
        self.mark = 0.0       # when the echo message in flight was sent
        self.reply = bytearray()  # the sink's 8-byte count, as it arrives
        self.bulk_left = 0    # bytes of send_bulk() the transport still has to send

    @abstractmethod
    def send(self, data: bytes) -> None:
        """A small write (a count, an echo message); copied as needed."""

    @abstractmethod
    def send_bulk(self, nbytes: int) -> None:
        """Send `nbytes` of filler as fast as the transport takes them."""


class Job:
    """What runs on a set of lanes; `done` resolves when every lane has finished."""

    def __init__(self, lanes: int) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._left = lanes
        if not lanes:
            self.done.set_result(None)

    def start(self, lane: Lane) -> None:
        lane.job = self

    def on_data(self, lane: Lane, data: memoryview) -> None:
        """`data` lives only until this call returns."""

    def on_eof(self, lane: Lane) -> None:
        """The target side of the lane ended (EOF, Close or disconnect)."""

    def finished(self, lane: Lane) -> None:
        lane.job = IDLE
        self._left -= 1
        if not self._left and not self.done.done():
            self.done.set_result(None)

    def fail(self, message: str) -> None:
        if not self.done.done():
            self.done.set_exception(AssertionError(message))


class _Idle(Job):
    """Lanes between jobs, and the idle scenario's lanes: what arrives is only counted
    (a target's greeting may come before the lane's first job starts)."""

    def __init__(self) -> None:  # no future: it never finishes and needs no loop
        self._left = 0

    def on_data(self, lane: Lane, data: memoryview) -> None:
        lane.count += len(data)


IDLE: Job = _Idle()


class Greeted(Job):
    """Set-up: wait for the target's greeting byte on every lane (see targets.py)."""

    def start(self, lane: Lane) -> None:
        super().start(lane)
        if lane.count:  # it came while the lane was idle
            self.finished(lane)

    def on_data(self, lane: Lane, data: memoryview) -> None:
        if lane.job is self:
            self.finished(lane)

    def on_eof(self, lane: Lane) -> None:
        self.fail("lane ended before the target's greeting")


class Download(Job):
    """Ask the source for `nbytes`, count them until the target's EOF."""

    def __init__(self, lanes: int, nbytes: int) -> None:
        super().__init__(lanes)
        self.nbytes = nbytes

    def start(self, lane: Lane) -> None:
        super().start(lane)
        lane.count = 0
        lane.send(COUNT.pack(self.nbytes))

    def on_data(self, lane: Lane, data: memoryview) -> None:
        lane.count += len(data)

    def on_eof(self, lane: Lane) -> None:
        if lane.count != self.nbytes:
            self.fail(f"download got {lane.count} of {self.nbytes} bytes")
        else:
            self.finished(lane)


class Upload(Job):
    """Tell the sink `nbytes`, send them, wait for the sink's count of what arrived."""

    def __init__(self, lanes: int, nbytes: int) -> None:
        super().__init__(lanes)
        self.nbytes = nbytes

    def start(self, lane: Lane) -> None:
        super().start(lane)
        lane.reply.clear()
        lane.send(COUNT.pack(self.nbytes))
        lane.send_bulk(self.nbytes)

    def on_data(self, lane: Lane, data: memoryview) -> None:
        lane.reply += data
        if len(lane.reply) >= COUNT.size:
            (received,) = COUNT.unpack_from(lane.reply)
            if received != self.nbytes:
                self.fail(f"sink got {received} of {self.nbytes} bytes")
            else:
                self.finished(lane)

    def on_eof(self, lane: Lane) -> None:
        if lane.job is self:
            self.fail("upload lane ended before the sink replied")


class Echo(Job):
    """One `size`-byte message in flight per lane until `seconds` pass; round trips timed."""

    def __init__(self, lanes: int, size: int, seconds: float) -> None:
        super().__init__(lanes)
        self.message = bytes(size)
        self.size = size
        self.deadline = time.perf_counter() + seconds
        self.latencies: list[float] = []

    def start(self, lane: Lane) -> None:
        super().start(lane)
        lane.count = 0
        lane.mark = time.perf_counter()
        lane.send(self.message)

    def on_data(self, lane: Lane, data: memoryview) -> None:
        lane.count += len(data)
        if lane.count < self.size:
            return
        lane.count -= self.size
        now = time.perf_counter()
        self.latencies.append(now - lane.mark)
        if now < self.deadline:
            lane.mark = now
            lane.send(self.message)
        else:
            self.finished(lane)

    def on_eof(self, lane: Lane) -> None:
        if lane.job is self:
            self.fail("echo lane ended early")


def make_job(kind: str, lanes: int, nbytes: int, size: int, seconds: float) -> Optional[Job]:
    """The lane job for `kind`, or None for kinds that are not byte streams."""
    if kind == "download":
        return Download(lanes, nbytes)
    if kind == "upload":
        return Upload(lanes, nbytes)
    if kind == "echo":
        return Echo(lanes, size, seconds)
    return None
