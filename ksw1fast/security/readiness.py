"""Waiting for a raw non-blocking socket on the event loop's own poller (no thread):
for the PROXY header read before picows owns a socket, and for connects."""
from __future__ import annotations

import asyncio
import socket


async def readable(sock: socket.socket) -> None:
    await _ready(sock, write=False)


async def writable(sock: socket.socket) -> None:
    await _ready(sock, write=True)


async def _ready(sock: socket.socket, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader,
                                                                       loop.remove_reader)
    add(fd, _settle, ready)
    try:
        await ready
    finally:
        remove(fd)


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
