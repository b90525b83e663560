"""One client WebSocket: the I/O shell around its KSW1 session.

The rules live in ksw1fast.protocol.session (I/O-free); this class feeds the session
the control frames the relay hands it (`on_control`) and the outcome of each piece of
work (a connect, a lookup, a PKCS#11 call), and performs the actions the session
returns: frames to send, targets to connect or drop, lookups and calls to make, and
what to log and count. Data of open streams never comes here: the relay (compiled or
twin) hands it to the stream directly.
"""
from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any, Callable, Optional, SupportsInt, Union, cast

from picows import WSTransport

from ksw1fast.config import GatewayConfig
from ksw1fast.ops import audit, metrics
from ksw1fast.ops.logs import Throttled
from ksw1fast.pkcs11 import scope as pkcs11_scope
from ksw1fast.pkcs11 import wire
from ksw1fast.pkcs11.audit import WATCHED as PKCS11_WATCHED, Pkcs11Audit, always_audited
from ksw1fast.pkcs11.backend import Closable, Pkcs11Backend, Scoped
from ksw1fast.pkcs11.supervisor import NoModule
from ksw1fast.protocol.close import closed_code
from ksw1fast.protocol.constants import OpenErrCode, Pkcs11Status, WSClose
from ksw1fast.protocol.messages import OpenOkInfo, SockAddr
from ksw1fast.protocol.session import (Abort, Action, Call, Connect, Credit, Fail, Limits,
                                       Lookup, Note, Send, Session)
from ksw1fast.security.gate import Security
from ksw1fast.security.peers import Peer
from ksw1fast.security.resolve import (ResolveError, Resolver, address_bytes, open_error,
                                       open_target, rule_of)
from ksw1fast.security.tokens import Grant
from ksw1fast.server import relaying
from ksw1fast.server.limits import Rate
from ksw1fast.server.tuning import INITIAL_CREDIT

log = logging.getLogger("ksw1fast")
refusals = Throttled(log)  # what a client can cause at will: bounded
Target = Union[relaying.TcpStream, relaying.UdpStream]


class Connection(relaying.GatewayListener):
    """One client WebSocket of the gateway; see the module docstring."""

    # an idle connection should cost little memory: no per-instance __dict__
    __slots__ = ("config", "pkcs11", "resolver", "security", "session", "peer", "_on_closed",
                 "_tasks",
                 "_lookups", "_calls", "_counted", "_streams_at_end", "_frames_seen",
                 "_pinged", "_unscoped", "_pkcs11_audit", "_shared_pkcs11")

    def __init__(self, config: GatewayConfig, on_closed: Callable[["Connection"], None],
                 pkcs11: Pkcs11Backend, security: Security, resolver: Resolver,
                 grant: Optional[Grant], peer: Peer, shared_pkcs11: bool = False) -> None:
        """`shared_pkcs11`: `pkcs11` serves every connection (no provider made it for
        this one), so it cannot hold this connection's calls to its token's scope."""
        super().__init__(config.max_payload, config.send_buffer_limit, config.send_timeout)
        self.config = config
        self.pkcs11 = pkcs11
        self._shared_pkcs11 = shared_pkcs11
        self.resolver = resolver
        self.security = security  # its egress judges every address an Open is to reach
                                  # (read at each Open: a reload may replace it)
        self.session = Session(security, grant, Limits(
            config.max_streams, config.max_payload, config.max_dns_queries,
            config.pkcs11.max_calls, config.max_open_rate), Rate(config.max_open_rate))
        self.peer = peer  # the client: its socket's address, or what its proxies said
        self._on_closed = on_closed
        self._tasks: dict[int, asyncio.Task] = {}  # stream id -> its connect task
        # DNS lookups and PKCS#11 calls in flight (dicts: an empty set costs 3x the memory)
        self._lookups: dict[asyncio.Future, None] = {}
        self._calls: dict[asyncio.Future, None] = {}
        self._counted: dict[Any, tuple[int, int]] = {}  # stream -> bytes already in metrics
        self._streams_at_end = 0  # streams open when the session ended (for the log)
        self._frames_seen = 0     # frames_in at the last keepalive sweep
        self._pinged = False      # a keepalive ping is unanswered
        # why calls are refused (the backend cannot hold them to the token's PKCS#11
        # scope), "" once the scope went to the backend, None before the first call
        self._unscoped: Optional[str] = None
        self._pkcs11_audit: Optional[Pkcs11Audit] = None  # made by the first audited call

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
        if isinstance(self.pkcs11, Closable):  # ends this connection's agent and its sessions
            _background(self.pkcs11.close())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        super().on_ws_disconnected(transport)
        handshake = transport.close_handshake
        sent = recv = None
        if handshake is not None:
            sent = None if handshake.sent is None else _code(handshake.sent.code)
            recv = None if handshake.recv is None else _code(handshake.recv.code)
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

    # -- the session -------------------------------------------------------------------

    def on_control(self, type: int, flags: int, stream_id: int, payload: bytes) -> None:
        self._perform(self.session.receive(type, flags, stream_id, payload))

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.send_frame(action.type, action.stream_id, action.payload, action.flags)
            elif isinstance(action, Note):
                self._note(action)
            elif isinstance(action, Connect):
                self._connect(action)
            elif isinstance(action, Abort):
                self._abort(action.stream_id)
            elif isinstance(action, Credit):
                stream = self.streams.get(action.stream_id)
                if stream is not None:
                    stream.add_credit(action.amount)
            elif isinstance(action, Lookup):
                self._lookup(action)
            elif isinstance(action, Call):
                self._call(action)
            elif isinstance(action, Fail):
                self.fail(action.code, action.reason)
                return  # the session is over: what follows would not be sent

    def _note(self, note: Note) -> None:
        """Logs, metrics and the audit trail for what the session reports."""
        if note.kind == "open_refused":
            # (an Open refused before its payload was read has no destination: "?")
            proto, _, dest = note.dest.partition(" ") if " " in note.dest else ("", "", "")
            refusals.info("open refused peer=%s stream=%d dest=%s reason=%s: %s", self.peer,
                          note.stream_id, note.dest, note.label, note.detail)
            metrics.child(metrics.STREAMS, proto or "?", note.label.lower()).inc()
            if note.label == OpenErrCode.BLOCKED.name:
                metrics.child(metrics.POLICY_DENIALS, "egress").inc()
            audit.refusal("open", "failed" if note.label in _OPEN_FAILURES else "refused",
                          peer=self.peer, stream=note.stream_id, proto=proto or None,
                          dest=dest, code=note.label.lower(), reason=note.detail,
                          rule=note.rule, **audit.identity(self.session.grant))
        elif note.kind == "dns":
            metrics.child(metrics.DNS_QUERIES, note.label).inc()
            if note.label == "refused":
                metrics.child(metrics.POLICY_DENIALS, "dns").inc()
            if note.label == "ok":
                if audit.routine_enabled():
                    audit.record("dns", "allowed", peer=self.peer, name=note.dest,
                                 **audit.identity(self.session.grant))
            else:
                audit.refusal("dns", "refused" if note.label == "refused" else "failed",
                              peer=self.peer, name=note.dest or None, code=note.label,
                              rule=note.rule, **audit.identity(self.session.grant))
        elif note.kind == "auth_failure":
            metrics.child(metrics.AUTH_FAILURES, note.label).inc()
        elif note.kind == "limit":
            metrics.child(metrics.LIMITS, note.label).inc()
            audit.refusal("limit", "reached", limit=note.label, peer=self.peer,
                          **audit.identity(self.session.grant))
        elif note.kind == "pkcs11_refused":
            audit.refusal("pkcs11", "refused", peer=self.peer,
                          fn=wire.FUNCTIONS.get(int(note.label), note.label),
                          status="auth_denied", reason=note.detail, rule=note.rule,
                          **audit.identity(self.session.grant))
        elif note.kind == "stream_failed":
            refusals.info("stream closed peer=%s stream=%d reason=%s", self.peer,
                          note.stream_id, note.detail)

    # -- streams ---------------------------------------------------------------------------

    def _connect(self, action: Connect) -> None:
        kind = relaying.UdpStream if action.udp else relaying.TcpStream
        stream: Target = kind(self, action.stream_id, action.flow_control, INITIAL_CREDIT)
        self.streams[action.stream_id] = stream
        self._tasks[action.stream_id] = asyncio.get_running_loop().create_task(
            self._open_target(stream, action))

    async def _open_target(self, stream: Target, action: Connect) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        # one timer, not wait_for: that would run open_target in a second task
        timer = loop.call_later(self.config.connect_timeout, self._connect_timed_out, stream,
                                task, action.dest)
        transport: Any
        try:
            transport, endpoints = await open_target(
                self.resolver, action.host, action.port, action.udp, self.security.egress,
                lambda: stream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail_open(stream, *open_error(exc), action.dest, getattr(exc, "rule", ""))
            return
        finally:
            timer.cancel()
            # the client may have closed this stream and opened its id again meanwhile
            if self._tasks.get(stream.stream_id) is task:
                del self._tasks[stream.stream_id]
                if not self._tasks:  # a dict keeps its grown table after pops: start afresh
                    self._tasks = {}
        if self.streams.get(stream.stream_id) is not stream:  # closed while we connected
            transport.abort()
            return
        peername = transport.get_extra_info("peername")
        self._perform(self.session.connected(stream.stream_id, OpenOkInfo(
            _sockaddr(transport.get_extra_info("sockname")), _sockaddr(peername))))
        stream.start()
        if audit.routine_enabled():  # (`--audit all`: a line per Open costs CPU)
            audit.record("open", "allowed", peer=self.peer, stream=stream.stream_id,
                         proto="udp" if action.udp else "tcp",
                         dest=audit.host_port(action.host, action.port),
                         address=audit.host_port(peername[0], peername[1]),
                         rule=rule_of(endpoints, peername),
                         **audit.identity(action.grant or self.session.grant))
        metrics.child(metrics.STREAMS, "udp" if action.udp else "tcp", "ok").inc()
        metrics.OPEN_SECONDS.observe(time.monotonic() - started)
        log.debug("stream open peer=%s stream=%d dest=%s", self.peer, stream.stream_id,
                  action.dest)

    def _connect_timed_out(self, stream: relaying.Stream, task: "asyncio.Task[None]",
                           dest: str) -> None:
        if self.streams.get(stream.stream_id) is stream:  # else the client closed it
            task.cancel()  # closes the socket being connected
            self._fail_open(stream, *open_error(TimeoutError()), dest)

    def _fail_open(self, stream: relaying.Stream, code: OpenErrCode, message: str,
                   dest: str, rule: str = "") -> None:
        """OpenErr for a stream whose connect failed (or that the egress `rule` refused),
        unless the client closed it meanwhile."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            self._perform(self.session.connect_failed(stream.stream_id, code, message, dest,
                                                      rule))

    def _abort(self, stream_id: int) -> None:
        """Drop a stream's target: the client closed it or broke its rules."""
        stream = self.streams.pop(stream_id, None)
        task = self._tasks.pop(stream_id, None)
        if task is not None:
            task.cancel()
        if stream is not None:
            stream.forget()
            self._count_bytes(stream, final=True)

    def stream_ended(self, stream: relaying.Stream, exc: Optional[BaseException]) -> None:
        """The target closed (or failed) on its own: tell the client and forget the stream."""
        self._count_bytes(stream, final=True)
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            self._perform(self.session.stream_ended(stream.stream_id, exc is not None))

    def stream_failed(self, stream: relaying.Stream, reason: str) -> None:
        """The client broke a stream's rules (the relay saw it): drop it, Close(sid, 1)."""
        if self.streams.get(stream.stream_id) is not stream:
            stream.forget()  # a stream the table no longer has: only its target goes
            return
        self._perform(self.session.stream_failed(stream.stream_id, reason))

    # -- DNS -------------------------------------------------------------------------------

    def _lookup(self, action: Lookup) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(self.resolver.lookup(action.name, 0, action.family))
        # one timer, not wait_for: that would run the lookup in a second task
        timer = loop.call_later(self.config.dns_timeout, self._lookup_timed_out,
                                action.query_id, task)
        self._lookups[task] = None
        task.add_done_callback(partial(self._lookup_done, action, timer))

    def _lookup_timed_out(self, query_id: int, task: asyncio.Task) -> None:
        if not task.done():
            self._lookups.pop(task, None)  # answered now: its end must not answer again
            task.cancel()
            self._perform(self.session.lookup_timed_out(query_id))

    def _lookup_done(self, action: Lookup, timer: asyncio.TimerHandle,
                     task: asyncio.Task) -> None:
        timer.cancel()
        if self._lookups.pop(task, False) is False or task.cancelled():
            return  # timed out (answered already) or the connection is gone
        try:
            endpoints = task.result()
        except ResolveError as exc:
            self._perform(self.session.lookup_done(action.query_id, action.name,
                                                   error=(exc.dns_code, str(exc))))
            return
        self._perform(self.session.lookup_done(action.query_id, action.name,
                                               [address_bytes(e) for e in endpoints]))

    # -- PKCS#11 ---------------------------------------------------------------------------

    def _call(self, action: Call) -> None:
        if self._unscoped is None:  # the first call: the grant is settled by now
            self._unscoped = self._limit_backend()
        if self._unscoped:
            answer = asyncio.get_running_loop().create_future()
            answer.set_result(wire.auth_denied(self._unscoped))
        else:
            # the built-in agents answer with a plain future: no task per call on this path
            answer = asyncio.ensure_future(self.pkcs11.handle(action.fn_id, action.args))
        self._calls[answer] = None
        answer.add_done_callback(partial(self._call_done, action, time.monotonic()))

    def _limit_backend(self) -> str:
        """Hand the token's PKCS#11 scope to the backend; why calls are refused, if so."""
        grant = self.session.grant
        scope = None if grant is None else grant.pkcs11_scope
        if scope is None:
            return ""
        if not isinstance(self.pkcs11, Scoped):
            return pkcs11_scope.refusal("backend", "cannot hold calls to the token's scope")
        if self._shared_pkcs11 and not isinstance(self.pkcs11, NoModule):
            # its handle() cannot tell connections apart: one scope would judge another's
            return pkcs11_scope.refusal("backend", "is shared: it cannot hold one token's scope")
        try:
            self.pkcs11.limit(scope)
        except Exception as exc:  # a custom backend's bug: then no call may reach it
            log.error("PKCS#11 backend refused a scope peer=%s: %r", self.peer, exc)
            return pkcs11_scope.refusal("backend", "failed to take the token's scope")
        return ""

    def _call_done(self, action: Call, started: float,
                   answer: "asyncio.Future[tuple[int, bytes]]") -> None:
        self._calls.pop(answer, None)
        status: int
        if answer.cancelled():
            return  # the connection is gone
        if answer.exception() is not None:  # a custom backend's bug: this call fails only
            log.error("PKCS#11 backend failed peer=%s fn=0x%04x: %r", self.peer, action.fn_id,
                      answer.exception())
            status, body = wire.internal(f"backend failure: {answer.exception()}")
        else:
            status, body = answer.result()
        metrics.PKCS11_SECONDS.observe(time.monotonic() - started)
        fn = wire.FUNCTIONS.get(action.fn_id, "unknown")
        metrics.PKCS11_CALLS.labels(fn, _status_name(status)).inc()
        scope_refused = status == Pkcs11Status.AUTH_DENIED and self._count_refusal(fn, body)
        self._perform(self.session.call_done(action.query_id, status, body))
        if action.fn_id in PKCS11_WATCHED and not scope_refused and audit.enabled() and (
                audit.routine_enabled() or always_audited(action.fn_id, status)):
            self._audit_call(action, status, body)

    def _audit_call(self, action: Call, status: int, body: bytes) -> None:
        if self._pkcs11_audit is None:
            self._pkcs11_audit = Pkcs11Audit()
        try:
            fields = self._pkcs11_audit.observe(action.fn_id, action.args, status, body)
        except Exception:  # the audit must never cost a client its answer
            log.exception("PKCS#11 audit failed peer=%s fn=0x%04x", self.peer, action.fn_id)
            return
        if fields is None:
            return
        if status == Pkcs11Status.OK:
            audit.record("pkcs11", "ok", peer=self.peer, **audit.identity(self.session.grant),
                         **fields)
        else:  # a client can fail calls at will (a wrong PIN in a loop): bounded
            audit.refusal("pkcs11", "error", peer=self.peer,
                          **audit.identity(self.session.grant), **fields)

    def _count_refusal(self, fn: str, body: bytes) -> bool:
        """Count, log and audit a call the token's PKCS#11 scope refused (its message
        says); whether it was one."""
        try:
            message = wire.error_of(Pkcs11Status.AUTH_DENIED, body)[1]
        except (wire.WireError, ValueError):  # a custom backend's malformed answer
            return False
        rule = pkcs11_scope.rule_of(message)
        if rule is None:
            return False
        metrics.child(metrics.PKCS11_SCOPE_REFUSALS, fn, rule).inc()
        refusals.info("pkcs11 call refused peer=%s fn=%s: %s", self.peer, fn, message)
        audit.refusal("pkcs11", "refused", peer=self.peer, fn=fn, status="auth_denied",
                      reason=message, rule=rule, **audit.identity(self.session.grant))
        return True

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


_tasks_alive: set[asyncio.Task] = set()
# OpenErr codes of an Open that was allowed but could not reach its target
_OPEN_FAILURES = frozenset(c.name for c in (OpenErrCode.RESOLVE_FAIL, OpenErrCode.CONN_REFUSED,
                                            OpenErrCode.TIMEOUT, OpenErrCode.UNREACHABLE))


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


def _code(code: object) -> int:
    """A close code as picows reports it: its enum when it names the code, else an int."""
    return int(cast(SupportsInt, code))


def _sockaddr(addr: tuple) -> SockAddr:
    return SockAddr(addr[0], addr[1])
