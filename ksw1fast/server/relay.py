"""Pure-Python twin of `ksw1fast/server/_relay.pyx`: the same classes and rules, readable.

It runs when KSW1FAST_NO_EXTENSIONS=1 (with the pure-Python codec) and is the
baseline the benchmarks compare the compiled path against.  Unlike the compiled
module it copies each relayed chunk into a new bytes object and sends every frame as
a WebSocket message of its own (the compiled relay batches small frames).
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from picows import WSFrame, WSListener, WSMsgType, WSTransport

from ksw1fast.protocol import frames, payloads
from ksw1fast.protocol.constants import HEADER_SIZE, Flag, FrameType, WSClose
from ksw1fast.server.tuning import (ACK_STEP, FC_HIGH_WATER, HIGH_WATER, INITIAL_CREDIT, LOW_WATER,
                                    MAX_DATAGRAM, MAX_PENDING, MAX_READ, MIN_READ,
                                    PAUSE_CONNECTING, PAUSE_CREDIT, PAUSE_WEBSOCKET,
                                    WS_HEADROOM)
from ksw1fast.protocol.errors import FrameError
from ksw1fast.protocol.messages import Payload
from ksw1fast.protocol.close import CLOSE_TIMEOUT, close_reason
from ksw1fast.wsclose import answer_close, send_close

_DATA = int(FrameType.DATA)
_DATA_ACK = int(FrameType.DATA_ACK)
_EOF = int(Flag.EOF)


class Stream:
    """One entry of a connection's stream table: state shared by TCP and UDP."""

    def __init__(self, conn: "GatewayListener", stream_id: int, flow_control: bool = False,
                 credit: int = INITIAL_CREDIT) -> None:
        self.conn = conn
        self.stream_id = stream_id
        assert conn.ws is not None  # streams exist once the WebSocket is connected
        self.ws: WSTransport = conn.ws
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.paused = PAUSE_CONNECTING | (PAUSE_WEBSOCKET if conn.targets_paused else 0)
        self.forgotten = False
        self.client_eof = False
        self.flow_control = flow_control
        self.send_credit = credit
        self.recv_credit = credit
        self.received = 0
        self.acked = 0
        self.pending: Optional[list[bytes]] = None  # made when needed
        self.pending_size = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped = 0

    def client_data(self, data: Payload, flags: int) -> None:
        """Data from the client; `data` is only valid during this call."""
        if self.forgotten or self.client_eof:
            return
        if self.flow_control:
            self.recv_credit -= len(data)
            if self.recv_credit < 0:
                self.conn.stream_failed(self, "client overran its credit")
                return
        if self.paused & PAUSE_CONNECTING:
            if data:
                self.pending_size += len(data)
                if self.pending_size > MAX_PENDING:
                    self.conn.stream_failed(self, "client sent too much before OpenOk")
                    return
                if self.pending is None:
                    self.pending = []
                self.pending.append(bytes(data))
            if flags & _EOF:
                self.client_eof = True
            return
        if data:
            self.received += len(data)
            self._deliver(data)
        if flags & _EOF:
            self._client_eof()
        if self.flow_control:
            self._return_credit(False)

    def _deliver(self, data: Any) -> None:
        """Hand client bytes to the target."""

    def _client_eof(self) -> None:
        self.client_eof = True

    def _reading(self, on: bool) -> None:
        """Start or stop reading the target."""

    def _return_credit(self, everything: bool) -> None:
        ready = self.received - self.acked
        if self.transport is not None:
            ready -= self.transport.get_write_buffer_size()
        if ready > 0 and (everything or ready >= ACK_STEP):
            self.acked += ready
            self.recv_credit += ready
            self.conn.send_frame(_DATA_ACK, self.stream_id, payloads.encode_data_ack(ready))

    def _sent(self, n: int) -> None:
        self.bytes_out += n
        if self.flow_control:
            self.send_credit -= n
            if self.send_credit <= 0:
                self.set_paused(PAUSE_CREDIT, True)

    def set_paused(self, reason: int, on: bool) -> None:
        before = self.paused
        self.paused = (self.paused | reason) if on else (self.paused & ~reason)
        if self.transport is not None and not self.forgotten and (before == 0) != (self.paused == 0):
            self._reading(self.paused == 0)

    def add_credit(self, n: int) -> None:
        if self.flow_control:
            self.send_credit += n
            if self.send_credit > 0:
                self.set_paused(PAUSE_CREDIT, False)

    def start(self) -> None:
        pending, self.pending, self.pending_size = self.pending or (), None, 0
        self.set_paused(PAUSE_CONNECTING, False)
        for chunk in pending:
            self.received += len(chunk)
            self._deliver(chunk)
        if self.client_eof:
            self._client_eof()
        if self.flow_control:
            self._return_credit(False)

    def forget(self) -> None:
        self.forgotten = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.forgotten:
            self.forgotten = True
            self.conn.stream_ended(self, exc)


class TcpStream(Stream, asyncio.BufferedProtocol):
    """asyncio BufferedProtocol of one target TCP connection."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.target_eof = False
        self.congested = False
        self._read_size = MIN_READ
        self._buf = bytearray(MAX_READ)

    # -- asyncio protocol -------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.flow_control:
            transport.set_write_buffer_limits(FC_HIGH_WATER, 0)
        else:
            transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        size = min(self._read_size, self.send_credit) if self.flow_control else self._read_size
        return memoryview(self._buf)[:size]

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.send_frame(_DATA, self.stream_id, memoryview(self._buf)[:nbytes])
        if nbytes == self._read_size and self._read_size < MAX_READ:
            self._read_size *= 2
        self._sent(nbytes)

    def eof_received(self) -> bool:
        self.target_eof = True
        self.conn.send_frame(_DATA, self.stream_id, b"", _EOF)
        if self.client_eof:
            self.transport.close()
        return True

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.congested:
            self.congested = False
            self.conn.congest(-1)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        if not self.flow_control:
            self.congested = True
            self.conn.congest(1)

    def resume_writing(self) -> None:
        if self.congested:
            self.congested = False
            self.conn.congest(-1)
        if self.flow_control and not self.forgotten:
            self._return_credit(True)

    # -- Stream hooks -------------------------------------------------------------

    def _reading(self, on: bool) -> None:
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def _deliver(self, data: Any) -> None:
        if self.transport.is_closing():
            return
        self.bytes_in += len(data)
        self.transport.write(bytes(data))  # the view into picows' buffer dies with the callback

    def _client_eof(self) -> None:
        self.client_eof = True
        if self.transport.is_closing():
            return
        self.transport.write_eof()
        if self.target_eof:
            self.transport.close()


class UdpStream(Stream, asyncio.DatagramProtocol):
    """asyncio DatagramProtocol of one connected UDP socket: one Data frame = one datagram."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.forgotten:
            return
        if self.paused:
            self.dropped += 1
            return
        self.conn.send_frame(_DATA, self.stream_id, data)
        # No send credit: the polyfill acknowledges no UDP data, so a window would stop
        # the flow after 1 MiB; datagrams are dropped under pressure instead.
        self.bytes_out += len(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors (port unreachable...) are normal for UDP; the flow stays open

    def _deliver(self, data: Any) -> None:
        if (len(data) > MAX_DATAGRAM or self.transport.is_closing()
                or self.transport.get_write_buffer_size() > HIGH_WATER):
            self.dropped += 1
            return
        self.bytes_in += len(data)
        self.transport.sendto(bytes(data))


class GatewayListener(WSListener):
    """picows listener base: runs the per-frame path; subclasses handle control frames.

    A subclass provides `on_control(type, flags, stream_id, payload: bytes)` for every
    frame that is not Data of a known stream, `stream_ended(stream, exc)` /
    `stream_failed(stream, reason)` for streams ending on the target's side, and
    `end_session()`, called once when the KSW1 session is over: a Close either way, or
    the socket gone without one.
    """

    def __init__(self, max_payload: int, send_limit: int, send_timeout: float) -> None:
        super().__init__()
        self.ws: Optional[WSTransport] = None
        self.streams: dict[int, Stream] = {}
        self.targets_paused = False
        self.parser = frames.FrameParser(max_payload)
        self.congested = 0            # targets whose write buffer is full
        self.over_budget = False      # our queued output to the client passed send_limit
        self.reading_paused = False   # the client is not being read: congested or over budget
        self.send_limit = send_limit
        self.send_timeout = send_timeout
        self._budget_timer: Optional[asyncio.TimerHandle] = None
        self.closing = False  # a Close was sent: nothing else may follow it
        self.frames_in = 0    # WebSocket frames received (keepalive)
        self._close_timer: Optional[asyncio.TimerHandle] = None

    # -- what a subclass provides (ksw1fast.server.connection.Connection) ------------

    def on_control(self, type: int, flags: int, stream_id: int, payload: bytes) -> None:
        """Every frame but Data of a known stream."""

    def stream_ended(self, stream: Stream, exc: Optional[BaseException]) -> None:
        """The target of `stream` closed (or failed) on its own."""

    def stream_failed(self, stream: Stream, reason: str) -> None:
        """The client broke `stream`'s rules (overran its credit...)."""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        transport.underlying_transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        self.frames_in += 1
        if msg_type == WSMsgType.CLOSE:
            self._on_close_frame(frame.get_payload_as_bytes())
        elif self.closing:
            return  # after our Close only the peer's answer matters
        elif msg_type == WSMsgType.BINARY or msg_type == WSMsgType.CONTINUATION:
            self._feed(frame.get_payload_as_memoryview())
        elif msg_type == WSMsgType.TEXT:
            self.fail(WSClose.UNSUPPORTED_DATA, "KSW1 is carried in binary messages only")

    def _feed(self, data: memoryview) -> None:
        """The KSW1 frames of one binary WebSocket message."""
        try:
            frames = self.parser.feed(data)
        except FrameError as exc:
            self.fail(exc.close_code, exc.reason)
            return
        for f in frames:
            if f.type == _DATA:
                stream = self.streams.get(f.stream_id)
                if stream is not None:
                    stream.client_data(f.payload, f.flags)
                    continue
            self.on_control(f.type, f.flags, f.stream_id, bytes(f.payload))
            if self.closing:
                return  # that frame ended the session: the rest is not read

    def _on_close_frame(self, payload: bytes) -> None:
        """The peer's Close: answer it (unless it answers ours) and close the socket."""
        assert self.ws is not None
        if not self.closing:
            self.closing = True
            answer_close(self.ws, payload)
            self.end_session()
        self.ws.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for timer in (self._close_timer, self._budget_timer):
            if timer is not None:
                timer.cancel()
        if not self.closing:  # the socket went without a Close
            self.closing = True
            self.end_session()

    def end_session(self) -> None:
        """The KSW1 session is over; subclasses release what it holds."""

    def send_frame(self, type: int, stream_id: int, payload: Any = b"", flags: int = 0) -> None:
        """Send one KSW1 frame as one WebSocket message (the compiled relay batches small ones).

        Never picows' send() for this: for messages over 8 KiB it hands uvloop memoryviews
        of buffers that are reused, and uvloop queues them uncopied when the socket is busy.
        The external-buffer send copies whatever the kernel did not take.
        """
        assert self.ws is not None
        if self.closing:
            return
        size = len(payload)
        message = bytearray(WS_HEADROOM + HEADER_SIZE + size)  # one allocation, one copy
        frames.pack_header(message, WS_HEADROOM, type, flags, stream_id, size)
        message[WS_HEADROOM + HEADER_SIZE:] = payload
        self.ws.send_reuse_external_bytearray(WSMsgType.BINARY, message, WS_HEADROOM)
        if self.targets_paused:
            self._check_budget()

    def fail(self, code: int, reason: str) -> None:
        """Close this WebSocket (and only it) with `code`: the session ends now, the socket
        when the peer answers our Close (a client still sending would otherwise get a
        reset and lose the code), or after CLOSE_TIMEOUT."""
        assert self.ws is not None
        if self.closing:
            return
        self.closing = True
        send_close(self.ws, code, close_reason(reason))
        self.end_session()
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT,
                                                                  self.ws.disconnect)

    def pause_writing(self) -> None:
        self._pause_targets(True)

    def resume_writing(self) -> None:
        self._pause_targets(False)
        if self.over_budget:
            self.over_budget = False
            assert self._budget_timer is not None
            self._budget_timer.cancel()
            self._update_reading()

    def _pause_targets(self, on: bool) -> None:
        self.targets_paused = on
        for stream in self.streams.values():
            stream.set_paused(PAUSE_WEBSOCKET, on)

    def _check_budget(self) -> None:
        """Targets are paused, so what still grows our queue to the client is what we
        generate in answer to it (Pongs, DNS and PKCS#11 replies...): past send_limit,
        stop reading the client until the queue drains, and close it with 1008 if it
        does not drain within send_timeout."""
        assert self.ws is not None
        if self.over_budget or self.closing:
            return
        if self.ws.underlying_transport.get_write_buffer_size() > self.send_limit:
            self.over_budget = True
            self._update_reading()
            self._budget_timer = asyncio.get_running_loop().call_later(
                self.send_timeout, self._budget_timed_out)

    def _budget_timed_out(self) -> None:
        if self.over_budget:
            self.fail(WSClose.POLICY_VIOLATION, "client does not read what it asked for")

    def congest(self, delta: int) -> None:
        """Count targets whose write buffer is full; stop reading the WebSocket while any is."""
        self.congested += delta
        self._update_reading()

    def _update_reading(self) -> None:
        """Read the client unless a target is congested or our output is over budget."""
        pause = self.congested > 0 or self.over_budget
        if pause == self.reading_paused or self.ws is None or self.ws.is_disconnected:
            return
        self.reading_paused = pause
        if pause:
            self.ws.underlying_transport.pause_reading()
        else:
            self.ws.underlying_transport.resume_reading()
