"""The real client address: PROXY protocol headers read off real sockets, forwarding
headers believed from trusted proxies only, and the connection limits' bookkeeping."""
from __future__ import annotations

import asyncio
import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v2 import ProxyProtocolV2

from ksw1fast.server.limits import ConnectionLimits, Rate
from ksw1fast.security.peers import Peer, ProxyHeaderError, TrustedProxies, read_proxy_header

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _v2(result) -> bytes:
    return ProxyProtocolV2().pack(result)


def _v2_local() -> bytes:
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def _v2_with_tlv() -> bytes:
    """TCP4 with a TLV (type 0x05, unique id), as HAProxy and AWS NLB append them."""
    addresses = bytes([9, 9, 9, 9, 1, 1, 1, 1]) + struct.pack("!HH", 5555, 80)
    tlv = bytes([0x05]) + struct.pack("!H", 3) + b"abc"
    body = addresses + tlv
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


HEADERS = {
    "v1 tcp4": (b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 8088\r\n", Peer("203.0.113.7", 51000)),
    "v1 tcp6": (b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 8088\r\n", Peer("2001:db8::7", 51000)),
    "v1 unknown": (b"PROXY UNKNOWN\r\n", None),
    "v2 tcp4": (_v2(ProxyResultIPv4((IPv4Address("198.51.100.9"), 4000),
                                    (IPv4Address("192.0.2.1"), 8088))), Peer("198.51.100.9", 4000)),
    "v2 tcp6": (_v2(ProxyResultIPv6((IPv6Address("2001:db8::9"), 4000),
                                    (IPv6Address("2001:db8::1"), 8088))), Peer("2001:db8::9", 4000)),
    "v2 tlv": (_v2_with_tlv(), Peer("9.9.9.9", 5555)),
    "v2 local": (_v2_local(), None),
}


async def _read(data: bytes, *, split: bool = False,
                eof: bool = False) -> tuple[Peer | None, bytes]:
    """Send `data` (a header and what follows it) into a socket pair and read the header
    off the other end; the address and what was left on the socket. `split`: one byte
    at a time; `eof`: the sender closes right after `data`."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)

    async def send() -> None:
        for piece in ([data[i:i + 1] for i in range(len(data))] if split else [data]):
            theirs.send(piece)
            await asyncio.sleep(0.001 if split else 0)
        if eof:
            theirs.shutdown(socket.SHUT_WR)

    with ours, theirs:
        sender = asyncio.ensure_future(send())
        try:
            address = await asyncio.wait_for(read_proxy_header(ours), 5)
        finally:
            await sender
        if not eof:
            theirs.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := await asyncio.get_running_loop().sock_recv(ours, 4096):
            rest += chunk
    return address, rest


@pytest.mark.parametrize("name", HEADERS)
@pytest.mark.parametrize("split", [False, True])
async def test_header_is_read_exactly(name: str, split: bool) -> None:
    header, expected = HEADERS[name]
    follows = b"\x16\x03\x01 a TLS ClientHello or GET /ws HTTP/1.1"
    address, rest = await _read(header + follows, split=split)
    assert address == expected
    assert rest == follows  # nothing after the header was consumed


@pytest.mark.parametrize("data", [
    b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",            # no header at all
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",               # LF without CR
    b"PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r\n",           # not an address
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n",         # not a port
    b"PROXY " + b"A" * 200 + b"\r\n",                  # longer than a v1 line may be
    V2_SIGNATURE + b"\x99\x11\x00\x00",               # an unknown version/command
    b"PROXY TCP4 1.2.3.4",                             # the connection ends half-way
])
async def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        await _read(data, eof=True)


def test_forwarding_headers_only_from_trusted_proxies() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "fd00::/8"])
    xff = [("X-Forwarded-For", "198.51.100.1, 10.0.0.7")]
    assert proxies.client_of(Peer("10.0.0.2", 9), xff).host == "198.51.100.1"
    assert proxies.client_of(Peer("203.0.113.5", 9), xff).host == "203.0.113.5"  # not a trusted peer
    assert TrustedProxies().client_of(Peer("10.0.0.2", 9), xff) == Peer("10.0.0.2", 9)


def test_the_nearest_untrusted_hop_wins_over_what_the_client_prepended() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    spoofed = [("X-Forwarded-For", "1.1.1.1, 198.51.100.1, 10.0.0.7")]
    assert proxies.client_of(Peer("10.0.0.2", 9), spoofed).host == "198.51.100.1"
    two_headers = [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "198.51.100.2")]
    assert proxies.client_of(Peer("10.0.0.2", 9), two_headers).host == "198.51.100.2"
    all_trusted = [("X-Forwarded-For", "10.1.1.1, 10.0.0.7")]
    assert proxies.client_of(Peer("10.0.0.2", 9), all_trusted).host == "10.1.1.1"
    garbage = [("X-Forwarded-For", "not-an-address, ")]
    assert proxies.client_of(Peer("10.0.0.2", 9), garbage).host == "10.0.0.2"


def test_forwarded_header_rfc_7239() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"], header="forwarded")
    cases = {
        'for=198.51.100.17;proto=https;by=10.0.0.1': "198.51.100.17",
        'for="[2001:db8:cafe::17]:4711"': "2001:db8:cafe::17",
        'For="198.51.100.17:443", for=10.0.0.9': "198.51.100.17",
        'for=_hidden, for=198.51.100.3': "198.51.100.3",
    }
    for value, client in cases.items():
        headers = [("Forwarded", value), ("X-Forwarded-For", "203.0.113.99")]
        assert proxies.client_of(Peer("10.0.0.2", 9), headers) == Peer(client), value


def test_only_the_header_the_proxies_set_is_read() -> None:
    """A proxy appends to X-Forwarded-For and passes a client's own Forwarded on: reading
    Forwarded then would take the client's word."""
    headers = [("Forwarded", "for=198.51.100.66"), ("X-Forwarded-For", "203.0.113.5")]
    peer = Peer("10.0.0.2", 9)
    assert TrustedProxies(["10.0.0.0/8"]).client_of(peer, headers) == Peer("203.0.113.5")
    assert TrustedProxies(["10.0.0.0/8"], header="forwarded").client_of(
        peer, headers) == Peer("198.51.100.66")


def test_peer_text() -> None:
    assert str(Peer("10.0.0.1", 80)) == "10.0.0.1:80"
    assert str(Peer("2001:db8::1", 80)) == "[2001:db8::1]:80"
    assert str(Peer("2001:db8::1")) == "[2001:db8::1]"


def test_connection_limits() -> None:
    limits = ConnectionLimits(max_connections=3, max_per_address=2)
    assert limits.admit("a") is None and limits.admit("a") is None
    assert limits.admit("a") == "connections_per_ip"
    assert limits.admit("b") is None
    assert limits.admit("c") == "connections"
    limits.release("a")
    assert limits.admit("c") is None
    for address in ("a", "b", "c"):
        limits.release(address)
    assert limits.total == 0 and not limits._per_address


def test_rate(monkeypatch) -> None:
    from ksw1fast.server import limits

    now = [100.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: now[0])
    rate = Rate(10)
    assert [rate.allow() for _ in range(12)].count(True) == 10  # a second's burst
    now[0] += 0.5
    assert [rate.allow() for _ in range(12)].count(True) == 5
    assert all(Rate(0).allow() for _ in range(1000))  # 0: no limit
