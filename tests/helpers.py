"""Helpers the tests share (imported as `helpers`; tests/ is on sys.path): a gateway
subprocess, loopback TCP servers, a raw KSW1 client on an independent WebSocket
library, and IPv6 addresses that embed an IPv4 one."""
from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from ipaddress import IPv4Address, IPv6Address
from typing import Awaitable, Callable

import websockets

from ksw1fast import codec as pycodec

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class GatewayProcess:
    """`python -m ksw1fast serve` in a subprocess; the address is read from its log."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 default_port: bool = False) -> None:
        port = () if default_port else ("--port", "0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ksw1fast", "serve", *port, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})}, text=True)
        self.address = ""
        self.log: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # bounded: the process exits or prints its address
            self.log.append(line)
            match = re.search(r"serving (wss?://[^\s\"]+)", line)
            if match:
                self.address = match.group(1)
                break
        if not self.address:
            raise RuntimeError("gateway did not start:\n" + "".join(self.log))
        # keep draining: a full stderr pipe would block the gateway's logging
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> str:
        """SIGTERM, wait, and return the rest of the log."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=5)
        return "".join(self.log)


async def serve_tcp(handler: Handler, host: str = "127.0.0.1") -> asyncio.AbstractServer:
    return await asyncio.start_server(handler, host, 0)


def port_of(server: asyncio.AbstractServer) -> int:
    return server.sockets[0].getsockname()[1]


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF."""
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


class RawClient:
    """An independent WebSocket client (the `websockets` library) speaking raw KSW1 bytes."""

    def __init__(self, address: str, **kwargs: object) -> None:
        self.address = address
        self.kwargs = kwargs
        self.parser = pycodec.FrameParser()
        self.pending: list = []

    async def __aenter__(self) -> "RawClient":
        self.ws = await websockets.connect(self.address, max_size=None, **self.kwargs)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.ws.close()

    async def send(self, message: bytes | str) -> None:
        await self.ws.send(message)

    async def hello(self, features: int = 0x2E, max_streams: int = 64) -> None:
        await self.send(pycodec.encode_frame(0x01, 0, pycodec.encode_hello(features, max_streams)))
        (ack,) = await self.frames(1)
        assert ack.type == 0x02

    async def frames(self, count: int, timeout: float = 10) -> list:
        """The next `count` KSW1 frames, payloads as bytes."""
        while len(self.pending) < count:
            message = await asyncio.wait_for(self.ws.recv(), timeout)
            self.pending += [f._replace(payload=bytes(f.payload))
                             for f in self.parser.feed(message)]
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken

    async def close_code(self, timeout: float = 10) -> int | None:
        """Wait for the server to close the WebSocket; its close code."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None


def free_port() -> int:
    """A loopback port free right now (for listeners whose port must be known up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _inverted(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


# Every IPv6 form that carries an IPv4 for a translator or tunnel, built from the RFCs'
# byte layouts (not from ksw1fast): form -> f(ipv4, 10 bytes for the form's free bits).
EMBEDDINGS: dict[str, Callable[[IPv4Address, bytes], IPv6Address]] = {
    "nat64 64:ff9b::/96": lambda v4, fill: IPv6Address(
        bytes.fromhex("0064ff9b") + bytes(8) + v4.packed),
    # RFC 6052 layout for a /48 prefix: 16 bits, the 'u' octet, 16 bits, a suffix
    "nat64 local 64:ff9b:1::/48": lambda v4, fill: IPv6Address(
        bytes.fromhex("0064ff9b0001") + v4.packed[:2] + fill[9:] + v4.packed[2:] + fill[:5]),
    "6to4 2002::/16": lambda v4, fill: IPv6Address(b"\x20\x02" + v4.packed + fill),
    "ipv4-compatible ::/96": lambda v4, fill: IPv6Address(bytes(12) + v4.packed),
    "siit ::ffff:0:0:0/96": lambda v4, fill: IPv6Address(
        bytes(8) + b"\xff\xff\0\0" + v4.packed),
    "teredo client": lambda v4, fill: IPv6Address(
        bytes.fromhex("20010000") + fill[:8] + _inverted(v4.packed)),
    "teredo server": lambda v4, fill: IPv6Address(
        bytes.fromhex("20010000") + v4.packed + fill[:8]),
}
# free bits that embed nothing special: a Teredo server 65.54.227.120 (or flags and
# port), a Teredo client 8.8.4.4 (or flags and port), a zero 'u' octet last
FILL = bytes([65, 54, 227, 120]) + _inverted(bytes([8, 8, 4, 4])) + bytes(2)
