"""The gateway's listening sockets and its own accept loop.

Not `loop.create_server`: libuv answers running out of file descriptors (EMFILE,
ENFILE) by accepting and closing every pending connection, silently. Here accepting
pauses instead, with a warning, and the connections wait in the kernel's backlog
until descriptors are free again. Owning the accept is also what lets a connection
go through the PROXY protocol header, TLS and the limits before picows sees a byte.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Callable

from picows.picows import WSAutoPingStrategy
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stubs

log = logging.getLogger("ksw1fast")

ACCEPT_BATCH = 64     # connections accepted per wakeup, so one busy listener cannot hog it
ACCEPT_PAUSE = 1.0    # seconds accepting rests when the process is out of descriptors
BACKLOG = 1024
_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_PICOWS_LOG = logging.LoggerAdapter(logging.getLogger("picows.server"), {})


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening socket on host:port (host an address or a name such as localhost);
    OSError (socket.gaierror for a name) when it cannot be made."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """Accepts connections on `sock` and hands each, non-blocking, to `on_accept`."""

    def __init__(self, sock: socket.socket,
                 on_accept: Callable[[socket.socket, tuple], None]) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self._on_accept = on_accept
        self._loop = asyncio.get_running_loop()
        self._resume: asyncio.TimerHandle | None = None
        self.closed = False

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._pause(exc)
                    return
                continue  # ECONNABORTED and the like: that connection is gone
            conn.setblocking(False)
            self._on_accept(conn, address)

    def _pause(self, exc: OSError) -> None:
        log.warning("cannot accept connections (%s): pausing accepts for %gs; raise the "
                    "open-files limit (ulimit -n) or lower --max-connections",
                    exc.strerror, ACCEPT_PAUSE)
        self._loop.remove_reader(self.sock.fileno())
        self._resume = self._loop.call_later(ACCEPT_PAUSE, self.start)

    def close(self) -> None:
        """Stop accepting (open connections are not touched) and close the socket."""
        if self.closed:
            return
        self.closed = True
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


def ws_protocol(route: Callable, handshake_timeout: float, max_frame_size: int) -> WSProtocol:
    """picows' server protocol for one accepted connection, as ws_create_server makes it
    (picows is pinned: this follows its constructor), routing its upgrade to `route`."""
    return WSProtocol(
        None, None, False, route, _PICOWS_LOG,
        True,                    # disconnect on an exception in a listener callback
        handshake_timeout,
        False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE,  # keepalive: our own sweep
        True,                    # answer pings
        max_frame_size,
        None,                    # extra response headers: per response instead
        2048)                    # an idle connection should cost little: picows grows it
