"""Download and upload through one KSW1 WebSocket, timed and verified.

Streams are opened before the clock starts: the numbers are bulk throughput,
not connection setup.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

from benchmarks.targets import COUNT
from ksw1fast import client as kclient

UPLOAD_CHUNK = 256 * 1024
_UPLOAD_DATA = bytes(UPLOAD_CHUNK)
CLOSE_TIMEOUT = 10.0

Clocks = Callable[[], dict[str, float]]  # CPU seconds so far of each process we watch


@dataclass
class Transfer:
    bytes: int
    seconds: float
    cpu_seconds: dict[str, float]  # per clock, spent during the timed window


async def _all(coros: Iterable[Awaitable[object]]) -> list:
    """gather() that cancels the rest when one fails, so no task outlives the scenario."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _download_one(stream: kclient.Stream, nbytes: int) -> None:
    stream.write(COUNT.pack(nbytes))
    received = 0
    while chunk_len := len(await stream.read()):  # ends at EOF; nothing is kept
        received += chunk_len
    if received != nbytes:
        raise AssertionError(f"stream {stream.stream_id}: got {received} of {nbytes} bytes")


async def _upload_one(stream: kclient.Stream, nbytes: int) -> None:
    sent = 0
    while sent < nbytes:
        n = min(UPLOAD_CHUNK, nbytes - sent)
        stream.write(_UPLOAD_DATA if n == UPLOAD_CHUNK else _UPLOAD_DATA[:n])
        await stream.drain()
        sent += n
    stream.write_eof()
    (received,) = COUNT.unpack(await stream.readexactly(COUNT.size))
    if received != nbytes:
        raise AssertionError(f"stream {stream.stream_id}: sink got {received} of {nbytes} bytes")


async def run_transfer(address: str, port: int, total: int, streams: int,
                       per_stream: Callable[[kclient.Stream, int], Awaitable[None]],
                       clocks: Clocks) -> Transfer:
    """Open `streams` streams to 127.0.0.1:port on one WebSocket and time `per_stream`."""
    nbytes = total // streams
    client = await kclient.connect(address, max_streams=streams)
    try:
        opened = await _all(client.open_connection("127.0.0.1", port) for _ in range(streams))
        cpu_before = clocks()
        start = time.perf_counter()
        await _all(per_stream(s, nbytes) for s in opened)
        seconds = time.perf_counter() - start
        cpu = {name: t - cpu_before[name] for name, t in clocks().items()}
        await _all(s.close() for s in opened)
    finally:
        await asyncio.wait_for(client.close(), CLOSE_TIMEOUT)
    return Transfer(nbytes * streams, seconds, cpu)


SCENARIOS: dict[str, tuple[Callable[[kclient.Stream, int], Awaitable[None]], str]] = {
    # name -> (per-stream coroutine, which target it talks to)
    "download": (_download_one, "source"),
    "upload": (_upload_one, "sink"),
}
