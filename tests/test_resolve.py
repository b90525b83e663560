"""Error mapping of resolve/connect failures (pure functions: no traffic leaves the machine)."""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import random
import socket

import pytest

from ksw1fast import resolve
from ksw1fast.constants import DnsErrCode, OpenErrCode
from ksw1fast.policy import EgressPolicy, to_address
from ksw1fast.resolve import Blocked, ResolveError, lookup, open_error, open_socket


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
    assert [e.sockaddr[0] for e in await lookup("127.0.0.1", 80)] == ["127.0.0.1"]
    with pytest.raises(ResolveError) as info:
        await lookup("no-such-host.invalid", 80)
    assert info.value.dns_code == DnsErrCode.NX_DOMAIN
    with pytest.raises(ResolveError) as info:
        await lookup("127.0.0.1", 80, family=6)  # an IPv4 literal has no IPv6 address
    assert info.value.dns_code in (DnsErrCode.NX_DOMAIN, DnsErrCode.SERVER_FAILURE)


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
    """Why open_socket checks a literal once: getaddrinfo returns that very address."""
    for text in _sample_literals():
        endpoints = await lookup(text, 443)
        assert [to_address(e.sockaddr[0]) for e in endpoints] == [to_address(text)], text


@pytest.mark.parametrize("host, literal", [
    ("127.0.0.1", True), ("::1", True), ("fe80::1%eth0", True), ("FE80::1", True),
    ("::ffff:1.2.3.4", True), ("localhost", False), ("cafe.bad", False), ("[::1]", False),
    ("127.1", False), ("1.2.3.4%foo", False), (" 1.2.3.4", False), ("", False),
    ("deadbeef::g", False),
])
def test_parse_literal(host: str, literal: bool) -> None:
    parsed = resolve._parse_literal(host)
    assert parsed == (ipaddress.ip_address(host) if literal else None)


@pytest.mark.parametrize("host", ["169.254.169.254", "::ffff:169.254.169.254", "0.0.0.0", "::",
                                  "100.100.100.200", "fd00:ec2::254"])
async def test_open_socket_blocks_special_literals_by_default(host: str) -> None:
    with pytest.raises(Blocked, match=" is "):
        await open_socket(host, 80, policy=EgressPolicy())


async def test_open_socket_blocks_a_literal_denied_by_rule() -> None:
    policy = EgressPolicy(["deny 127.0.0.0/8", "deny [::1]"])
    for host in ("127.0.0.1", "::ffff:127.0.0.1", "::1"):
        with pytest.raises(Blocked, match="denied by rule"):
            await open_socket(host, 9, policy=policy)


@pytest.mark.parametrize("host, rules, answer", [
    ("evil.example", [], "169.254.169.254"),        # a name resolving to metadata (rebinding)
    ("127.0.0.1%x", ["allow *x"], "127.0.0.1"),     # not a literal: its answers judged bare
    ("fe80::1%lo", ["allow [fe80::1]"], "169.254.169.254"),  # zone id: judged again after
])
async def test_open_socket_judges_what_the_lookup_returns(monkeypatch, host, rules,
                                                          answer) -> None:
    async def lookup(name: str, port: int = 0, family: int = 0) -> list[resolve.Endpoint]:
        return [resolve.Endpoint(socket.AF_INET, (answer, port))]

    monkeypatch.setattr(resolve, "lookup", lookup)
    with pytest.raises(Blocked):
        await open_socket(host, 9, policy=EgressPolicy(rules))
