"""asyncio client of KSW1: talk to any KSW1 gateway from Python.

    client = await ksw1fast.client.connect("ws://127.0.0.1:8088/ws")
    stream = await client.open_connection("example.internal", 5432)
    stream.write(b"hello"); await stream.drain()
    reply = await stream.read(100)
    stream.write_eof()            # half-close: we are done sending
    await stream.close()
    addresses = await client.resolve("localhost")
    await client.close()

Built on picows and the same codec as the server.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import ssl
from typing import Any, Deque, Optional

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from ksw1fast import framing
from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import (DEFAULT_INITIAL_CREDIT, DEFAULT_MAX_PAYLOAD, AddrKind, Feature,
                                Flag, FrameType, Proto)
from ksw1fast.protocol.errors import DnsError, FrameError, OpenError
from ksw1fast.protocol.messages import HelloAck, OpenOkInfo, Pkcs11Response
from ksw1fast.protocol.close import CLOSE_TIMEOUT, close_reason
from ksw1fast.wsclose import answer_close, send_close

# What the polyfill asks for without flow control (docs/protocol.md §3).
POLYFILL_FEATURES = Feature.HALF_CLOSE | Feature.DNS | Feature.UDP | Feature.PKCS11
WRITE_CHUNK = 256 * 1024       # Data payload size used to split large writes
READ_HIGH_WATER = 4 * 1024 * 1024  # buffered per stream before we stop reading the WebSocket
ACK_STEP = 64 * 1024           # with FlowControl, return credit once this much was read


class _Flow:
    """What TCP streams and UDP flows share: the id, sending with credits, closing."""

    split = True  # may a payload be cut to fit the credit (not for datagrams)

    def __init__(self, client: "KSW1Client", stream_id: int) -> None:
        self._client = client
        self.stream_id = stream_id
        self.info: Optional[OpenOkInfo] = None  # local/peer address from OpenOk, if sent
        self._closed = False       # the gateway closed the flow (Close or CloseAck)
        self.close_reason: Optional[int] = None
        self._waiters: list[asyncio.Future] = []  # readers and drainers waiting for a change
        self._closed_waiter: asyncio.Future = client._loop.create_future()
        # FlowControl: None when off, else the bytes we may still send
        self._send_credit: Optional[int] = client._initial_credit
        self._outbox: Deque[tuple[Any, int]] = collections.deque()
        self.auto_ack = True       # return credit as the application reads
        self._unacked = 0

    def _queue(self, payload: Any, flags: int = 0) -> None:
        self._outbox.append((payload, flags))
        self._flush()

    def _flush(self) -> None:
        """Send what the credit allows (everything without FlowControl)."""
        while self._outbox and not self._closed:
            payload, flags = self._outbox[0]
            size = len(payload)
            if self._send_credit is not None and size:
                if self._send_credit < (1 if self.split else size):
                    return
                if size > self._send_credit:
                    self._outbox[0] = (payload[self._send_credit:], flags)
                    payload, flags, size = payload[:self._send_credit], 0, self._send_credit
                else:
                    self._outbox.popleft()
                self._send_credit -= size
            else:
                self._outbox.popleft()
            self._client._send(FrameType.DATA, self.stream_id, payload, flags)
        self._wake()

    def _add_credit(self, n: int) -> None:
        if self._send_credit is not None:
            self._send_credit += n
            self._flush()

    async def drain(self) -> None:
        """Wait until everything written was sent (credit permitting) and the socket drained."""
        while self._outbox and not self._closed:
            await self._wait()
        await self._client.drain()

    def _consumed(self, n: int) -> None:
        if self._client.flow_control and self.auto_ack and n:
            self._unacked += n
            if self._unacked >= ACK_STEP:
                self.ack(self._unacked)

    def ack(self, n: int) -> None:
        """Return n bytes of credit to the gateway (DataAck); automatic unless auto_ack is off."""
        self._unacked = max(0, self._unacked - n)
        self._client._send(FrameType.DATA_ACK, self.stream_id, payloads.encode_data_ack(n))

    async def _wait(self) -> None:
        waiter = self._client._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _feed(self, data: Any, flags: int) -> None:
        """Data from the gateway (each kind of flow keeps it its own way)."""

    def _on_closed(self, reason: int) -> None:
        self._closed = True
        self.close_reason = reason
        if not self._closed_waiter.done():
            self._closed_waiter.set_result(reason)
        self._wake()

    async def close(self) -> None:
        """Close the flow and wait for the gateway's CloseAck (or its own Close)."""
        if not self._closed:
            self._client._send(FrameType.CLOSE, self.stream_id, payloads.encode_close(0))
            await self._closed_waiter
        self._client._streams.pop(self.stream_id, None)

    async def wait_closed(self) -> int:
        """Wait until the gateway closes the flow; returns the Close reason."""
        return await self._closed_waiter


class Stream(_Flow):
    """One TCP stream: a reader/writer pair in one object, with half-close."""

    def __init__(self, client: "KSW1Client", stream_id: int) -> None:
        super().__init__(client, stream_id)
        self._buffer = bytearray()
        self._eof = False
        self._throttling = False
        self._limit = READ_HIGH_WATER  # unread bytes we hold before pausing the WebSocket

    # -- reading -------------------------------------------------------------------------

    def at_eof(self) -> bool:
        return (self._eof or self._closed) and not self._buffer

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all buffered bytes if n < 0); b"" at EOF or after Close."""
        while not self._buffer and not self._eof and not self._closed:
            await self._wait()
        if n < 0 or n >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
        self._taken(len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        # a reader waiting for n bytes must be allowed to buffer n bytes
        self._limit = max(READ_HIGH_WATER, n)
        self._maybe_unthrottle()
        while len(self._buffer) < n:
            if self._eof or self._closed:
                raise asyncio.IncompleteReadError(bytes(self._buffer), n)
            await self._wait()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._limit = READ_HIGH_WATER
        self._taken(n)
        return data

    async def read_until_eof(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            chunk = await self.read()
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def _taken(self, n: int) -> None:
        self._maybe_unthrottle()
        self._consumed(n)

    def _feed(self, data: Any, flags: int) -> None:
        if data:
            self._buffer += data
            # with FlowControl the gateway bounds each stream: no need to stall them all
            if (not self._client.flow_control and len(self._buffer) > self._limit
                    and not self._throttling):
                self._throttling = True
                self._client._throttle(1)
        if flags & Flag.EOF:
            self._eof = True
        self._wake()

    def _maybe_unthrottle(self) -> None:
        if self._throttling and len(self._buffer) <= self._limit // 2:
            self._throttling = False
            self._client._throttle(-1)

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            self._queue(view[start:start + WRITE_CHUNK])

    def write_eof(self) -> None:
        """Half-close: Data with EOF; the gateway shuts down the target's write side."""
        self._queue(b"", Flag.EOF)


class Datagrams(_Flow):
    """One UDP flow: each send() is one datagram, each recv() returns one."""

    split = False

    def __init__(self, client: "KSW1Client", stream_id: int) -> None:
        super().__init__(client, stream_id)
        self._inbox: Deque[bytes] = collections.deque()

    def send(self, datagram: bytes) -> None:
        self._queue(bytes(datagram))

    async def recv(self) -> bytes:
        """The next datagram; ConnectionError once the flow is closed and drained."""
        while not self._inbox:
            if self._closed:
                raise ConnectionError("UDP flow closed")
            await self._wait()
        datagram = self._inbox.popleft()
        self._consumed(len(datagram))
        return datagram

    def _feed(self, data: Any, flags: int) -> None:
        self._inbox.append(bytes(data))
        self._wake()


class _Listener(WSListener):
    def __init__(self, client: "KSW1Client") -> None:
        super().__init__()
        self.client = client

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.client._on_ws_frame(frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.client._on_disconnected()

    def pause_writing(self) -> None:
        self.client._writable.clear()

    def resume_writing(self) -> None:
        self.client._writable.set()


class KSW1Client:
    """A KSW1 connection; make it with `connect()`."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._loop = asyncio.get_running_loop()
        self._parser = framing.FrameParser(max_payload)
        self.ws: Optional[WSTransport] = None
        self.hello_ack: Optional[HelloAck] = None
        self._hello_waiter: asyncio.Future = self._loop.create_future()
        self._streams: dict[int, _Flow] = {}
        self.flow_control = False
        self._initial_credit: Optional[int] = None  # our send window per stream, with FlowControl
        self._opens: dict[int, asyncio.Future] = {}
        self._dns: dict[int, asyncio.Future] = {}
        self._pkcs11: dict[int, asyncio.Future] = {}
        self._pings: Deque[asyncio.Future] = collections.deque()
        self._next = {"stream": 1, "dns": 1, "pkcs11": 1}
        self._writable = asyncio.Event()
        self._writable.set()
        self._throttled = 0
        self.disconnected: asyncio.Future = self._loop.create_future()

    @property
    def features(self) -> int:
        assert self.hello_ack is not None
        return self.hello_ack.features

    @property
    def max_streams(self) -> int:
        assert self.hello_ack is not None
        return self.hello_ack.max_streams

    # -- sending --------------------------------------------------------------------------

    def _send(self, type: int, stream_id: int, payload: Any = b"", flags: int = 0) -> None:
        if self.ws is None or self.ws.is_disconnected:
            raise ConnectionError("KSW1 connection is closed")
        self.ws.send(WSMsgType.BINARY, framing.encode_frame(type, stream_id, payload, flags))

    def send_raw(self, message: bytes) -> None:
        """Send one binary WebSocket message as is (several or partial frames allowed)."""
        assert self.ws is not None
        self.ws.send(WSMsgType.BINARY, message)

    async def drain(self) -> None:
        """Wait until the WebSocket's write buffer is below its low-water mark."""
        if not self._writable.is_set():
            waiter = asyncio.ensure_future(self._writable.wait())
            done, _ = await asyncio.wait({waiter, self.disconnected},
                                         return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self.disconnected in done:
                raise ConnectionError("KSW1 connection is closed")

    def _take_id(self, space: str) -> int:
        n = self._next[space]
        self._next[space] = n + 1 if n < 0xFFFFFFFF else 1
        return n

    async def _request(self, table: dict[int, asyncio.Future], space: str, type: int,
                       payload: bytes) -> Any:
        query_id = self._take_id(space)
        waiter = self._loop.create_future()
        table[query_id] = waiter
        try:
            self._send(type, query_id, payload)
            return await waiter
        finally:
            table.pop(query_id, None)

    # -- requests -------------------------------------------------------------------------

    async def open_connection(self, host: str, port: int, token: bytes = b"") -> Stream:
        """Open a TCP stream to host:port through the gateway (addr_kind 1, as the polyfill)."""
        return await self.open_stream(
            payloads.encode_open(Proto.TCP, AddrKind.HOSTNAME, port, host.encode(), token))

    async def open_udp(self, host: str, port: int, token: bytes = b"") -> Datagrams:
        """Open a UDP flow to host:port through the gateway (docs/protocol.md §7)."""
        flow = await self.open_stream(
            payloads.encode_open(Proto.UDP, AddrKind.HOSTNAME, port, host.encode(), token),
            Datagrams)
        assert isinstance(flow, Datagrams)
        return flow

    async def open_stream(self, open_payload: bytes, kind: type = Stream) -> Any:
        """Open a flow from a caller-built Open payload (raw address kinds...)."""
        stream_id = self._take_id("stream")
        stream = kind(self, stream_id)
        self._streams[stream_id] = stream
        waiter = self._loop.create_future()
        self._opens[stream_id] = waiter
        try:
            self._send(FrameType.OPEN, stream_id, open_payload)
            stream.info = await waiter
        except BaseException:
            self._streams.pop(stream_id, None)
            raise
        finally:
            self._opens.pop(stream_id, None)
        return stream

    async def resolve(self, name: str, family: int = 0) -> list[str]:
        """Addresses of `name` as text (family 0 any, 4 or 6); DnsError on DnsErr."""
        raw = await self._request(self._dns, "dns", FrameType.DNS_QUERY,
                                  payloads.encode_dns_query(family, name))
        return [str(ipaddress.ip_address(a)) for a in raw]

    async def pkcs11(self, fn_id: int, args: bytes = b"") -> Pkcs11Response:
        """One raw PKCS#11 RPC call (docs/pkcs11.md); the body is returned undecoded."""
        return await self._request(self._pkcs11, "pkcs11", FrameType.PKCS11_REQUEST,
                                   payloads.encode_pkcs11_request(fn_id, args))

    async def ping(self, payload: bytes = b"") -> bytes:
        """KSW1 Ping; returns the Pong's payload."""
        waiter = self._loop.create_future()
        self._pings.append(waiter)
        self._send(FrameType.PING, 0, payload)
        return await waiter

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close with 1000 and wait for the gateway's answering Close (which closes the
        socket), at most `timeout` seconds."""
        if self.ws is not None and not self.ws.is_disconnected:
            if not self.ws.is_close_frame_sent:
                self.ws.send_close(WSCloseCode.OK)
            try:
                await asyncio.wait_for(asyncio.shield(self.disconnected), timeout)
            except asyncio.TimeoutError:
                self.ws.disconnect()
        await asyncio.shield(self.disconnected)

    async def __aenter__(self) -> "KSW1Client":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- receiving ------------------------------------------------------------------------

    def _throttle(self, delta: int) -> None:
        """Stop reading the WebSocket while any stream holds too much unread data."""
        before = self._throttled
        self._throttled += delta
        if self.ws is None or self.ws.is_disconnected:
            return
        if before == 0 and self._throttled:
            self.ws.underlying_transport.pause_reading()
        elif before and not self._throttled:
            self.ws.underlying_transport.resume_reading()

    def _on_ws_frame(self, frame: WSFrame) -> None:
        assert self.ws is not None
        if frame.msg_type == WSMsgType.CLOSE:
            if not self.ws.is_close_frame_sent:  # else this answers ours
                answer_close(self.ws, frame.get_payload_as_bytes())
            self.ws.disconnect()
            return
        if frame.msg_type not in (WSMsgType.BINARY, WSMsgType.CONTINUATION):
            return
        try:
            frames = self._parser.feed(frame.get_payload_as_memoryview())
        except FrameError as exc:
            send_close(self.ws, exc.close_code, close_reason(exc.reason))
            self.ws.disconnect()
            return
        for f in frames:
            self._dispatch(f.type, f.flags, f.stream_id, f.payload)

    def _dispatch(self, type: int, flags: int, sid: int, payload: Any) -> None:
        if type == FrameType.DATA:
            stream = self._streams.get(sid)
            if stream is not None:
                stream._feed(payload, flags)
        elif type == FrameType.DATA_ACK:
            stream = self._streams.get(sid)
            if stream is not None:
                stream._add_credit(payloads.decode_data_ack(payload))
        elif type in (FrameType.CLOSE, FrameType.CLOSE_ACK):
            stream = self._streams.pop(sid, None)
            if stream is not None:
                stream._on_closed(payloads.decode_close(payload) if type == FrameType.CLOSE else 0)
        elif type == FrameType.OPEN_OK:
            _resolve(self._opens.get(sid), payloads.decode_open_ok(payload))
        elif type == FrameType.OPEN_ERR:
            err = payloads.decode_open_err(payload)
            _fail(self._opens.get(sid), OpenError(err.code, err.message))
        elif type == FrameType.DNS_RESULT:
            _resolve(self._dns.get(sid), payloads.decode_dns_result(payload))
        elif type == FrameType.DNS_ERR:
            err = payloads.decode_dns_err(payload)
            _fail(self._dns.get(sid), DnsError(err.code, err.message))
        elif type == FrameType.PKCS11_RESPONSE:
            _resolve(self._pkcs11.get(sid), payloads.decode_pkcs11_response(payload))
        elif type == FrameType.HELLO_ACK:
            _resolve(self._hello_waiter, payloads.decode_hello_ack(payload))
        elif type == FrameType.PING:
            self._send(FrameType.PONG, 0, bytes(payload))
        elif type == FrameType.PONG and self._pings:
            _resolve(self._pings.popleft(), bytes(payload))

    def _on_disconnected(self) -> None:
        error = ConnectionError("KSW1 connection closed")
        for table in (self._opens, self._dns, self._pkcs11):
            for waiter in table.values():
                _fail(waiter, error)
        for waiter in (self._hello_waiter, *self._pings):
            _fail(waiter, error)
        for stream in list(self._streams.values()):
            stream._on_closed(1)
        self._streams.clear()
        _resolve(self.disconnected, None)


def _resolve(waiter: Optional[asyncio.Future], value: Any) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


def _fail(waiter: Optional[asyncio.Future], exc: BaseException) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_exception(exc)
        waiter.exception()  # mark retrieved: nobody may be waiting any more


async def connect(url: str, *, features: int = POLYFILL_FEATURES, max_streams: int = 64,
                  token: Optional[bytes] = None, max_payload: int = DEFAULT_MAX_PAYLOAD,
                  extra_headers: Optional[dict[str, str]] = None,
                  ssl_context: Optional[ssl.SSLContext] = None,
                  timeout: float = 10.0) -> KSW1Client:
    """Open a WebSocket to a KSW1 gateway and complete Hello/HelloAck.

    `ssl_context` verifies a wss:// gateway (default: the system's trusted CAs).
    """
    client = KSW1Client(max_payload)
    transport, _ = await ws_connect(lambda: _Listener(client), url,
                                    max_frame_size=max_payload + 64,
                                    extra_headers=extra_headers,
                                    websocket_handshake_timeout=timeout,
                                    ssl_context=ssl_context, use_aiofastnet=False)
    client.ws = transport
    client._send(FrameType.HELLO, 0, payloads.encode_hello(features, max_streams, token))
    try:
        client.hello_ack = ack = await asyncio.wait_for(client._hello_waiter, timeout)
    except BaseException:
        transport.disconnect()
        raise
    if ack.features & Feature.FLOW_CONTROL:
        client.flow_control = True
        client._initial_credit = ack.initial_credit or DEFAULT_INITIAL_CREDIT
    return client
