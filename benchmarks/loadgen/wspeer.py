"""What the two WebSocket transports share: connecting, and sends that cost little.

A bulk message is written by us, not by picows: a WebSocket header with the mask bit
set and a mask key of 0 (a client must mask, RFC 6455 §5.3, and XOR with 0 leaves the
payload as it is), the transport's own header (KSW1's), and a view of one shared
zero-filled buffer, handed to uvloop's writelines (one sendmsg, no copy: uvloop keeps
references to what the kernel did not take, and the filler never changes).  So the
generator does no per-byte work, while the gateway still unmasks every byte, as it does
for a browser.  The write-buffer limit is 0: we pause as soon as anything is queued.

Small messages (counts, echo, Opens...) are framed the same way, one WebSocket message
each as a browser sends them; the echo replies to one received message are held and
written together when it is done (`hold_writes`): one write per received message
instead of one per reply, so the generator stays cheaper per message than the gateway
it measures (issue 16 §3).  Holding keeps their order with each other and with bulk
messages (`_pump` writes what is held first).
"""
from __future__ import annotations

import asyncio
import collections
import ssl
import struct
from typing import Any, Callable, Deque, Optional, TypeVar

from picows import WSListener, WSTransport, ws_connect

from benchmarks.loadgen.lanes import Lane

BULK_FRAME = 256 * 1024    # payload bytes per bulk WebSocket message
_FILLER = memoryview(bytes(BULK_FRAME))
_BINARY_FIN, _MASKED = 0x82, 0x80
_WS_HEAD_64 = struct.Struct("!BBQI")  # first byte, 127 | mask bit, length, mask key (0)
MAX_MESSAGE = 16 * 1024 * 1024 + 64
HANDSHAKE_TIMEOUT = 60.0   # thousands of connections at once queue on a busy gateway

P = TypeVar("P", bound="WsPeer")


class WsPeer(WSListener):
    """A picows client listener that can stream bulk bytes for its lanes, round-robin."""

    def __init__(self) -> None:
        super().__init__()
        self.ws: Optional[WSTransport] = None
        self.disconnected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._bulk: Deque[Lane] = collections.deque()
        self._paused = False
        self._held: Optional[bytearray] = None  # messages waiting for release_writes()

    @classmethod
    async def connect(cls: type[P], url: str, *args: Any, ca: str = "") -> P:
        """`ca`: the CA file a wss:// server's certificate is checked against."""
        factory: Callable[[], P] = lambda: cls(*args)  # noqa: E731
        tls = ssl.create_default_context(cafile=ca or None) if url.startswith("wss:") else None
        transport, listener = await ws_connect(
            factory, url, ssl_context=tls, max_frame_size=MAX_MESSAGE, use_aiofastnet=False,
            websocket_handshake_timeout=HANDSHAKE_TIMEOUT)
        assert isinstance(listener, cls)
        return listener

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        transport.underlying_transport.set_write_buffer_limits(high=0)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(None)

    def close(self) -> None:
        if self.ws is not None and not self.ws.is_disconnected:
            self.ws.disconnect(graceful=False)

    # -- small messages ----------------------------------------------------------------

    def send_message(self, *parts: bytes) -> None:
        """One binary message of `parts`, written now or, while held, with the others."""
        head = _ws_head(sum(map(len, parts)))
        held = self._held
        if held is not None:
            held += head
            for part in parts:
                held += part
            return
        if self.ws is not None and not self.ws.is_disconnected:  # as picows' send() did
            self.ws.underlying_transport.write(b"".join((head, *parts)))

    def hold_writes(self) -> None:
        """Hold what send_message writes until release_writes (a received message's replies)."""
        if self._held is None:
            self._held = bytearray()

    def release_writes(self) -> None:
        held, self._held = self._held, None
        if held and self.ws is not None and not self.ws.is_disconnected:
            self.ws.underlying_transport.write(held)  # a new buffer each time: uvloop may keep it

    # -- bulk ------------------------------------------------------------------------

    def head(self, lane: Lane, size: int) -> bytes:
        """The transport's header in front of `size` payload bytes of `lane`."""
        return b""

    def send_bulk(self, lane: Lane, nbytes: int) -> None:
        lane.bulk_left = nbytes
        if nbytes:
            self._bulk.append(lane)
            self._pump()

    def _pump(self) -> None:
        bulk, ws = self._bulk, self.ws
        assert ws is not None
        if self._held:  # what was sent before the bulk goes first
            self.release_writes()
            self.hold_writes()
        transport = ws.underlying_transport
        while bulk and not self._paused and not ws.is_disconnected:
            lane = bulk[0]
            size = min(lane.bulk_left, BULK_FRAME)
            head = self.head(lane, size)
            transport.writelines((_ws_head(len(head) + size) + head, _FILLER[:size]))
            lane.bulk_left -= size
            if lane.bulk_left:
                bulk.rotate(-1)
            else:
                bulk.popleft()

    def pause_writing(self) -> None:  # picows passes on its transport's flow control
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()


def _ws_head(length: int) -> bytes:
    """A final binary frame's header, masked with the key 0 (RFC 6455 §5.2)."""
    if length < 126:
        return bytes((_BINARY_FIN, _MASKED | length, 0, 0, 0, 0))
    if length < 1 << 16:
        return struct.pack("!BBHI", _BINARY_FIN, _MASKED | 126, length, 0)
    return _WS_HEAD_64.pack(_BINARY_FIN, _MASKED | 127, length, 0)
