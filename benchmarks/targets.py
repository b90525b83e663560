"""Loopback TCP targets for the benchmarks, run in their own (spawned) process.

source: reads an 8-byte little-endian count N, sends N bytes, closes.
sink:   discards everything until EOF, then replies with the 8-byte count received.

Plain blocking sockets, one thread per connection: sendall/recv_into release
the GIL, so the targets cost little CPU next to the gateway and the client.
"""
from __future__ import annotations

import multiprocessing
import socket
import socketserver
import struct
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Optional

import psutil

COUNT = struct.Struct("<Q")
CHUNK = 1024 * 1024                  # bytes per sendall / recv_into
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
        (remaining,) = COUNT.unpack(_recv_exactly(sock, COUNT.size))
        while remaining:
            n = min(remaining, CHUNK)
            sock.sendall(_PAYLOAD[:n])
            remaining -= n


class _Sink(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(SOCKET_TIMEOUT)
        buf = bytearray(CHUNK)
        total = 0
        while n := sock.recv_into(buf):
            total += n
        sock.sendall(COUNT.pack(total))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # 64 streams connect at once; the default backlog is 5

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A peer that resets is the client side giving up on a failed scenario, which the
        # runner already reports; anything else is a bug here and keeps its traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _serve(conn: Connection) -> None:
    """Child process body: report the ports, serve until the parent says stop or dies."""
    servers = [_Server(("127.0.0.1", 0), handler) for handler in (_Source, _Sink)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    conn.send(tuple(s.server_address[1] for s in servers))
    try:
        conn.recv()
    except EOFError:
        pass
    for server in servers:
        server.shutdown()


class Targets:
    """The source and sink in a spawned process; `with Targets() as t: t.source_port`."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="ksw1-targets")
        self.source_port = 0
        self.sink_port = 0
        self._ps: Optional[psutil.Process] = None

    def cpu_seconds(self) -> float:
        assert self._ps is not None, "targets not started"
        times = self._ps.cpu_times()
        return times.user + times.system

    def __enter__(self) -> "Targets":
        self._proc.start()
        try:
            if not self._conn.poll(30):
                raise EOFError
            self.source_port, self.sink_port = self._conn.recv()
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
