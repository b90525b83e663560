"""One client WebSocket: handshake, stream table and the control frames of spec §3-§8.

Data of open streams never comes here: the relay (compiled or twin) hands it to the
stream directly.  Everything else arrives in `on_control` with the payload as bytes.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from functools import partial
from typing import Any, Callable, Optional

from picows import WSTransport

from ksw1fast.ops import metrics
from ksw1fast.protocol import payloads
from ksw1fast.server import relaying
from ksw1fast.security.tokens import AuthError, Grant
from ksw1fast.config import GatewayConfig
from ksw1fast.protocol.constants import (DEFAULT_CLIENT_MAX_STREAMS, DEFAULT_INITIAL_CREDIT, AddrKind,
                                CloseReason, DnsErrCode, Feature, FrameType, OpenErrCode,
                                Pkcs11Status, Proto, WSClose)
from ksw1fast.protocol.errors import MalformedPayload
from ksw1fast.server.limits import Rate
from ksw1fast.ops.logs import Throttled
from ksw1fast.protocol.messages import OpenOkInfo, OpenRequest, SockAddr
from ksw1fast.security.peers import Peer
from ksw1fast.pkcs11 import wire
from ksw1fast.pkcs11.supervisor import Pkcs11Backend
from ksw1fast.security.resolve import (Endpoint, ResolveError, Resolver, address_bytes, open_error,
                               open_socket)
from ksw1fast.security.gate import Security
from ksw1fast.protocol.close import closed_code

log = logging.getLogger("ksw1fast")
refusals = Throttled(log)  # what a client can cause at will: bounded

# What this server really implements; a HelloAck carries the intersection with the client's.
# Pkcs11 is granted even without a module: calls then get a clear Internal error.
SERVER_FEATURES = (Feature.FLOW_CONTROL | Feature.HALF_CLOSE | Feature.DNS | Feature.UDP
                   | Feature.PKCS11)
_CLOSE_ACK = struct.pack("<I", 0)  # what the reference sends; the polyfill accepts either
_BEFORE_HELLO_OK = {FrameType.HELLO, FrameType.PING}
_KNOWN_TYPES = {int(t) for t in FrameType}
_STREAM_CLASSES = {Proto.TCP: relaying.TcpStream, Proto.UDP: relaying.UdpStream}


def _target_host(req: OpenRequest) -> str:
    """The Open's address as text for the resolver; ResolveError for bad address bytes."""
    if req.addr_kind == AddrKind.HOSTNAME:
        try:
            host = req.addr.decode()
        except UnicodeDecodeError:
            host = ""
        if not host or "\x00" in host:
            raise ResolveError(DnsErrCode.FORMAT_ERROR, "host name is not valid UTF-8 text")
        return host
    size = 4 if req.addr_kind == AddrKind.IPV4 else 16
    if len(req.addr) != size:
        raise ResolveError(DnsErrCode.FORMAT_ERROR,
                           f"IPv{4 if size == 4 else 6} address must be {size} bytes")
    return str(ipaddress.ip_address(req.addr))


class Connection(relaying.GatewayListener):  # type: ignore[misc, name-defined]
    """State of one client WebSocket of the gateway."""

    # an idle connection should cost little memory: no per-instance __dict__
    __slots__ = ("config", "pkcs11", "security", "resolver", "grant", "_grant_error", "peer", "hello_done",
                 "features", "max_streams", "_on_closed", "_tasks", "_lookups", "_calls", "_counted",
                 "_streams_at_end", "_frames_seen", "_pinged", "_requests")

    def __init__(self, config: GatewayConfig, on_closed: Callable[["Connection"], None],
                 pkcs11: Pkcs11Backend, security: Security, resolver: Resolver,
                 grant: Optional[Grant], peer: Peer) -> None:
        super().__init__(config.max_payload, config.send_buffer_limit, config.send_timeout)
        self.config = config
        self.pkcs11 = pkcs11
        self.security = security
        self.resolver = resolver
        self.grant = grant              # from the handshake token (or the Hello extension)
        self._grant_error: Optional[AuthError] = None  # why a presented token was refused
        self.peer = peer  # the client: its socket's address, or what its proxies said
        self.hello_done = False
        self.features = 0
        self.max_streams = 0
        self._on_closed = on_closed
        self._tasks: dict[int, asyncio.Task] = {}  # stream id -> its connect task
        # DNS lookups and PKCS#11 calls in flight (dicts: an empty set costs 3x the memory)
        self._lookups: dict[asyncio.Future, None] = {}
        self._calls: dict[asyncio.Future, None] = {}
        self._counted: dict[Any, tuple[int, int]] = {}  # stream -> bytes already in metrics
        self._streams_at_end = 0  # streams open when the session ended (for the log)
        self._frames_seen = 0     # frames_in at the last keepalive sweep
        self._pinged = False      # a keepalive ping is unanswered
        self._requests = Rate(config.max_open_rate)  # Opens and DnsQueries a second

    # -- WebSocket lifecycle ------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        log.info("connection open peer=%s", self.peer)
        metrics.CONNECTIONS.inc()
        metrics.CONNECTIONS_TOTAL.inc()

    def end_session(self) -> None:
        """A Close either way, or the socket gone: release every stream, lookup and
        PKCS#11 call now, not when the socket finally closes."""
        self._streams_at_end = len(self.streams)
        for stream in self.streams.values():
            stream.forget()
            self._count_bytes(stream, final=True)
        self.streams.clear()
        for task in (*self._tasks.values(), *self._lookups, *self._calls):
            task.cancel()
        self._tasks.clear()
        close = getattr(self.pkcs11, "close", None)
        if close is not None:  # ends this connection's agent and its sessions
            _background(close())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        super().on_ws_disconnected(transport)
        handshake = transport.close_handshake
        sent = recv = None
        if handshake is not None:
            sent = None if handshake.sent is None else int(handshake.sent.code)
            recv = None if handshake.recv is None else int(handshake.recv.code)
        code = closed_code(sent, recv)
        log.info("connection closed peer=%s open_streams=%d close_code=%d", self.peer,
                 self._streams_at_end, code)
        metrics.CONNECTIONS.dec()
        metrics.CONNECTIONS_CLOSED.labels(str(code)).inc()
        self._on_closed(self)

    def keepalive(self) -> None:
        """One keepalive sweep: ping a client that sent nothing since the last sweep (its
        pong, like any frame, counts as something), close one that answered no ping."""
        if self.ws is None or self.closing:
            return
        if self.frames_in != self._frames_seen:
            self._frames_seen = self.frames_in
            self._pinged = False
        elif self._pinged:
            self.fail(WSClose.GOING_AWAY, "no answer to ping")
        else:
            self._pinged = True
            self.ws.send_ping()

    def go_away(self) -> None:
        """The gateway is shutting down: close 1001 (going away)."""
        if self.ws is not None and not self.ws.is_disconnected:
            self.fail(WSClose.GOING_AWAY, "gateway shutting down")

    # -- frames ---------------------------------------------------------------------

    def on_control(self, type: int, flags: int, stream_id: int, payload: bytes) -> None:
        if not self.hello_done:
            if type == FrameType.HELLO:
                self._on_hello(payload)
            elif type == FrameType.PING:
                self._on_ping(flags, stream_id, payload)
            elif type in _KNOWN_TYPES:
                self.fail(WSClose.PROTOCOL_ERROR, f"frame type 0x{type:02x} before Hello")
            return  # unknown types are ignored (forward compatibility)
        handler = _HANDLERS.get(type)
        if handler is not None:
            handler(self, flags, stream_id, payload)
        # Data/DataAck of unknown streams, Pong and unknown types: ignored (spec §2, §5)

    def _on_hello(self, payload: bytes) -> None:
        try:
            hello = payloads.decode_hello(payload)
        except MalformedPayload as exc:
            self.fail(WSClose.PROTOCOL_ERROR, f"malformed Hello: {exc}")
            return
        if hello.token and self.grant is None:
            try:
                self.grant = self.security.verify(hello.token)
            except AuthError as exc:
                self._grant_error = exc
        server = SERVER_FEATURES | (Feature.OPEN_TOKEN if self.security.open_token else 0)
        self.features = hello.features & server
        self.max_streams = min(hello.max_streams or DEFAULT_CLIENT_MAX_STREAMS,
                               self.config.max_streams)
        self.hello_done = True
        self.send_frame(FrameType.HELLO_ACK, 0, payloads.encode_hello_ack(
            self.features, self.max_streams, self.config.max_payload, DEFAULT_INITIAL_CREDIT))

    def _on_duplicate_hello(self, flags: int, stream_id: int, payload: bytes) -> None:
        self.fail(WSClose.PROTOCOL_ERROR, "second Hello")

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        self.send_frame(FrameType.PONG, 0, payload)

    def _authorize(self, token: bytes = b"") -> Grant:
        """The grant for one request: its own token, else the connection's; AuthError."""
        if token:
            grant = self.security.verify(token)
        elif self.grant is not None:
            grant = self.grant
        else:
            raise self._grant_error or AuthError("missing")
        if grant.expired():
            raise AuthError("expired")
        return grant

    # -- streams --------------------------------------------------------------------

    def _open_err(self, stream_id: int, code: OpenErrCode, message: str, dest: str = "?") -> None:
        refusals.info("open refused peer=%s stream=%d dest=%s reason=%s: %s",
                 self.peer, stream_id, dest, code.name, message)
        metrics.child(metrics.STREAMS, dest.split(" ", 1)[0] if " " in dest else "?",
                      code.name.lower()).inc()
        if code == OpenErrCode.BLOCKED:
            metrics.child(metrics.POLICY_DENIALS, "egress").inc()
        self.send_frame(FrameType.OPEN_ERR, stream_id, payloads.encode_open_err(code, message))

    def _on_open(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id in self.streams:
            self._open_err(stream_id, OpenErrCode.INTERNAL, "stream id already in use")
            return
        if not self._requests.allow():
            metrics.child(metrics.LIMITS, "open_rate").inc()
            self._open_err(stream_id, OpenErrCode.TOO_MANY_STREAMS,
                           f"more than {self.config.max_open_rate:g} Opens and DNS queries "
                           "a second")
            return
        try:
            req = payloads.decode_open(payload)
        except MalformedPayload as exc:
            self._open_err(stream_id, OpenErrCode.INTERNAL, f"malformed Open: {exc}")
            return
        if req.addr_kind not in (AddrKind.HOSTNAME, AddrKind.IPV4, AddrKind.IPV6):
            self._open_err(stream_id, OpenErrCode.INTERNAL, f"unknown addr_kind {req.addr_kind}")
            return
        if req.proto not in _STREAM_CLASSES:
            self._open_err(stream_id, OpenErrCode.INTERNAL, f"unknown protocol {req.proto}")
            return
        if len(self.streams) >= self.max_streams:
            self._open_err(stream_id, OpenErrCode.TOO_MANY_STREAMS,
                           f"at most {self.max_streams} streams per connection")
            return
        try:
            host = _target_host(req)
        except ResolveError as exc:
            self._open_err(stream_id, OpenErrCode.RESOLVE_FAIL, str(exc))
            return
        proto = "udp" if req.proto == Proto.UDP else "tcp"
        dest = f"{proto} {host}:{req.port}"
        try:
            grant = self._authorize(req.token)
        except AuthError as exc:
            metrics.child(metrics.AUTH_FAILURES, exc.kind).inc()
            self._open_err(stream_id, exc.open_err, f"token {exc.kind}", dest)
            return
        if (proto == "udp" and not grant.allows_udp) or not grant.allows_open(host, req.port,
                                                                                proto):
            metrics.child(metrics.AUTH_FAILURES, "scope").inc()
            self._open_err(stream_id, OpenErrCode.AUTH_FAILED,
                           "the token does not allow this destination", dest)
            return
        stream = _STREAM_CLASSES[req.proto](self, stream_id,
                                            bool(self.features & Feature.FLOW_CONTROL),
                                            DEFAULT_INITIAL_CREDIT)
        self.streams[stream_id] = stream
        task = asyncio.get_running_loop().create_task(
            self._connect(stream, host, req.port, proto == "udp", dest))
        self._tasks[stream_id] = task

    async def _connect(self, stream: "relaying.Stream", host: str, port: int, udp: bool,
                       dest: str) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        # one timer, not wait_for: that would run open_socket in a second task
        timer = loop.call_later(self.config.connect_timeout, self._connect_timed_out, stream,
                                task, dest)
        try:
            sock = await open_socket(self.resolver, host, port,
                                     socket.SOCK_DGRAM if udp else socket.SOCK_STREAM,
                                     self.security.egress)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail_open(stream, *open_error(exc), dest)
            return
        finally:
            timer.cancel()
            # the client may have closed this stream and opened its id again meanwhile
            if self._tasks.get(stream.stream_id) is task:
                del self._tasks[stream.stream_id]
                if not self._tasks:  # a dict keeps its grown table after pops: start afresh
                    self._tasks = {}
        try:
            if udp:
                transport, _ = await loop.create_datagram_endpoint(lambda: stream, sock=sock)
            else:
                transport, _ = await loop.create_connection(lambda: stream, sock=sock)
        except OSError as exc:
            sock.close()
            self._fail_open(stream, OpenErrCode.INTERNAL, str(exc), dest)
            return
        if self.streams.get(stream.stream_id) is not stream:  # closed while we connected
            transport.abort()
            return
        self.send_frame(FrameType.OPEN_OK, stream.stream_id, payloads.encode_open_ok(
            OpenOkInfo(_sockaddr(transport.get_extra_info("sockname")),
                       _sockaddr(transport.get_extra_info("peername")))))
        stream.start()
        metrics.child(metrics.STREAMS, "udp" if udp else "tcp", "ok").inc()
        metrics.OPEN_SECONDS.observe(time.monotonic() - started)
        log.debug("stream open peer=%s stream=%d dest=%s", self.peer, stream.stream_id, dest)

    def _connect_timed_out(self, stream: "relaying.Stream", task: "asyncio.Task[None]",
                           dest: str) -> None:
        if self.streams.get(stream.stream_id) is stream:  # else the client closed it
            task.cancel()  # closes the socket being connected
            self._fail_open(stream, *open_error(TimeoutError()), dest)

    def _fail_open(self, stream: "relaying.Stream", code: OpenErrCode, message: str,
                   dest: str) -> None:
        """OpenErr for a stream whose connect failed, unless the client closed it meanwhile."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            self._open_err(stream.stream_id, code, message, dest)

    def _on_close(self, flags: int, stream_id: int, payload: bytes) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return  # unknown or already closed: it may have crossed our Close
        task = self._tasks.pop(stream_id, None)
        if task is not None:
            task.cancel()
        stream.forget()
        self._count_bytes(stream, final=True)
        self.send_frame(FrameType.CLOSE_ACK, stream_id, _CLOSE_ACK)

    def _on_data_ack(self, flags: int, stream_id: int, payload: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # unknown or closed stream: ignored (spec §5)
        try:
            stream.add_credit(payloads.decode_data_ack(payload))
        except MalformedPayload:
            self.stream_failed(stream, "malformed DataAck")

    def stream_ended(self, stream: "relaying.Stream", exc: Optional[BaseException]) -> None:
        """The target closed (or failed) on its own: tell the client and forget the stream."""
        self._count_bytes(stream, final=True)
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            reason = CloseReason.NORMAL if exc is None else CloseReason.ERROR
            self.send_frame(FrameType.CLOSE, stream.stream_id, payloads.encode_close(reason))

    def stream_failed(self, stream: "relaying.Stream", reason: str) -> None:
        """The client broke a stream's rules: drop the target and Close(sid, 1)."""
        refusals.info("stream closed peer=%s stream=%d reason=%s", self.peer, stream.stream_id,
                      reason)
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        stream.forget()
        self._count_bytes(stream, final=True)
        self.send_frame(FrameType.CLOSE, stream.stream_id, payloads.encode_close(CloseReason.ERROR))

    # -- DNS ---------------------------------------------------------------------------

    def _on_dns_query(self, flags: int, query_id: int, payload: bytes) -> None:
        if not self._requests.allow():
            metrics.child(metrics.LIMITS, "open_rate").inc()
            self._dns_err(query_id, DnsErrCode.REFUSED,
                          f"more than {self.config.max_open_rate:g} Opens and DNS queries "
                          "a second")
            return
        try:
            query = payloads.decode_dns_query(payload)
            if query.family not in (0, 4, 6):
                raise MalformedPayload(f"family {query.family} is not 0, 4 or 6")
            if not query.name or len(query.name) > 253 or "\x00" in query.name:
                raise MalformedPayload("name must be 1 to 253 characters")
        except MalformedPayload as exc:
            self._dns_err(query_id, DnsErrCode.FORMAT_ERROR, str(exc))
            return
        try:
            allowed = self._authorize().allows_dns(query.name)
        except AuthError as exc:
            metrics.child(metrics.AUTH_FAILURES, exc.kind).inc()
            self._dns_err(query_id, DnsErrCode.REFUSED, f"token {exc.kind}")
            return
        decision = self.security.egress.check_name(query.name)
        if not allowed or not decision.allowed:
            self._dns_err(query_id, DnsErrCode.REFUSED,
                          decision.reason if allowed else "the token does not allow DNS here")
            return
        if len(self._lookups) >= self.config.max_dns_queries:
            metrics.child(metrics.LIMITS, "dns_queries").inc()
            self._dns_err(query_id, DnsErrCode.SERVER_FAILURE,
                          f"more than {self.config.max_dns_queries} queries in flight")
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(self.resolver.lookup(query.name, 0, query.family))
        # one timer, not wait_for: that would run the lookup in a second task
        timer = loop.call_later(self.config.dns_timeout, self._dns_timed_out, query_id, task)
        self._lookups[task] = None
        task.add_done_callback(partial(self._dns_done, query_id, query.name, timer))

    def _dns_timed_out(self, query_id: int, task: "asyncio.Task[list[Endpoint]]") -> None:
        # (a closed connection has cancelled the task, which is done only a step later)
        if not task.done() and not self.ws.is_disconnected:
            task.cancel()
            self._dns_err(query_id, DnsErrCode.TIMEOUT, "lookup timed out")

    def _dns_done(self, query_id: int, name: str, timer: asyncio.TimerHandle,
                  task: "asyncio.Task[list[Endpoint]]") -> None:
        timer.cancel()
        self._lookups.pop(task, None)
        if task.cancelled():
            return  # timed out (answered already) or the connection is gone
        try:
            endpoints = task.result()
        except ResolveError as exc:
            self._dns_err(query_id, exc.dns_code, str(exc))
            return
        addresses = self.security.egress.filter_dns(
            name, list(dict.fromkeys(address_bytes(e) for e in endpoints)))
        if not addresses:
            self._dns_err(query_id, DnsErrCode.REFUSED, "every address is denied by policy")
            return
        metrics.child(metrics.DNS_QUERIES, "ok").inc()
        self.send_frame(FrameType.DNS_RESULT, query_id, payloads.encode_dns_result(addresses))

    def _dns_err(self, query_id: int, code: DnsErrCode, message: str) -> None:
        metrics.child(metrics.DNS_QUERIES, code.name.lower()).inc()
        if code == DnsErrCode.REFUSED:
            metrics.child(metrics.POLICY_DENIALS, "dns").inc()
        self.send_frame(FrameType.DNS_ERR, query_id, payloads.encode_dns_err(code, message))

    # -- PKCS#11 ----------------------------------------------------------------------

    def _on_pkcs11_request(self, flags: int, query_id: int, payload: bytes) -> None:
        try:
            request = payloads.decode_pkcs11_request(payload)
        except MalformedPayload as exc:
            self._pkcs11_reply(*wire.protocol_error(f"malformed request: {exc}"), query_id)
            return
        try:
            allowed = self._authorize().allows_pkcs11
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.kind).inc()
            allowed = False
            reason = f"token {exc.kind}"
        else:
            reason = "the token does not allow PKCS#11"
        if not allowed:
            self._pkcs11_reply(*wire.auth_denied(reason), query_id)
            return
        if len(self._calls) >= self.config.pkcs11.max_calls:
            # bounds what answers may pile up: max_calls x max_out bytes (spec §6 spirit)
            metrics.child(metrics.LIMITS, "pkcs11_calls").inc()
            self._pkcs11_reply(*wire.internal(
                f"more than {self.config.pkcs11.max_calls} PKCS#11 calls in flight"), query_id)
            return
        # the built-in agents answer with a plain future: no task per call on this path
        answer = asyncio.ensure_future(self.pkcs11.handle(request.fn_id, request.args))
        self._calls[answer] = None
        answer.add_done_callback(partial(self._pkcs11_done, query_id, request.fn_id,
                                         time.monotonic()))

    def _pkcs11_done(self, query_id: int, fn_id: int, started: float,
                     answer: "asyncio.Future[tuple[int, bytes]]") -> None:
        self._calls.pop(answer, None)
        if answer.cancelled():
            return  # the connection is gone
        if answer.exception() is not None:  # a custom backend's bug: this call fails only
            log.error("PKCS#11 backend failed peer=%s fn=0x%04x: %r", self.peer, fn_id,
                      answer.exception())
            status, body = wire.internal(f"backend failure: {answer.exception()}")
        else:
            status, body = answer.result()
        metrics.PKCS11_SECONDS.observe(time.monotonic() - started)
        metrics.PKCS11_CALLS.labels(wire.FUNCTIONS.get(fn_id, "unknown"),
                                    _status_name(status)).inc()
        self._pkcs11_reply(status, body, query_id)

    def count_bytes(self) -> None:
        """Add what the streams relayed since the last look to the byte counters."""
        for stream in self.streams.values():
            self._count_bytes(stream)

    def _count_bytes(self, stream: "relaying.Stream", final: bool = False) -> None:
        seen_in, seen_out = (self._counted.pop(stream, (0, 0)) if final
                             else self._counted.get(stream, (0, 0)))
        if stream.bytes_in > seen_in:
            metrics.BYTES.labels("to_target").inc(stream.bytes_in - seen_in)
        if stream.bytes_out > seen_out:
            metrics.BYTES.labels("to_client").inc(stream.bytes_out - seen_out)
        if not final and (stream.bytes_in or stream.bytes_out):  # idle streams cost nothing
            self._counted[stream] = (stream.bytes_in, stream.bytes_out)

    def _pkcs11_reply(self, status: int, body: bytes, query_id: int) -> None:
        if self.ws is not None and not self.ws.is_disconnected:
            self.send_frame(FrameType.PKCS11_RESPONSE, query_id,
                            payloads.encode_pkcs11_response(status, body))


_HANDLERS: dict[int, Callable[[Connection, int, int, bytes], None]] = {
    FrameType.HELLO: Connection._on_duplicate_hello,
    FrameType.OPEN: Connection._on_open,
    FrameType.CLOSE: Connection._on_close,
    FrameType.DATA_ACK: Connection._on_data_ack,
    FrameType.DNS_QUERY: Connection._on_dns_query,
    FrameType.PKCS11_REQUEST: Connection._on_pkcs11_request,
    FrameType.PING: Connection._on_ping,
}

_tasks_alive: set[asyncio.Task] = set()


def _background(coro: Any) -> None:
    """Run cleanup that must outlive the connection object (held here until done)."""
    task = asyncio.ensure_future(coro)
    _tasks_alive.add(task)
    task.add_done_callback(_tasks_alive.discard)


def _status_name(status: int) -> str:
    try:
        return Pkcs11Status(status).name.lower()
    except ValueError:
        return "invalid"


def _sockaddr(addr: tuple) -> SockAddr:
    return SockAddr(addr[0], addr[1])
