"""Loopback TCP targets for the benchmarks, run in their own (spawned) process.

source, sink and echo first send one GREETING byte: the load generator waits for it on
every lane before the clock starts, so a relay that connects to the target lazily
(socat forks per connection) is set up outside the measurement, as the gateway is
(its OpenOk comes after the target connect).

source: reads an 8-byte little-endian count N, sends N bytes, closes.
sink:   reads an 8-byte count N, discards N bytes (or until EOF), replies with the
        8-byte count it received, closes.  No half-close needed, so the same sink
        serves KSW1 streams, plain TCP through socat and websockify's single stream.
echo:   sends back whatever it reads.
hold:   accepts and stays silent: where idle streams and the stream-open scenario
        connect (thousands of sockets, cheaply).

source and sink: plain blocking sockets, one thread per connection (sendall and
recv_into release the GIL, so they cost little CPU next to the gateway and the
client).  echo and hold: one uvloop event loop in its own thread.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import socket
import socketserver
import struct
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Optional, cast

import psutil
import uvloop

from benchmarks.procs import CpuSnapshot, tree_cpu

COUNT = struct.Struct("<Q")
GREETING = b"\x01"
CHUNK = 1024 * 1024                  # bytes per sendall
SINK_BUFFER = 256 * 1024             # bytes per recv_into (one buffer per sink thread)
SOCKET_TIMEOUT = 300.0               # a stuck peer cannot hold a thread forever
_PAYLOAD = memoryview(bytes(CHUNK))  # shared, read-only: every source sends from it


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed before sending the count")
        data += chunk
    return data


class _Source(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(SOCKET_TIMEOUT)
        sock.sendall(GREETING)
        (remaining,) = COUNT.unpack(_recv_exactly(sock, COUNT.size))
        while remaining:
            n = min(remaining, CHUNK)
            sock.sendall(_PAYLOAD[:n])
            remaining -= n


class _Sink(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(SOCKET_TIMEOUT)
        sock.sendall(GREETING)
        (expected,) = COUNT.unpack(_recv_exactly(sock, COUNT.size))
        buf = bytearray(SINK_BUFFER)
        total = 0
        while total < expected and (n := sock.recv_into(buf, min(SINK_BUFFER,
                                                                   expected - total))):
            total += n
        sock.sendall(COUNT.pack(total))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # 256 streams connect at once; the default backlog is 5

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A peer that resets is the client side giving up on a failed scenario, which the
        # runner already reports; anything else is a bug here and keeps its traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def _start_loop_servers() -> tuple[asyncio.AbstractEventLoop, int, int]:
    """echo and hold on a uvloop in a daemon thread; (the loop, their ports)."""
    loop = uvloop.new_event_loop()
    ports = []
    for protocol in (_Echo, asyncio.Protocol):  # a bare Protocol ignores what it reads
        server = cast(asyncio.Server, loop.run_until_complete(
            loop.create_server(protocol, "127.0.0.1", 0, backlog=4096)))
        ports.append(server.sockets[0].getsockname()[1])
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return loop, ports[0], ports[1]


def _serve(conn: Connection) -> None:
    """Child process body: report the ports, serve until the parent says stop or dies."""
    servers = [_Server(("127.0.0.1", 0), handler) for handler in (_Source, _Sink)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    loop, echo_port, hold_port = _start_loop_servers()
    conn.send((*(s.server_address[1] for s in servers), echo_port, hold_port))
    try:
        conn.recv()
    except EOFError:
        pass
    for server in servers:
        server.shutdown()
    loop.call_soon_threadsafe(loop.stop)


class Targets:
    """The targets in a spawned process; `with Targets() as t: t.source_port`."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="ksw1-targets")
        self.source_port = 0
        self.sink_port = 0
        self.echo_port = 0
        self.hold_port = 0
        self._ps: Optional[psutil.Process] = None

    def cpu(self) -> CpuSnapshot:
        assert self._ps is not None, "targets not started"
        return tree_cpu(self._ps)

    def __enter__(self) -> "Targets":
        self._proc.start()
        try:
            if not self._conn.poll(30):
                raise EOFError
            self.source_port, self.sink_port, self.echo_port, self.hold_port = self._conn.recv()
        except EOFError:  # timed out, or the child died before reporting its ports
            self._proc.kill()
            raise RuntimeError("target process did not start") from None
        self._ps = psutil.Process(self._proc.pid)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass  # the child is gone already
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
