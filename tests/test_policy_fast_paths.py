"""The egress policy's shortcuts decide exactly as the full evaluation does.

Without rules the policy skips its rule loop, and for DNS answers the name too; a name is
told from an IP literal by its characters before parsing; special ranges, and the IPv4
inside NAT64, 6to4, Teredo and the like, are read as integers; an Open's IP literal is
decided once and remembered.  Each is checked against the slow way on many addresses,
IPv4-mapped IPv6, every IPv4-embedding IPv6 form, 0.0.0.0, ::, metadata and private
ranges included.
"""
from __future__ import annotations

import ipaddress
from typing import Callable, Optional

from hypothesis import assume, given, settings, strategies as st

from helpers import EMBEDDINGS
from ksw1fast.security import egress as P
from ksw1fast.security.egress import EgressPolicy, IPAddress

DEFAULT = EgressPolicy()
INERT_NAME = "never-matches.invalid"
# no allow rule and one deny that matches nothing here: the default policy's decisions,
# reasons included, reached through the whole rule loop
INERT = EgressPolicy([f"deny udp {INERT_NAME}:1"])
RULED = [
    EgressPolicy(["deny 10.0.0.0/8", "allow *.internal", "allow 169.254.169.254:80"]),
    EgressPolicy(["allow *"]),
    EgressPolicy(["deny *"]),
    EgressPolicy(["allow 0.0.0.0/0", "allow ::/0"]),
    EgressPolicy(["deny tcp 192.168.0.0/16:22", "allow [fe80::/10]", "allow udp *:53"]),
    EgressPolicy(["deny [::ffff:172.16.0.0/108]", "allow tcp *:1-1024", "deny *.example"]),
    EgressPolicy(["allow [64:ff9b::/96]", "deny 10.0.0.0/8", "allow tcp [2001::/32]:443",
                  "allow 169.254.169.254:80", "allow udp 2002::/16"]),
    EgressPolicy(["deny [64:ff9b::a00:0/104]", "allow 10.0.0.0/8", "deny [::/96]"]),
]

RANGES = [net for net, _ in P._SPECIAL] + [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "fc00::/7", "::1/128",
    "100.64.0.0/10", "::ffff:0:0/96")]


def _edges(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[IPAddress]:
    first, last = int(net.network_address), int(net.broadcast_address)
    top = 2 ** net.max_prefixlen - 1
    make = type(net.network_address)
    return [make(v) for v in (first - 1, first, first + 1, last - 1, last, last + 1)
            if 0 <= v <= top]


NOTABLE = sorted({ip for net in RANGES for ip in _edges(net)}, key=lambda ip: (ip.version, ip))
NOTABLE += [ipaddress.ip_address(a) for a in (
    "0.0.0.0", "::", "169.254.169.254", "::ffff:169.254.169.254", "::ffff:0.0.0.0",
    "fd00:ec2::254", "100.100.100.200", "::ffff:100.100.100.200", "255.255.255.255",
    "::ffff:10.1.2.3", "::169.254.169.254", "64:ff9b::a9fe:a9fe", "::1", "::2",
    "::0.0.0.1", "64:ff9b:1:a9fe:a9:fe00::")]


def _mapped(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)


plain = st.one_of(
    st.ip_addresses(v=4), st.ip_addresses(v=6), st.sampled_from(NOTABLE),
    st.sampled_from(RANGES).flatmap(lambda net: st.ip_addresses(network=net)))
ipv4s = plain.filter(lambda ip: ip.version == 4)
addresses = st.one_of(
    plain, ipv4s.map(_mapped),
    st.builds(lambda form, v4, fill: form(v4, fill), st.sampled_from(list(EMBEDDINGS.values())),
              ipv4s, st.binary(min_size=10, max_size=10)))
# the forms callers pass: text, raw DnsResult bytes, address objects
forms: st.SearchStrategy[Callable[[IPAddress], object]] = st.sampled_from(
    [str, lambda ip: ip.packed, lambda ip: ip, lambda ip: ip.exploded])
names = st.one_of(st.none(), st.sampled_from(["db.internal", "www.example", "localhost",
                                              "169.254.169.254", "[::1]", "bad..name"]),
                  st.text(max_size=40))
ports = st.one_of(st.none(), st.integers(0, 65535))
protos = st.sampled_from([None, "tcp", "udp", "any"])


def literal_by_parsing(host: str) -> Optional[IPAddress]:
    """`_literal` without its shortcut: the way it read every host before."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return P.to_address(text)
    except ValueError:
        return None


def special_by_membership(ip: IPAddress) -> object:
    """`_special` without integer bounds: `ip in network` over the table."""
    for net, what in P._SPECIAL:
        if ip.version == net.version and ip in net:
            return net, what
    return None


_EMBEDDING_NETS = [ipaddress.IPv6Network(n) for n in (
    "64:ff9b::/96", "::ffff:0:0:0/96", "::/96")]
_NOT_COMPATIBLE = {ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")}


def embedded_by_stdlib(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """`_embedded` the slow way: ipaddress' Teredo and 6to4 readers, network membership,
    and the RFC 6052 /48 layout as bytes 6-7 and 9-10."""
    if ip.version == 4:
        return ()
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.teredo is not None:
        return ip.teredo
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip in ipaddress.IPv6Network("64:ff9b:1::/48"):
        return (ipaddress.IPv4Address(ip.packed[6:8] + ip.packed[9:11]),)
    if any(ip in net for net in _EMBEDDING_NETS) and ip not in _NOT_COMPATIBLE:
        return (ipaddress.IPv4Address(ip.packed[12:]),)
    return ()


@given(addresses)
def test_special_bounds_match_network_membership(ip: IPAddress) -> None:
    assert P._special(ip) == special_by_membership(ip)
    assert P._special(P.to_address(ip)) == special_by_membership(P.to_address(ip))


@given(addresses)
def test_embedded_ipv4_read_as_integers_matches_the_stdlib(ip: IPAddress) -> None:
    addr = P.to_address(ip)
    assert P._embedded(addr) == embedded_by_stdlib(addr)
    expected = special_by_membership(addr) is not None or any(
        special_by_membership(v4) is not None for v4 in embedded_by_stdlib(addr))
    assert P._is_special(addr) is expected


def _host_texts() -> st.SearchStrategy[str]:
    texts = addresses.map(str) | addresses.map(lambda ip: ip.exploded)
    return st.one_of(
        texts, texts.map(lambda t: f"[{t}]"), texts.map(lambda t: f" {t}\t"),
        texts.map(lambda t: t + "%eth0"), texts.map(lambda t: t.upper()),
        st.text(alphabet="0123456789abcdefABCDEF.:%[] x", max_size=45), st.text(max_size=45))


@given(_host_texts())
def test_literal_shortcut_reads_hosts_as_parsing_does(host: str) -> None:
    assert P._literal(host) == literal_by_parsing(host)


@given(addresses, forms, ports, protos, names)
@settings(max_examples=500)
def test_default_check_address_matches_the_rule_loop(ip: IPAddress, form: Callable, port,
                                                     proto, name) -> None:
    assume(name != INERT_NAME)
    expected = INERT.check_address(form(ip), port, proto, name=name)
    assert DEFAULT.check_address(form(ip), port, proto, name=name) == expected


@given(st.one_of(_host_texts(), names.filter(bool)), ports, protos)
@settings(max_examples=500)
def test_default_check_name_matches_the_rule_loop(name: str, port, proto) -> None:
    assume(name != INERT_NAME)
    assert DEFAULT.check_name(name, port, proto) == INERT.check_name(name, port, proto)


@given(st.lists(st.tuples(addresses, forms), max_size=8), names.filter(bool))
@settings(max_examples=300)
def test_filter_dns_keeps_what_check_address_allows(answers: list, name: str) -> None:
    assume(name != INERT_NAME)
    given_answers = [form(ip) for ip, form in answers]
    for policy in (DEFAULT, INERT, *RULED):
        kept = [a for a in given_answers if policy.check_address(a, None, None, name).allowed]
        assert policy.filter_dns(name, given_answers) == kept, policy
    assert DEFAULT.filter_dns(name, given_answers) == INERT.filter_dns(name, given_answers)


def test_default_refusals_are_unchanged() -> None:
    """The built-in refusals still hold without rules, in every form an address comes in."""
    for text in ("169.254.169.254", "::ffff:169.254.169.254", "0.0.0.0", "::", "0.1.2.3",
                 "fe80::1", "fd00:ec2::254", "100.100.100.200", "224.0.0.1", "ff02::1",
                 "255.255.255.255"):
        ip = ipaddress.ip_address(text)
        for form in (text, ip, ip.packed):
            assert not DEFAULT.check_address(form, 80, "tcp").allowed, form
            assert DEFAULT.filter_dns("x.example", [form]) == [], form
        assert not DEFAULT.check_name(text, 80, "tcp").allowed
    for text in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "::1", "fc00::1", "8.8.8.8"):
        assert DEFAULT.check_address(text, 80, "tcp").allowed
        assert DEFAULT.filter_dns("x.example", [text]) == [text]


@given(st.lists(st.tuples(_host_texts(), st.integers(1, 65535), st.sampled_from(["tcp", "udp"])),
                max_size=6))
@settings(max_examples=300)
def test_remembered_literal_decisions_are_check_address(opens: list) -> None:
    """An Open's literal: parsed as the connect reads it (IPv4-mapped stays IPv6), decided
    as check_address decides, the same the second time; a name (or a zone id) is None."""
    for policy in (EgressPolicy(), *RULED):
        for _ in range(2):  # the second round answers from memory
            for host, port, proto in opens:
                got = policy.check_literal(host, port, proto)
                try:
                    address = ipaddress.ip_address(host)
                except ValueError:
                    address = None
                if address is None or "%" in host:
                    assert got is None, host
                    continue
                assert got == (address, policy.check_address(address, port, proto)), host


def test_remembered_literal_decisions_are_bounded() -> None:
    policy = EgressPolicy(["deny 10.0.0.0/8"])
    for n in range(P.LITERALS_REMEMBERED + 10):
        host = str(ipaddress.IPv4Address(0x0A000000 + n))
        assert not policy.check_literal(host, 443, "tcp")[1].allowed  # type: ignore[index]
        assert len(policy._literals) <= P.LITERALS_REMEMBERED
    assert policy.check_literal("db.internal", 443, "tcp") is None
