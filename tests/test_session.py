"""The session rules of one connection (protocol.md §3-§8, §10), driven without any socket:
frames in, actions out (ksw1fast.protocol.session)."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field

import pytest

from ksw1fast.pkcs11 import wire
from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import (AddrKind, DnsErrCode, FrameType, OpenErrCode,
                                         Pkcs11Status, Proto, WSClose)
from ksw1fast.protocol.errors import AuthError
from ksw1fast.protocol.messages import OpenOkInfo, SockAddr
from ksw1fast.protocol.session import (CLOSE_ACK, Abort, Call, Connect, Credit, Fail, Limits,
                                       Lookup, Note, Send, Session)

LIMITS = Limits(max_streams=4, max_payload=1 << 24, max_dns_queries=2, max_calls=2,
                max_open_rate=100)


@dataclass
class FakeGrant:
    allows_udp: bool = True
    allows_pkcs11: bool = True
    dns: bool = True
    scope: tuple[str, ...] = ()  # hosts allowed; empty: all
    is_expired: bool = False

    def allows_open(self, host: str, port: int, proto: str) -> bool:
        return not self.scope or host in self.scope

    def allows_dns(self, name: str) -> bool:
        return self.dns

    def expired(self) -> bool:
        return self.is_expired


@dataclass
class Verdict:
    allowed: bool
    reason: str = ""
    rule: str = "deny *.example"


@dataclass
class FakeAuthority:
    open_token: bool = False
    tokens: dict[bytes, FakeGrant] = field(default_factory=dict)
    denied_names: tuple[str, ...] = ()
    denied_answers: tuple[bytes, ...] = ()

    def verify(self, token: bytes) -> FakeGrant:
        if token not in self.tokens:
            raise AuthError("invalid")
        return self.tokens[token]

    def check_name(self, name: str) -> Verdict:
        return Verdict(name not in self.denied_names, f"{name} denied by rule")

    def filter_dns(self, name: str, addresses: list[bytes]) -> list[bytes]:
        return [a for a in addresses if a not in self.denied_answers]


class Budget:
    def __init__(self, n: int = 1000) -> None:
        self.left = n

    def allow(self) -> bool:
        self.left -= 1
        return self.left >= 0


def session(grant: FakeGrant | None = FakeGrant(), authority: FakeAuthority | None = None,
            rate: Budget | None = None, hello: bool = True, features: int = 0x2F) -> Session:
    s = Session(authority or FakeAuthority(), grant, LIMITS, rate or Budget())
    if hello:
        s.receive(FrameType.HELLO, 0, 0, payloads.encode_hello(features, 64))
    return s


def open_payload(host: str = "db.internal", port: int = 5432, proto: int = Proto.TCP,
                 kind: int = AddrKind.HOSTNAME, token: bytes = b"") -> bytes:
    addr = host.encode() if kind == AddrKind.HOSTNAME else socket.inet_pton(
        socket.AF_INET if kind == AddrKind.IPV4 else socket.AF_INET6, host)
    return payloads.encode_open(proto, kind, port, addr, token)


def frames(actions: list) -> list[tuple[int, int]]:
    return [(a.type, a.stream_id) for a in actions if isinstance(a, Send)]


def open_err(actions: list) -> tuple[int, str]:
    (send,) = [a for a in actions if isinstance(a, Send)]
    assert send.type == FrameType.OPEN_ERR
    reply = payloads.decode_open_err(send.payload)
    return reply.code, reply.message


def dns_err(actions: list) -> int:
    (send,) = [a for a in actions if isinstance(a, Send)]
    assert send.type == FrameType.DNS_ERR
    return payloads.decode_dns_err(send.payload).code


# -- §3 Hello ------------------------------------------------------------------------

def test_before_hello_only_hello_and_ping() -> None:
    s = session(hello=False)
    assert s.receive(FrameType.PING, 0, 0, b"p") == [Send(FrameType.PONG, 0, b"p")]
    assert s.receive(0x99, 0, 0, b"") == []  # unknown types: ignored
    (fail,) = s.receive(FrameType.OPEN, 0, 1, open_payload())
    assert fail == Fail(WSClose.PROTOCOL_ERROR, "frame type 0x10 before Hello")


def test_malformed_hello_fails_the_connection() -> None:
    (fail,) = session(hello=False).receive(FrameType.HELLO, 0, 0, b"\x01")
    assert isinstance(fail, Fail) and fail.code == WSClose.PROTOCOL_ERROR


@pytest.mark.parametrize("asked, open_token, granted", [
    (0x2E, False, 0x2E), (0x2F, False, 0x2F), (0xFF, False, 0x2F), (0xFF, True, 0x3F),
    (0x00, False, 0x00)])
def test_features_are_the_intersection(asked: int, open_token: bool, granted: int) -> None:
    s = session(hello=False, authority=FakeAuthority(open_token=open_token))
    (ack,) = s.receive(FrameType.HELLO, 0, 0, payloads.encode_hello(asked, 64))
    decoded = payloads.decode_hello_ack(ack.payload)
    assert decoded.features == granted == s.features
    assert (decoded.max_payload, decoded.initial_credit) == (1 << 24, 1 << 20)


@pytest.mark.parametrize("asked, granted", [(64, 4), (2, 2), (0, 4)])
def test_max_streams_is_the_smaller(asked: int, granted: int) -> None:
    s = session(hello=False)
    s.receive(FrameType.HELLO, 0, 0, payloads.encode_hello(0x2E, asked))
    assert s.max_streams == granted  # 0 means 256, then the server limit of 4


def test_second_hello_fails() -> None:
    (fail,) = session().receive(FrameType.HELLO, 0, 0, payloads.encode_hello(0x2E, 64))
    assert fail == Fail(WSClose.PROTOCOL_ERROR, "second Hello")


def test_ping_after_hello_and_ignored_frames() -> None:
    s = session()
    assert s.receive(FrameType.PING, 0, 7, b"x") == [Send(FrameType.PONG, 0, b"x")]
    for type_ in (FrameType.PONG, FrameType.DATA, FrameType.DATA_ACK, 0x77):
        assert s.receive(type_, 0, 9, b"\x00\x00\x00\x00") == []  # unknown stream or type


# -- §4-§5 streams -------------------------------------------------------------------

def test_open_asks_for_a_connect() -> None:
    s = session()
    (connect,) = s.receive(FrameType.OPEN, 0, 1, open_payload())
    assert connect == Connect(1, False, "db.internal", 5432, "tcp db.internal:5432", True,
                              FakeGrant())  # the grant that allowed it: the audit's
    (connect,) = s.receive(FrameType.OPEN, 0, 2, open_payload("10.0.0.1", 53, Proto.UDP,
                                                               AddrKind.IPV4))
    assert (connect.udp, connect.host, connect.dest) == (True, "10.0.0.1", "udp 10.0.0.1:53")
    (connect,) = s.receive(FrameType.OPEN, 0, 3, open_payload("::1", 80, kind=AddrKind.IPV6))
    assert connect.host == "::1"
    assert s.streams == {1, 2, 3}


def test_flow_control_follows_the_features() -> None:
    (connect,) = session(features=0x2E).receive(FrameType.OPEN, 0, 1, open_payload())
    assert connect.flow_control is False


@pytest.mark.parametrize("payload, code, message", [
    (b"\x01", OpenErrCode.INTERNAL, "malformed Open"),
    (payloads.encode_open(Proto.TCP, 9, 80, b"x"), OpenErrCode.INTERNAL, "unknown addr_kind 9"),
    (payloads.encode_open(7, AddrKind.HOSTNAME, 80, b"x"), OpenErrCode.INTERNAL,
     "unknown protocol 7"),
    (payloads.encode_open(Proto.TCP, AddrKind.IPV4, 80, b"\x01\x02"), OpenErrCode.RESOLVE_FAIL,
     "IPv4 address must be 4 bytes"),
    (payloads.encode_open(Proto.TCP, AddrKind.HOSTNAME, 80, b"\xff"), OpenErrCode.RESOLVE_FAIL,
     "not valid UTF-8"),
    (payloads.encode_open(Proto.TCP, AddrKind.HOSTNAME, 80, b""), OpenErrCode.RESOLVE_FAIL,
     "not valid UTF-8"),
])
def test_bad_opens_are_answered_openerr(payload: bytes, code: int, message: str) -> None:
    s = session()
    actions = s.receive(FrameType.OPEN, 0, 1, payload)
    got_code, got_message = open_err(actions)
    assert got_code == code and message in got_message
    assert Note("open_refused", OpenErrCode(code).name, actions[0].detail, 1, "?") == actions[0]
    assert s.streams == set()


def test_a_stream_id_in_use_is_internal_and_the_stream_stays() -> None:
    s = session()
    s.receive(FrameType.OPEN, 0, 1, open_payload())
    assert open_err(s.receive(FrameType.OPEN, 0, 1, open_payload()))[0] == OpenErrCode.INTERNAL
    assert s.streams == {1}


def test_stream_limit() -> None:
    s = session()
    for sid in range(1, 5):
        s.receive(FrameType.OPEN, 0, sid, open_payload())
    assert open_err(s.receive(FrameType.OPEN, 0, 5, open_payload()))[0] == \
        OpenErrCode.TOO_MANY_STREAMS
    s.receive(FrameType.CLOSE, 0, 1, payloads.encode_close(0))  # a place frees up
    assert isinstance(s.receive(FrameType.OPEN, 0, 5, open_payload())[0], Connect)


def test_open_rate() -> None:
    s = session(rate=Budget(2))
    s.receive(FrameType.OPEN, 0, 1, open_payload())
    assert isinstance(s.receive(FrameType.DNS_QUERY, 0, 1,
                                payloads.encode_dns_query(0, "x.internal"))[0], Lookup)
    actions = s.receive(FrameType.OPEN, 0, 2, open_payload())
    assert actions[0] == Note("limit", "open_rate")
    assert open_err(actions)[0] == OpenErrCode.TOO_MANY_STREAMS
    assert dns_err(s.receive(FrameType.DNS_QUERY, 0, 2,
                             payloads.encode_dns_query(0, "x.internal"))) == DnsErrCode.REFUSED


def test_connected_sends_openok_unless_closed_meanwhile() -> None:
    s = session()
    s.receive(FrameType.OPEN, 0, 1, open_payload())
    info = OpenOkInfo(SockAddr("127.0.0.1", 4000), SockAddr("10.0.0.5", 5432))
    (send,) = s.connected(1, info)
    assert send == Send(FrameType.OPEN_OK, 1, payloads.encode_open_ok(info))
    s.receive(FrameType.OPEN, 0, 2, open_payload())
    s.receive(FrameType.CLOSE, 0, 2, b"")
    assert s.connected(2, info) == [Abort(2)]


def test_connect_failed_frees_the_id() -> None:
    s = session()
    s.receive(FrameType.OPEN, 0, 1, open_payload())
    actions = s.connect_failed(1, OpenErrCode.CONN_REFUSED, "connection refused", "tcp x:1")
    assert open_err(actions) == (OpenErrCode.CONN_REFUSED, "connection refused")
    assert s.streams == set()
    assert s.connect_failed(1, OpenErrCode.TIMEOUT, "late", "tcp x:1") == []
    assert isinstance(s.receive(FrameType.OPEN, 0, 1, open_payload())[0], Connect)


def test_client_close_aborts_and_acks_with_four_zero_bytes() -> None:
    s = session()
    s.receive(FrameType.OPEN, 0, 1, open_payload())
    assert s.receive(FrameType.CLOSE, 0, 1, payloads.encode_close(0)) == [
        Abort(1), Send(FrameType.CLOSE_ACK, 1, CLOSE_ACK)]
    assert CLOSE_ACK == bytes(4)
    assert s.receive(FrameType.CLOSE, 0, 1, b"") == []  # unknown now: ignored


def test_data_ack_returns_credit() -> None:
    s = session()
    s.receive(FrameType.OPEN, 0, 1, open_payload())
    assert s.receive(FrameType.DATA_ACK, 0, 1, payloads.encode_data_ack(4096)) == [
        Credit(1, 4096)]
    actions = s.receive(FrameType.DATA_ACK, 0, 1, b"\x01")  # malformed: the stream fails
    assert frames(actions) == [(FrameType.CLOSE, 1)] and Abort(1) in actions
    assert s.streams == set()


def test_target_ends_close_the_stream() -> None:
    s = session()
    for sid in (1, 2):
        s.receive(FrameType.OPEN, 0, sid, open_payload())
    (normal,) = s.stream_ended(1, error=False)
    (failed,) = s.stream_ended(2, error=True)
    assert (normal.payload, failed.payload) == (payloads.encode_close(0), payloads.encode_close(1))
    assert s.stream_ended(1, error=False) == []


def test_a_stream_the_client_broke() -> None:
    s = session()
    s.receive(FrameType.OPEN, 0, 1, open_payload())
    actions = s.stream_failed(1, "client overran its credit")
    assert actions[0] == Note("stream_failed", detail="client overran its credit", stream_id=1)
    assert actions[1:] == [Abort(1), Send(FrameType.CLOSE, 1, payloads.encode_close(1))]


# -- §9 tokens on requests -----------------------------------------------------------

def test_open_needs_a_grant() -> None:
    s = session(grant=None)
    actions = s.receive(FrameType.OPEN, 0, 1, open_payload())
    assert Note("auth_failure", "missing") in actions
    assert open_err(actions)[0] == OpenErrCode.AUTH_REQUIRED


def test_the_open_token_and_the_hello_token() -> None:
    authority = FakeAuthority(open_token=True, tokens={b"good": FakeGrant()})
    s = session(grant=None, authority=authority)
    assert isinstance(s.receive(FrameType.OPEN, 0, 1, open_payload(token=b"good"))[0], Connect)
    assert open_err(s.receive(FrameType.OPEN, 0, 2, open_payload(token=b"bad")))[0] == \
        OpenErrCode.AUTH_FAILED
    with_hello = Session(authority, None, LIMITS, Budget())
    with_hello.receive(FrameType.HELLO, 0, 0, payloads.encode_hello(0x3E, 64, b"good"))
    assert isinstance(with_hello.receive(FrameType.OPEN, 0, 1, open_payload())[0], Connect)
    bad_hello = Session(authority, None, LIMITS, Budget())
    bad_hello.receive(FrameType.HELLO, 0, 0, payloads.encode_hello(0x3E, 64, b"bad"))
    assert open_err(bad_hello.receive(FrameType.OPEN, 0, 1, open_payload()))[0] == \
        OpenErrCode.AUTH_FAILED  # the Hello's token was refused: not "missing"


def test_expiry_and_scope() -> None:
    expired = session(grant=FakeGrant(is_expired=True))
    assert open_err(expired.receive(FrameType.OPEN, 0, 1, open_payload()))[0] == \
        OpenErrCode.AUTH_FAILED
    scoped = session(grant=FakeGrant(scope=("db.internal",), allows_udp=False))
    assert isinstance(scoped.receive(FrameType.OPEN, 0, 1, open_payload())[0], Connect)
    actions = scoped.receive(FrameType.OPEN, 0, 2, open_payload("other.internal"))
    assert Note("auth_failure", "scope") in actions
    assert open_err(actions)[0] == OpenErrCode.AUTH_FAILED
    assert open_err(scoped.receive(FrameType.OPEN, 0, 3, open_payload(proto=Proto.UDP)))[0] == \
        OpenErrCode.AUTH_FAILED


# -- §8 DNS --------------------------------------------------------------------------

def test_dns_query_asks_for_a_lookup_and_answers() -> None:
    v4, v6 = bytes([10, 0, 0, 1]), bytes(15) + b"\x01"
    s = session(authority=FakeAuthority(denied_answers=(v6,)))
    (lookup,) = s.receive(FrameType.DNS_QUERY, 0, 7, payloads.encode_dns_query(4, "db.internal"))
    assert lookup == Lookup(7, "db.internal", 4) and s.lookups == 1
    actions = s.lookup_done(7, "db.internal", [v4, v6, v4])  # deduplicated, v6 denied
    assert actions == [Note("dns", "ok", dest="db.internal"),
                       Send(FrameType.DNS_RESULT, 7, payloads.encode_dns_result([v4]))]
    assert s.lookups == 0


def test_dns_answers_all_denied_error_and_timeout() -> None:
    v4 = bytes([169, 254, 169, 254])
    s = session(authority=FakeAuthority(denied_answers=(v4,)))
    for qid in (1, 2):
        s.receive(FrameType.DNS_QUERY, 0, qid, payloads.encode_dns_query(0, "x.internal"))
    assert dns_err(s.lookup_done(1, "x.internal", [v4])) == DnsErrCode.REFUSED
    assert dns_err(s.lookup_done(2, "x.internal", error=(DnsErrCode.NX_DOMAIN, "no"))) == \
        DnsErrCode.NX_DOMAIN
    s.receive(FrameType.DNS_QUERY, 0, 3, payloads.encode_dns_query(0, "x.internal"))
    assert dns_err(s.lookup_timed_out(3)) == DnsErrCode.TIMEOUT
    assert s.lookups == 0


@pytest.mark.parametrize("payload", [b"\x00", payloads.encode_dns_query(5, "x"),
                                     payloads.encode_dns_query(0, ""),
                                     payloads.encode_dns_query(0, "a" * 254),
                                     payloads.encode_dns_query(0, "a\x00b")])
def test_malformed_dns_queries(payload: bytes) -> None:
    assert dns_err(session().receive(FrameType.DNS_QUERY, 0, 1, payload)) == \
        DnsErrCode.FORMAT_ERROR


def test_dns_refused_by_token_or_policy_and_capped() -> None:
    query = payloads.encode_dns_query(0, "x.internal")
    assert dns_err(session(grant=FakeGrant(dns=False)).receive(
        FrameType.DNS_QUERY, 0, 1, query)) == DnsErrCode.REFUSED
    assert dns_err(session(authority=FakeAuthority(denied_names=("x.internal",))).receive(
        FrameType.DNS_QUERY, 0, 1, query)) == DnsErrCode.REFUSED
    s = session()
    for qid in (1, 2):
        s.receive(FrameType.DNS_QUERY, 0, qid, query)
    actions = s.receive(FrameType.DNS_QUERY, 0, 3, query)
    assert actions[0] == Note("limit", "dns_queries")
    assert dns_err(actions) == DnsErrCode.SERVER_FAILURE


# -- PKCS#11 --------------------------------------------------------------------------

def _pkcs11_status(actions: list) -> tuple[int, str]:
    (send,) = [a for a in actions if isinstance(a, Send)]
    response = payloads.decode_pkcs11_response(send.payload)
    return response.status, wire.error_of(response.status, response.body)[1]


def test_pkcs11_request_asks_for_a_call_and_answers() -> None:
    s = session()
    (call,) = s.receive(FrameType.PKCS11_REQUEST, 0, 3, payloads.encode_pkcs11_request(9, b"a"))
    assert call == Call(3, 9, b"a") and s.calls == 1
    assert s.call_done(3, 0, b"body") == [
        Send(FrameType.PKCS11_RESPONSE, 3, payloads.encode_pkcs11_response(0, b"body"))]
    assert s.calls == 0


def test_pkcs11_refusals() -> None:
    assert _pkcs11_status(session().receive(FrameType.PKCS11_REQUEST, 0, 1, b"\x01"))[0] == \
        Pkcs11Status.PROTOCOL_ERROR
    request = payloads.encode_pkcs11_request(9)
    assert _pkcs11_status(session(grant=FakeGrant(allows_pkcs11=False)).receive(
        FrameType.PKCS11_REQUEST, 0, 1, request)) == (Pkcs11Status.AUTH_DENIED,
                                                     "the token does not allow PKCS#11")
    assert _pkcs11_status(session(grant=None).receive(
        FrameType.PKCS11_REQUEST, 0, 1, request)) == (Pkcs11Status.AUTH_DENIED, "token missing")
    s = session()
    for qid in (1, 2):
        s.receive(FrameType.PKCS11_REQUEST, 0, qid, request)
    actions = s.receive(FrameType.PKCS11_REQUEST, 0, 3, request)
    assert actions[0] == Note("limit", "pkcs11_calls")
    assert _pkcs11_status(actions) == (Pkcs11Status.INTERNAL,
                                      "more than 2 PKCS#11 calls in flight")


def test_id_spaces_are_separate() -> None:
    """Stream 1, DNS query 1 and PKCS#11 query 1 coexist (protocol.md §2)."""
    s = session()
    assert isinstance(s.receive(FrameType.OPEN, 0, 1, open_payload())[0], Connect)
    assert isinstance(s.receive(FrameType.DNS_QUERY, 0, 1,
                                payloads.encode_dns_query(0, "x"))[0], Lookup)
    assert isinstance(s.receive(FrameType.PKCS11_REQUEST, 0, 1,
                                payloads.encode_pkcs11_request(9))[0], Call)
