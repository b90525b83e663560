"""The session of one KSW1 connection (docs/protocol.md §3-§8, §10), free of I/O.

In the manner of h11's Connection: the I/O shell (ksw1fast/server/connection.py) feeds
the session every control frame it reads (`receive`) and the outcome of every piece of
work the session asked for (`connected`, `lookup_done`, `call_done`...), and performs
the actions the session returns, in order. The session holds the rules: the Hello gate
and feature negotiation, the stream table and its limits, what makes an Open, a
DnsQuery or a Pkcs11Request acceptable, which token decides, and the frames that answer.

Data of open streams never comes here: the relay hands it to its stream directly (the
hot path), and a stream's credits and pause reasons live with it there.

What the session asks of the world it is given, not reached for: an `Authority` (the
tokens and the egress policy, ksw1fast.security.gate.Security) and a request `Rate`.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Protocol, Sequence, Union

from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import (DEFAULT_CLIENT_MAX_STREAMS, DEFAULT_INITIAL_CREDIT,
                                         AddrKind, CloseReason, DnsErrCode, Feature, FrameType,
                                         OpenErrCode, Pkcs11Status, Proto, WSClose)
from ksw1fast.protocol.errors import AuthError, MalformedPayload
from ksw1fast.protocol.messages import OpenOkInfo, OpenRequest

if TYPE_CHECKING:
    from ksw1fast.pkcs11.scope import Pkcs11Scope

# What this server implements; a HelloAck carries the intersection with the client's.
# Pkcs11 is granted even without a module: calls then get a clear Internal error.
SERVER_FEATURES = (Feature.FLOW_CONTROL | Feature.HALF_CLOSE | Feature.DNS | Feature.UDP
                   | Feature.PKCS11)
CLOSE_ACK = b"\x00\x00\x00\x00"  # what the reference sends; the polyfill accepts either
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


# -- what the session is given -------------------------------------------------------

class Grant(Protocol):
    """What a verified token allows (ksw1fast.security.tokens.Grant)."""

    @property
    def allows_udp(self) -> bool: ...

    @property
    def allows_pkcs11(self) -> bool: ...

    @property
    def pkcs11_scope(self) -> Optional["Pkcs11Scope"]:
        """What of PKCS#11 it allows (None: all); the connection's backend enforces it."""

    def allows_open(self, host: str, port: int, proto: str) -> bool: ...

    def allows_dns(self, name: str) -> bool: ...

    def expired(self) -> bool: ...


class Decision(Protocol):
    @property
    def allowed(self) -> bool: ...

    @property
    def reason(self) -> str: ...

    @property
    def rule(self) -> str:
        """Which rule decided, for the audit trail (ksw1fast.security.egress.Decision)."""
        ...


class Authority(Protocol):
    """Tokens and the egress policy (ksw1fast.security.gate.Security)."""

    @property
    def open_token(self) -> bool: ...

    def verify(self, token: bytes) -> Grant:
        """The grant of a token carried in a frame; AuthError when it grants nothing."""
        ...

    def check_name(self, name: str) -> Decision:
        """May a client ask for this name at all (DnsQuery)?"""
        ...

    def filter_dns(self, name: str, addresses: list[bytes]) -> list[bytes]:
        """The answers for `name` the egress policy allows."""
        ...


class Rate(Protocol):
    def allow(self) -> bool: ...


class Limits(NamedTuple):
    max_streams: int        # per connection; a Hello may ask for fewer
    max_payload: int        # announced in HelloAck
    max_dns_queries: int    # DnsQuery lookups in flight
    max_calls: int          # PKCS#11 calls in flight
    max_open_rate: float    # for the refusal message: Opens and DnsQueries a second


# -- what the session asks for -------------------------------------------------------

class Send(NamedTuple):
    """Send this frame to the client."""
    type: int
    stream_id: int
    payload: bytes
    flags: int = 0


class Fail(NamedTuple):
    """Close the WebSocket with this code: the session is over."""
    code: int
    reason: str


class Connect(NamedTuple):
    """Resolve and connect the target of stream `stream_id`; report `connected` or
    `connect_failed`."""
    stream_id: int
    udp: bool
    host: str
    port: int
    dest: str               # "tcp host:port", for logs
    flow_control: bool
    grant: Optional[Grant] = None  # the grant that allowed it (the Open's own token's)


class Abort(NamedTuple):
    """Drop the target of a stream the session no longer has (no frame to the client)."""
    stream_id: int


class Credit(NamedTuple):
    """The client consumed `amount` more bytes of a stream (DataAck)."""
    stream_id: int
    amount: int


class Lookup(NamedTuple):
    """Resolve `name` (family 0, 4 or 6); report `lookup_done` or `lookup_timed_out`."""
    query_id: int
    name: str
    family: int


class Call(NamedTuple):
    """Make this PKCS#11 call; report `call_done`."""
    query_id: int
    fn_id: int
    args: bytes


class Note(NamedTuple):
    """Something the operator sees in logs, metrics and the audit trail; no frame.

    kind "open_refused" (label: the OpenErr code's name, detail: why, dest: "tcp
    host:port" or "?"), "auth_failure" (label: missing, invalid, expired or scope),
    "limit" (label: which), "dns" (label: the answer, ok or the DnsErr code's name,
    dest: the name when known), "pkcs11_refused" (label: the fn id in decimal, detail:
    why; a request refused here, without a call), "stream_failed" (detail: why the
    client lost a stream).  `rule` says what decided a refusal: "token scope", "token
    KIND", "limit: NAME", or the egress rule (ksw1fast.security.egress.Decision.rule)."""
    kind: str
    label: str = ""
    detail: str = ""
    stream_id: int = 0
    dest: str = ""
    rule: str = ""


Action = Union[Send, Fail, Connect, Abort, Credit, Lookup, Call, Note]


# -- the session ---------------------------------------------------------------------

class Session:
    """The rules of one connection; see the module docstring."""

    __slots__ = ("_authority", "_limits", "_rate", "grant", "_grant_error", "hello_done",
                 "features", "flow_control", "max_streams", "streams", "lookups", "calls")

    def __init__(self, authority: Authority, grant: Optional[Grant], limits: Limits,
                 rate: Rate) -> None:
        self._authority = authority
        self._limits = limits
        self._rate = rate                # Opens and DnsQueries a second
        self.grant = grant               # from the handshake token (or the Hello extension)
        self._grant_error: Optional[AuthError] = None  # why a presented token was refused
        self.hello_done = False
        self.features = 0
        self.flow_control = False        # FlowControl negotiated (an enum test per Open costs)
        self.max_streams = 0
        self.streams: set[int] = set()   # ids of the streams Opened and not yet closed
        self.lookups = 0                 # DnsQuery lookups in flight
        self.calls = 0                   # PKCS#11 calls in flight

    # -- frames from the client ------------------------------------------------------

    def receive(self, type: int, flags: int, stream_id: int, payload: bytes) -> list[Action]:
        """A control frame: every frame but Data of a stream the relay knows."""
        if not self.hello_done:
            if type == FrameType.HELLO:
                return self._hello(payload)
            if type == FrameType.PING:
                return [Send(FrameType.PONG, 0, payload)]
            if type in _KNOWN_TYPES:
                return [Fail(WSClose.PROTOCOL_ERROR, f"frame type 0x{type:02x} before Hello")]
            return []  # unknown types are ignored (forward compatibility)
        handler = _HANDLERS.get(type)
        # Data/DataAck of unknown streams, Pong and unknown types: ignored
        # (docs/protocol.md §2, §5)
        return handler(self, stream_id, payload) if handler is not None else []

    def _hello(self, payload: bytes) -> list[Action]:
        try:
            hello = payloads.decode_hello(payload)
        except MalformedPayload as exc:
            return [Fail(WSClose.PROTOCOL_ERROR, f"malformed Hello: {exc}")]
        if hello.token and self.grant is None:
            try:
                self.grant = self._authority.verify(hello.token)
            except AuthError as exc:
                self._grant_error = exc
        server = SERVER_FEATURES | (Feature.OPEN_TOKEN if self._authority.open_token else 0)
        self.features = hello.features & server
        self.flow_control = bool(self.features & Feature.FLOW_CONTROL)
        self.max_streams = min(hello.max_streams or DEFAULT_CLIENT_MAX_STREAMS,
                               self._limits.max_streams)
        self.hello_done = True
        return [Send(FrameType.HELLO_ACK, 0, payloads.encode_hello_ack(
            self.features, self.max_streams, self._limits.max_payload, DEFAULT_INITIAL_CREDIT))]

    def _second_hello(self, stream_id: int, payload: bytes) -> list[Action]:
        return [Fail(WSClose.PROTOCOL_ERROR, "second Hello")]

    def _ping(self, stream_id: int, payload: bytes) -> list[Action]:
        return [Send(FrameType.PONG, 0, payload)]

    def _authorize(self, token: bytes = b"") -> Grant:
        """The grant for one request: its own token, else the connection's; AuthError."""
        if token:
            grant = self._authority.verify(token)
        elif self.grant is not None:
            grant = self.grant
        else:
            raise self._grant_error or AuthError("missing")
        if grant.expired():
            raise AuthError("expired")
        return grant

    def _over_rate(self) -> Optional[str]:
        if self._rate.allow():
            return None
        return (f"more than {self._limits.max_open_rate:g} Opens and DNS queries a second")

    # -- streams ---------------------------------------------------------------------

    def _open(self, stream_id: int, payload: bytes) -> list[Action]:
        if stream_id in self.streams:
            return _open_err(stream_id, OpenErrCode.INTERNAL, "stream id already in use")
        over = self._over_rate()
        if over:
            return [Note("limit", "open_rate"),
                    *_open_err(stream_id, OpenErrCode.TOO_MANY_STREAMS, over,
                               rule="limit: open_rate")]
        try:
            req = payloads.decode_open(payload)
        except MalformedPayload as exc:
            return _open_err(stream_id, OpenErrCode.INTERNAL, f"malformed Open: {exc}")
        if req.addr_kind not in (AddrKind.HOSTNAME, AddrKind.IPV4, AddrKind.IPV6):
            return _open_err(stream_id, OpenErrCode.INTERNAL, f"unknown addr_kind {req.addr_kind}")
        if req.proto not in (Proto.TCP, Proto.UDP):
            return _open_err(stream_id, OpenErrCode.INTERNAL, f"unknown protocol {req.proto}")
        if len(self.streams) >= self.max_streams:
            return _open_err(stream_id, OpenErrCode.TOO_MANY_STREAMS,
                             f"at most {self.max_streams} streams per connection",
                             rule="limit: max_streams")
        try:
            host = target_host(req)
        except ValueError as exc:
            return _open_err(stream_id, OpenErrCode.RESOLVE_FAIL, str(exc))
        proto = "udp" if req.proto == Proto.UDP else "tcp"
        dest = f"{proto} [{host}]:{req.port}" if ":" in host else f"{proto} {host}:{req.port}"
        try:
            grant = self._authorize(req.token)
        except AuthError as exc:
            return [Note("auth_failure", exc.kind),
                    *_open_err(stream_id, exc.open_err, f"token {exc.kind}", dest,
                               f"token {exc.kind}")]
        if (proto == "udp" and not grant.allows_udp) or not grant.allows_open(host, req.port,
                                                                                proto):
            return [Note("auth_failure", "scope"),
                    *_open_err(stream_id, OpenErrCode.AUTH_FAILED,
                               "the token does not allow this destination", dest,
                               "token scope")]
        self.streams.add(stream_id)
        return [Connect(stream_id, proto == "udp", host, req.port, dest,
                        self.flow_control, grant)]

    def connected(self, stream_id: int, info: OpenOkInfo) -> list[Action]:
        """The target of `stream_id` is connected: OpenOk, unless the client closed it."""
        if stream_id not in self.streams:
            return [Abort(stream_id)]
        return [Send(FrameType.OPEN_OK, stream_id, payloads.encode_open_ok(info))]

    def connect_failed(self, stream_id: int, code: OpenErrCode, message: str,
                       dest: str, rule: str = "") -> list[Action]:
        """The target could not be reached (or the egress `rule` refused it): OpenErr,
        unless the client closed it."""
        if stream_id not in self.streams:
            return []
        self.streams.discard(stream_id)
        return _open_err(stream_id, code, message, dest, rule)

    def _close(self, stream_id: int, payload: bytes) -> list[Action]:
        if stream_id not in self.streams:
            return []  # unknown or already closed: it may have crossed our Close
        self.streams.discard(stream_id)
        return [Abort(stream_id), Send(FrameType.CLOSE_ACK, stream_id, CLOSE_ACK)]

    def _data_ack(self, stream_id: int, payload: bytes) -> list[Action]:
        if stream_id not in self.streams:
            return []  # unknown or closed stream: ignored (docs/protocol.md §5)
        try:
            return [Credit(stream_id, payloads.decode_data_ack(payload))]
        except MalformedPayload:
            return self.stream_failed(stream_id, "malformed DataAck")

    def stream_ended(self, stream_id: int, error: bool) -> list[Action]:
        """The target closed (or failed) on its own: Close the stream."""
        if stream_id not in self.streams:
            return []
        self.streams.discard(stream_id)
        reason = CloseReason.ERROR if error else CloseReason.NORMAL
        return [Send(FrameType.CLOSE, stream_id, payloads.encode_close(reason))]

    def stream_failed(self, stream_id: int, reason: str) -> list[Action]:
        """The client broke a stream's rules (overran its credit...): drop its target and
        Close(sid, 1)."""
        self.streams.discard(stream_id)
        return [Note("stream_failed", detail=reason, stream_id=stream_id), Abort(stream_id),
                Send(FrameType.CLOSE, stream_id, payloads.encode_close(CloseReason.ERROR))]

    # -- DNS -------------------------------------------------------------------------

    def _dns_query(self, query_id: int, payload: bytes) -> list[Action]:
        over = self._over_rate()
        if over:
            return [Note("limit", "open_rate"), *_dns_err(query_id, DnsErrCode.REFUSED, over,
                                                          rule="limit: open_rate")]
        try:
            query = payloads.decode_dns_query(payload)
            if query.family not in (0, 4, 6):
                raise MalformedPayload(f"family {query.family} is not 0, 4 or 6")
            if not query.name or len(query.name) > 253 or "\x00" in query.name:
                raise MalformedPayload("name must be 1 to 253 characters")
        except MalformedPayload as exc:
            return _dns_err(query_id, DnsErrCode.FORMAT_ERROR, str(exc))
        name = query.name
        try:
            allowed = self._authorize().allows_dns(name)
        except AuthError as exc:
            return [Note("auth_failure", exc.kind),
                    *_dns_err(query_id, DnsErrCode.REFUSED, f"token {exc.kind}", name,
                              f"token {exc.kind}")]
        if not allowed:
            return _dns_err(query_id, DnsErrCode.REFUSED, "the token does not allow DNS here",
                            name, "token scope")
        decision = self._authority.check_name(name)
        if not decision.allowed:
            return _dns_err(query_id, DnsErrCode.REFUSED, decision.reason, name, decision.rule)
        if self.lookups >= self._limits.max_dns_queries:
            return [Note("limit", "dns_queries"), *_dns_err(
                query_id, DnsErrCode.SERVER_FAILURE,
                f"more than {self._limits.max_dns_queries} queries in flight", name,
                "limit: dns_queries")]
        self.lookups += 1
        return [Lookup(query_id, query.name, query.family)]

    def lookup_done(self, query_id: int, name: str, addresses: Sequence[bytes] = (),
                    error: Optional[tuple[DnsErrCode, str]] = None) -> list[Action]:
        """The addresses `name` resolved to (raw, 4 or 16 bytes), or the error: DnsResult
        with the answers the policy allows, or DnsErr."""
        self.lookups -= 1
        if error is not None:
            return _dns_err(query_id, *error, name)
        allowed = self._authority.filter_dns(name, list(dict.fromkeys(addresses)))
        if not allowed:
            return _dns_err(query_id, DnsErrCode.REFUSED, "every address is denied by policy",
                            name, "egress: every answer denied")
        return [Note("dns", "ok", dest=name),
                Send(FrameType.DNS_RESULT, query_id, payloads.encode_dns_result(allowed))]

    def lookup_timed_out(self, query_id: int) -> list[Action]:
        self.lookups -= 1
        return _dns_err(query_id, DnsErrCode.TIMEOUT, "lookup timed out")

    # -- PKCS#11 ---------------------------------------------------------------------

    def _pkcs11_request(self, query_id: int, payload: bytes) -> list[Action]:
        try:
            request = payloads.decode_pkcs11_request(payload)
        except MalformedPayload as exc:
            return _pkcs11_refusal(query_id, Pkcs11Status.PROTOCOL_ERROR,
                                   f"malformed request: {exc}")
        try:
            allowed = self._authorize().allows_pkcs11
        except AuthError as exc:
            return [Note("auth_failure", exc.kind),
                    Note("pkcs11_refused", str(request.fn_id), f"token {exc.kind}",
                         rule=f"token {exc.kind}"),
                    *_pkcs11_refusal(query_id, Pkcs11Status.AUTH_DENIED, f"token {exc.kind}")]
        if not allowed:
            return [Note("pkcs11_refused", str(request.fn_id), "the token does not allow PKCS#11",
                         rule="token scope"),
                    *_pkcs11_refusal(query_id, Pkcs11Status.AUTH_DENIED,
                                     "the token does not allow PKCS#11")]
        if self.calls >= self._limits.max_calls:
            # bounds the answers that may pile up: max_calls x max_out bytes
            return [Note("limit", "pkcs11_calls"), *_pkcs11_refusal(
                query_id, Pkcs11Status.INTERNAL,
                f"more than {self._limits.max_calls} PKCS#11 calls in flight")]
        self.calls += 1
        return [Call(query_id, request.fn_id, request.args)]

    def call_done(self, query_id: int, status: int, body: bytes) -> list[Action]:
        self.calls -= 1
        return [Send(FrameType.PKCS11_RESPONSE, query_id,
                     payloads.encode_pkcs11_response(status, body))]


_HANDLERS: dict[int, Callable[[Session, int, bytes], list[Action]]] = {
    FrameType.HELLO: Session._second_hello,
    FrameType.OPEN: Session._open,
    FrameType.CLOSE: Session._close,
    FrameType.DATA_ACK: Session._data_ack,
    FrameType.DNS_QUERY: Session._dns_query,
    FrameType.PKCS11_REQUEST: Session._pkcs11_request,
    FrameType.PING: Session._ping,
}


def target_host(req: OpenRequest) -> str:
    """The Open's address as text for the resolver; ValueError for bad address bytes."""
    if req.addr_kind == AddrKind.HOSTNAME:
        try:
            host = req.addr.decode()
        except UnicodeDecodeError:
            host = ""
        if not host or "\x00" in host:
            raise ValueError("host name is not valid UTF-8 text")
        return host
    size = 4 if req.addr_kind == AddrKind.IPV4 else 16
    if len(req.addr) != size:
        raise ValueError(f"IPv{4 if size == 4 else 6} address must be {size} bytes")
    if size == 4:  # dotted quad either way; inet_ntoa skips ipaddress' objects (per Open)
        return socket.inet_ntoa(req.addr)
    return str(ipaddress.IPv6Address(req.addr))


def _open_err(stream_id: int, code: OpenErrCode, message: str, dest: str = "?",
              rule: str = "") -> list[Action]:
    return [Note("open_refused", code.name, message, stream_id, dest, rule),
            Send(FrameType.OPEN_ERR, stream_id, payloads.encode_open_err(code, message))]


def _dns_err(query_id: int, code: DnsErrCode, message: str, name: str = "",
             rule: str = "") -> list[Action]:
    return [Note("dns", code.name.lower(), dest=name, rule=rule),
            Send(FrameType.DNS_ERR, query_id, payloads.encode_dns_err(code, message))]


def _pkcs11_refusal(query_id: int, status: Pkcs11Status, message: str) -> list[Action]:
    """An answer made here, without asking a module."""
    return [Send(FrameType.PKCS11_RESPONSE, query_id,
                 payloads.encode_pkcs11_refusal(status, message))]

