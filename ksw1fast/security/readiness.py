"""Waiting for a raw non-blocking socket on the event loop's own poller (no thread):
for the PROXY header, read before picows owns the socket."""
from __future__ import annotations

import asyncio
import socket


async def readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _settle, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
