"""Error mapping of resolve/connect failures (pure functions: no traffic leaves the machine)."""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import random
import socket

import pytest

from helpers import EMBEDDINGS, FILL
from ksw1fast.security import resolve
from ksw1fast.protocol.constants import DnsErrCode, OpenErrCode
from ksw1fast.security.egress import EgressPolicy, parse_literal, to_address
from ksw1fast.security.resolve import Blocked, ResolveError, Resolver, destinations, open_error


@pytest.mark.parametrize("exc,code", [
    (ResolveError(DnsErrCode.NX_DOMAIN, "x"), OpenErrCode.RESOLVE_FAIL),
    (asyncio.TimeoutError(), OpenErrCode.TIMEOUT),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), OpenErrCode.CONN_REFUSED),
    (OSError(errno.EHOSTUNREACH, "No route to host"), OpenErrCode.UNREACHABLE),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), OpenErrCode.UNREACHABLE),
    (OSError(errno.EACCES, "Permission denied"), OpenErrCode.INTERNAL),
])
def test_open_error_codes(exc, code) -> None:
    assert open_error(exc)[0] == code


async def test_lookup_literals_and_errors() -> None:
    lookup = Resolver().lookup
    assert [e.sockaddr[0] for e in await lookup("127.0.0.1", 80)] == ["127.0.0.1"]
    assert {e.sockaddr[0] for e in await lookup("localhost", 80)} <= {"127.0.0.1", "::1"}
    with pytest.raises(ResolveError) as info:
        await lookup("no-such-host.invalid", 80)
    assert info.value.dns_code == DnsErrCode.NX_DOMAIN
    with pytest.raises(ResolveError) as info:
        await lookup("127.0.0.1", 80, family=6)  # an IPv4 literal has no IPv6 address
    assert info.value.dns_code == DnsErrCode.NX_DOMAIN
    with pytest.raises(ResolveError) as info:
        await lookup("bad\udcffname", 80)
    assert info.value.dns_code == DnsErrCode.FORMAT_ERROR


def _sample_literals() -> list[str]:
    """IP literals as clients write them: edges of the special ranges, mapped forms, random."""
    rng = random.Random(1)
    texts = ["0.0.0.0", "::", "169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254",
             "100.100.100.200", "255.255.255.255", "10.0.0.1", "::1", "fe80::1", "::1.2.3.4",
             "0:0:0:0:0:0:0:1", "FE80::ABCD", "::ffff:0.0.0.0", "64:ff9b::a9fe:a9fe"]
    for _ in range(200):
        ip = (ipaddress.IPv4Address(rng.getrandbits(32)) if rng.random() < 0.5
              else ipaddress.IPv6Address(rng.getrandbits(128)))
        texts += [str(ip), ip.exploded]
    return texts


async def test_a_literal_resolves_to_itself_alone() -> None:
    """Why destinations checks a literal once: getaddrinfo returns that very address."""
    for text in _sample_literals():
        endpoints = await Resolver().lookup(text, 443)
        assert [to_address(e.sockaddr[0]) for e in endpoints] == [to_address(text)], text


@pytest.mark.parametrize("host, literal", [
    ("127.0.0.1", True), ("::1", True), ("fe80::1%eth0", True), ("FE80::1", True),
    ("::ffff:1.2.3.4", True), ("localhost", False), ("cafe.bad", False), ("[::1]", False),
    ("127.1", False), ("1.2.3.4%foo", False), (" 1.2.3.4", False), ("", False),
    ("deadbeef::g", False),
])
def test_parse_literal(host: str, literal: bool) -> None:
    parsed = parse_literal(host)
    assert parsed == (ipaddress.ip_address(host) if literal else None)


@pytest.mark.parametrize("host", ["169.254.169.254", "::ffff:169.254.169.254", "0.0.0.0", "::",
                                  "100.100.100.200", "fd00:ec2::254"])
async def test_destinations_block_special_literals_by_default(host: str) -> None:
    with pytest.raises(Blocked, match=" is "):
        await destinations(Resolver(), host, 80, policy=EgressPolicy())


async def test_destinations_block_a_literal_denied_by_rule() -> None:
    policy = EgressPolicy(["deny 127.0.0.0/8", "deny [::1]"])
    for host in ("127.0.0.1", "::ffff:127.0.0.1", "::1"):
        with pytest.raises(Blocked, match="denied by rule"):
            await destinations(Resolver(), host, 9, policy=policy)


@pytest.mark.parametrize("host, rules, answer", [
    ("evil.example", [], "169.254.169.254"),        # a name resolving to metadata (rebinding)
    ("127.0.0.1%x", ["allow *x"], "127.0.0.1"),     # not a literal: its answers judged bare
    ("fe80::1%lo", ["allow [fe80::1]"], "169.254.169.254"),  # zone id: judged again after
])
async def test_destinations_judge_what_the_lookup_returns(host, rules,
                                                          answer) -> None:
    async def lookup(name: str, port: int = 0, family: int = 0) -> list[resolve.Endpoint]:
        return [resolve.Endpoint(socket.AF_INET, (answer, port))]

    with pytest.raises(Blocked):
        await destinations(_Answers(lookup), host, 9, policy=EgressPolicy(rules))


class _Answers(resolve.Resolver):
    """A resolver answering from a function: no lookup leaves the process."""

    def __init__(self, lookup) -> None:
        super().__init__()
        self.lookup = lookup  # type: ignore[method-assign]


@pytest.fixture
def no_traffic() -> _Answers:
    """Nothing resolves: a literal judged wrongly fails here, not on a network.
    The resolver to use; its `asked` holds what was asked for."""
    asked: list[str] = []

    async def lookup(name: str, port: int = 0, family: int = 0) -> list[resolve.Endpoint]:
        asked.append(name)
        raise ResolveError(DnsErrCode.SERVER_FAILURE, "no lookups in this test")

    resolver = _Answers(lookup)
    resolver.asked = asked  # type: ignore[attr-defined]
    return resolver


@pytest.mark.parametrize("form", EMBEDDINGS)
@pytest.mark.parametrize("v4, rules", [("169.254.169.254", []), ("224.0.0.1", ["allow *"]),
                                       ("0.0.0.0", []), ("10.0.0.1", ["deny 10.0.0.0/8"]),
                                       ("127.0.0.1", ["allow ::/0", "deny 127.0.0.0/8"])])
async def test_destinations_block_embedded_ipv4_literals(no_traffic, form, v4, rules) -> None:
    text = str(EMBEDDINGS[form](ipaddress.IPv4Address(v4), FILL))
    for host in (text, text.upper(), ipaddress.IPv6Address(text).exploded, text + "%lo"):
        for proto in ("tcp", "udp"):
            with pytest.raises(Blocked):
                await destinations(no_traffic, host, 80, proto, policy=EgressPolicy(rules))
    assert no_traffic.asked == []  # refused before any lookup


async def test_destinations_block_a_name_resolving_to_an_embedded_special() -> None:
    """DNS rebinding through NAT64: the name passes, its 64:ff9b:: answer does not."""
    async def lookup(name: str, port: int = 0, family: int = 0) -> list[resolve.Endpoint]:
        return [resolve.Endpoint(socket.AF_INET6, ("64:ff9b::a9fe:a9fe", port, 0, 0)),
                resolve.Endpoint(socket.AF_INET6, ("2002:a9fe:a9fe::1", port, 0, 0))]

    with pytest.raises(Blocked, match="169.254.169.254 is link-local"):
        await destinations(_Answers(lookup), "rebind.example", 80,
                          policy=EgressPolicy(["allow *"]))


@pytest.mark.parametrize("host, family, sockaddr", [
    ("127.0.0.1", socket.AF_INET, ("127.0.0.1", 9)),
    ("0:0:0:0:0:0:0:1", socket.AF_INET6, ("::1", 9, 0, 0)),
    ("::ffff:127.0.0.1", socket.AF_INET6, ("::ffff:127.0.0.1", 9, 0, 0)),
])
async def test_an_allowed_literal_is_its_own_destination(no_traffic, host, family,
                                                         sockaddr) -> None:
    """An IP literal is parsed, never looked up: no resolver slot, no thread, no DNS."""
    [endpoint] = await destinations(no_traffic, host, 9, policy=EgressPolicy(["allow *"]))
    assert endpoint.family == family and endpoint.sockaddr[1:] == sockaddr[1:]
    assert ipaddress.ip_address(endpoint.sockaddr[0]) == ipaddress.ip_address(sockaddr[0])
    assert no_traffic.asked == []


async def test_connect_tries_the_endpoints_in_order() -> None:
    """The first endpoint that accepts wins; when none does, the last error tells why."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connects to it are refused
    refused = resolve.Endpoint(socket.AF_INET, closed.getsockname())
    try:
        transport = await resolve.connect(
            [refused, resolve.Endpoint(socket.AF_INET, ("127.0.0.1", port))], False,
            asyncio.Protocol)
        assert transport.get_extra_info("peername") == ("127.0.0.1", port)
        assert transport.get_extra_info("socket").getsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY)
        transport.close()
        with pytest.raises(ConnectionRefusedError):
            await resolve.connect([refused], False, asyncio.Protocol)
        udp = await resolve.connect([resolve.Endpoint(socket.AF_INET, ("127.0.0.1", port))],
                                    True, asyncio.DatagramProtocol)
        assert udp.get_extra_info("peername") == ("127.0.0.1", port)
        udp.close()
    finally:
        closed.close()
        server.close()
