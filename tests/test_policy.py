"""Egress policy: rule syntax, first match, defaults, special ranges, rebinding, DNS.

Pure decisions: nothing here opens a socket.
"""
from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given, strategies as st

from ksw1fast.constants import Proto
from ksw1fast.policy import (ANY_PORT, EgressPolicy, IPAddress, Rule, is_loopback_host,
                             parse_destination, parse_rule)

METADATA = ["169.254.169.254", "::ffff:169.254.169.254", "fe80::1", "fe80::1%eth0",
            "fd00:ec2::254", "100.100.100.200"]
SPECIAL = METADATA + ["0.0.0.0", "0.1.2.3", "::", "224.0.0.1", "239.255.255.250", "ff02::1",
                      "255.255.255.255", "::ffff:0.0.0.0"]


def allowed(policy: EgressPolicy, ip: str | bytes | IPAddress, port: int | None = 80,
            proto: str | None = "tcp", name: str | None = None) -> bool:
    return policy.check_address(ip, port, proto, name=name).allowed


# --- syntax ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("allow tcp db.internal:5432", Rule("allow", "tcp", "db.internal", None, (5432, 5432))),
    ("allow tcp *.internal:8000-8999", Rule("allow", "tcp", "*.internal", None, (8000, 8999))),
    ("allow udp *:53", Rule("allow", "udp", "*", None, (53, 53))),
    ("allow any *:*", Rule("allow", None, "*", None, ANY_PORT)),
    ("deny *", Rule("deny", None, "*", None, ANY_PORT)),
    ("  ALLOW  TCP  DB.Example.COM.:443 ",
     Rule("allow", "tcp", "db.example.com", None, (443, 443))),
    ("allow *.Bücher.example", Rule("allow", None, "*.xn--bcher-kva.example", None, ANY_PORT)),
])
def test_parse_name_rules(text: str, expected: Rule) -> None:
    assert parse_rule(text) == expected


@pytest.mark.parametrize("text, network, ports, shown", [
    ("deny any 10.0.0.0/8", "10.0.0.0/8", ANY_PORT, "deny any 10.0.0.0/8"),
    ("deny 169.254.0.0/16", "169.254.0.0/16", ANY_PORT, "deny any 169.254.0.0/16"),
    ("allow tcp [::1]:1-65535", "::1/128", (1, 65535), "allow tcp [::1]:1-65535"),
    ("allow [fd00::/8]:22", "fd00::/8", (22, 22), "allow any [fd00::/8]:22"),
    ("deny fe80::/10", "fe80::/10", ANY_PORT, "deny any [fe80::/10]"),
    ("allow 192.0.2.7:443", "192.0.2.7/32", (443, 443), "allow any 192.0.2.7:443"),
    ("allow [::ffff:169.254.0.0/112]:80", "169.254.0.0/16", (80, 80),  # mapped: as IPv4
     "allow any 169.254.0.0/16:80"),
])
def test_parse_cidr_rules(text: str, network: str, ports: tuple[int, int], shown: str) -> None:
    rule = parse_rule(text)
    assert rule.network == ipaddress.ip_network(network)
    assert rule.ports == ports
    assert str(rule) == shown
    assert parse_rule(str(rule)) == rule


@pytest.mark.parametrize("text, message", [
    ("", "expected 'allow|deny"),
    ("allow", "expected 'allow|deny"),
    ("allow tcp", "expected 'allow|deny"),
    ("allow tcp x:1 extra", "expected 'allow|deny"),
    ("permit tcp x", "action must be allow or deny"),
    ("allow sctp x", "unknown protocol 'sctp'"),
    ("allow tcp x:0", "must lie in 1-65535"),
    ("allow tcp x:70000", "must lie in 1-65535"),
    ("allow tcp x:9-8", "low first"),
    ("allow tcp x:http", "ports must be N, N-M or *"),
    ("allow tcp x:", "ports must be N, N-M or *"),
    ("allow tcp :80", "the host is empty"),
    ("allow 10.0.0.1/8", "has host bits set"),
    ("allow 10.0.0.0/33", "10.0.0.0/33"),
    ("allow 10.*", "looks like an address; write a CIDR"),
    ("allow [1.2.3.4]:80", "brackets are for IPv6"),
    ("allow [::1", "[ADDRESS[/LEN]][:PORTS]"),
    ("allow [::1]x", "[ADDRESS[/LEN]][:PORTS]"),
    ("allow db?.internal", "is not a host name pattern"),
    ("allow db..internal", "is not a host name pattern"),
])
def test_parse_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="rule .*" + re.escape(message)):
        parse_rule(text)


def test_rule_from_mapping() -> None:
    assert Rule.from_mapping({"action": "allow", "proto": "tcp", "host": "*.internal",
                              "ports": "5432"}) == parse_rule("allow tcp *.internal:5432")
    assert Rule.from_mapping({"action": "deny", "host": "169.254.0.0/16"}) == \
        parse_rule("deny 169.254.0.0/16")
    assert Rule.from_mapping({"action": "allow", "host": "[::1]", "ports": 8080}) == \
        parse_rule("allow [::1]:8080")
    assert Rule.from_mapping({"action": "allow", "proto": "udp", "ports": "53"}) == \
        parse_rule("allow udp *:53")
    with pytest.raises(ValueError, match="unknown key.*port"):
        Rule.from_mapping({"action": "allow", "port": 53})
    with pytest.raises(ValueError, match="'action'.*required"):
        Rule.from_mapping({"host": "x"})
    with pytest.raises(ValueError, match="ports"):
        Rule.from_mapping({"action": "allow", "ports": "0"})


def test_policy_accepts_strings_mappings_and_rules() -> None:
    rule = parse_rule("deny udp *")
    policy = EgressPolicy(["allow tcp *:443", {"action": "allow", "host": "10.0.0.0/8"}, rule])
    assert [str(r) for r in policy.rules] == ["allow tcp *:443", "allow any 10.0.0.0/8",
                                              "deny udp *"]


def test_parse_destination_is_an_allow_rule_without_action() -> None:
    assert parse_destination("db.internal:5432") == parse_rule("allow db.internal:5432")
    assert parse_destination("udp *:53") == parse_rule("allow udp *:53")
    with pytest.raises(ValueError, match="destination 'deny x'"):
        parse_destination("deny x")


# --- matching -------------------------------------------------------------------------

def test_hostname_patterns() -> None:
    policy = EgressPolicy(["allow *.internal", "allow db.example.com", "allow api-*.svc"])
    for name in ("a.internal", "a.b.internal", "A.Internal.", "db.example.com", "DB.EXAMPLE.COM",
                 "api-v2.svc"):
        assert policy.check_name(name, 443, "tcp").allowed, name
    for name in ("internal", "a.internal.evil.com", "xdb.example.com", "db.example.com.evil",
                 "api.svc"):
        assert not policy.check_name(name, 443, "tcp").allowed, name


def test_name_pattern_never_matches_ip_literals() -> None:
    policy = EgressPolicy(["allow *.internal", "allow *:443"])
    assert not policy.check_name("10.0.0.1", 80, "tcp").allowed
    assert policy.check_name("10.0.0.1", 443, "tcp").allowed  # `*` covers addresses too


def test_idna_names_match_their_punycode() -> None:
    policy = EgressPolicy(["deny *.xn--bcher-kva.example", "allow *"])
    assert not policy.check_name("www.BÜCHER.example", 80, "tcp").allowed
    assert policy.check_name("www.buecher.example", 80, "tcp").allowed
    assert not policy.check_name("bad..name", 80, "tcp").allowed


def test_cidr_rules_v4_and_v6() -> None:
    policy = EgressPolicy(["allow 10.0.0.0/8", "allow [2001:db8::/32]:443"])
    assert allowed(policy, "10.255.0.1")
    assert allowed(policy, "::ffff:10.1.2.3")  # IPv4-mapped counts as IPv4
    assert allowed(policy, "2001:db8::5", 443)
    assert not allowed(policy, "2001:db8::5", 80)
    assert not allowed(policy, "11.0.0.1")
    assert allowed(policy, ipaddress.ip_address("10.0.0.1"))
    assert allowed(policy, bytes([10, 0, 0, 1]))  # raw DnsResult bytes
    assert allowed(policy, ipaddress.ip_address("2001:db8::1").packed, 443)


@pytest.mark.parametrize("port, ok", [(7999, False), (8000, True), (8500, True), (8999, True),
                                      (9000, False), (5432, True), (5433, False)])
def test_ports_and_ranges(port: int, ok: bool) -> None:
    policy = EgressPolicy(["allow tcp *:8000-8999", "allow tcp db.internal:5432"])
    name = "db.internal" if port in (5432, 5433) else "web.internal"
    assert policy.check_name(name, port, "tcp").allowed is ok


def test_per_protocol() -> None:
    policy = EgressPolicy(["allow udp *:53", "allow tcp *:443"])
    assert policy.check_name("ns.example", 53, "udp").allowed
    assert not policy.check_name("ns.example", 53, "tcp").allowed
    assert policy.check_name("web.example", 443, Proto.TCP).allowed
    assert not policy.check_name("web.example", 443, Proto.UDP).allowed
    assert not policy.check_name("web.example", 443, 2).allowed
    with pytest.raises(ValueError, match="unknown protocol"):
        policy.check_name("web.example", 443, "sctp")


def test_first_match_wins() -> None:
    deny_first = EgressPolicy(["deny tcp *.internal:22", "allow tcp *.internal"])
    assert not deny_first.check_name("a.internal", 22, "tcp").allowed
    assert deny_first.check_name("a.internal", 23, "tcp").allowed
    allow_first = EgressPolicy(["allow tcp *.internal", "deny tcp *.internal:22"])
    assert allow_first.check_name("a.internal", 22, "tcp").allowed
    cidr = EgressPolicy(["deny 10.0.0.5", "allow 10.0.0.0/8"])
    assert not allowed(cidr, "10.0.0.5")
    assert allowed(cidr, "10.0.0.6")


def test_default_allow_without_allow_rules_and_deny_with_them() -> None:
    assert EgressPolicy().is_default()
    assert EgressPolicy().check_name("anything.example", 1, "udp").allowed
    assert allowed(EgressPolicy(), "8.8.8.8")
    deny_only = EgressPolicy(["deny 10.0.0.0/8"])
    assert deny_only.default_allow and not deny_only.is_default()
    assert allowed(deny_only, "8.8.8.8")
    assert not allowed(deny_only, "10.1.1.1")
    with_allow = EgressPolicy(["allow tcp db.internal:5432"])
    assert not with_allow.default_allow
    assert not with_allow.check_name("other.internal", 5432, "tcp").allowed
    assert not allowed(with_allow, "8.8.8.8")
    assert "no rule allows tcp 8.8.8.8:80" in with_allow.check_address("8.8.8.8", 80, "tcp").reason


def test_reasons_name_the_rule() -> None:
    policy = EgressPolicy(["deny tcp *:25", "allow *"])
    decision = policy.check_name("mail.example", 25, "tcp")
    assert not decision.allowed and decision.reason == \
        "tcp mail.example:25 denied by rule 'deny tcp *:25'"
    decision = policy.check_address("2001:db8::1", 443, "tcp", name="web.example")
    assert decision.allowed and decision.reason == \
        "tcp [2001:db8::1]:443 (web.example) allowed by rule 'allow any *'"


# --- special ranges -------------------------------------------------------------------

@pytest.mark.parametrize("rules", [[], ["allow any *:*"], ["allow *"], ["allow tcp *:80"],
                                   ["deny 10.0.0.0/8"], ["allow 0.0.0.0/0", "allow ::/0"],
                                   ["allow ::ffff:0:0/96"]])
@pytest.mark.parametrize("ip", SPECIAL)
def test_special_addresses_denied_even_by_wildcards(rules: list[str], ip: str) -> None:
    policy = EgressPolicy(rules)
    assert not allowed(policy, ip)
    assert not policy.check_name(ip, 80, "tcp").allowed  # a literal in an Open
    assert not policy.filter_dns("x.example", [ip])


def test_metadata_reason() -> None:
    for ip in ("169.254.169.254", "::ffff:169.254.169.254"):
        decision = EgressPolicy(["allow *"]).check_address(ip, 80, "tcp")
        assert decision == type(decision)(False, "169.254.169.254 is link-local (cloud metadata)")
    assert EgressPolicy().check_address("ff02::1", 80, "udp").reason == "ff02::1 is multicast"


@pytest.mark.parametrize("rule", ["allow 169.254.169.254", "allow tcp 169.254.0.0/16:80",
                                  "allow [::ffff:169.254.169.254]:80"])
def test_explicit_cidr_allow_admits_metadata(rule: str) -> None:
    policy = EgressPolicy([rule])
    assert allowed(policy, "169.254.169.254")
    assert allowed(policy, "::ffff:169.254.169.254")
    assert allowed(policy, "169.254.169.254", 81) is rule.endswith("254")
    assert not allowed(policy, "fe80::1")


def test_explicit_allows_of_other_special_ranges() -> None:
    policy = EgressPolicy(["allow fe80::/10", "allow udp 224.0.0.0/4", "allow [::]:80"])
    assert allowed(policy, "fe80::1%eth0")
    assert allowed(policy, "239.1.2.3", proto="udp")
    assert not allowed(policy, "239.1.2.3", proto="tcp")
    assert allowed(policy, "::")


def test_deny_rule_before_explicit_allow_still_wins() -> None:
    policy = EgressPolicy(["deny *.evil.example", "allow 169.254.169.254"])
    assert not allowed(policy, "169.254.169.254", name="x.evil.example")
    assert allowed(policy, "169.254.169.254", name="metadata.internal")


# --- names, then addresses: DNS rebinding ---------------------------------------------

def test_rebinding_name_allowed_by_pattern_resolving_to_metadata() -> None:
    policy = EgressPolicy(["allow tcp db.internal:5432", "allow tcp *.example.com:443"])
    assert policy.check_name("db.internal", 5432, "tcp").allowed
    assert policy.check_address("10.1.2.3", 5432, "tcp", name="db.internal").allowed
    for ip in METADATA + ["0.0.0.0", "::"]:
        decision = policy.check_address(ip, 5432, "tcp", name="db.internal")
        assert not decision.allowed and " is " in decision.reason, ip
    assert not allowed(policy, "169.254.169.254", 443, name="rebind.example.com")


def test_name_rules_apply_to_addresses_only_with_the_name() -> None:
    policy = EgressPolicy(["allow tcp db.internal:5432"])
    assert not policy.check_address("10.1.2.3", 5432, "tcp").allowed
    assert not policy.check_address("10.1.2.3", 5432, "tcp", name="other.internal").allowed
    # a literal given as the name is no name: the rules for names do not admit it
    assert not policy.check_address("10.1.2.3", 5432, "tcp", name="10.1.2.3").allowed


def test_cidr_allow_admits_names_pending_their_addresses() -> None:
    policy = EgressPolicy(["deny *.evil.example", "allow tcp 10.0.0.0/8:5432"])
    assert policy.check_name("db.internal", 5432, "tcp").allowed
    assert not policy.check_name("db.internal", 80, "tcp").allowed
    assert not policy.check_name("x.evil.example", 5432, "tcp").allowed
    assert policy.check_address("10.9.9.9", 5432, "tcp", name="db.internal").allowed
    assert not policy.check_address("192.0.2.1", 5432, "tcp", name="db.internal").allowed


def test_cidr_deny_is_authoritative_whatever_the_name() -> None:
    policy = EgressPolicy(["deny 10.0.0.0/8", "allow *"])
    assert policy.check_name("db.internal", 5432, "tcp").allowed
    assert not policy.check_address("10.0.0.1", 5432, "tcp", name="db.internal").allowed


# --- DNS ------------------------------------------------------------------------------

def test_check_name_without_port_asks_whether_any_port_is_allowed() -> None:
    partial = EgressPolicy(["deny tcp *:25", "allow *"])
    assert partial.check_name("mail.example").allowed
    covered = EgressPolicy(["deny tcp *.internal:1-1000", "deny tcp *.internal:1001-65535",
                            "deny udp *.internal", "allow *"])
    assert not covered.check_name("db.internal").allowed
    assert covered.check_name("db.internal", None, "tcp").allowed is False
    assert covered.check_name("db.example").allowed
    only_tcp = EgressPolicy(["allow tcp db.internal:5432"])
    assert only_tcp.check_name("db.internal").allowed
    assert not only_tcp.check_name("db.internal", None, "udp").allowed
    assert not only_tcp.check_name("www.example").allowed


def test_filter_dns_drops_denied_answers_and_keeps_their_form() -> None:
    policy = EgressPolicy(["deny 10.0.0.0/8", "allow *.internal"])
    answers: list[str | bytes] = [b"\x0a\x00\x00\x01", b"\xc0\x00\x02\x01", b"\xa9\xfe\xa9\xfe",
               ipaddress.ip_address("2001:db8::1").packed, "::ffff:10.0.0.2"]
    assert policy.filter_dns("db.internal", answers) == [answers[1], answers[3]]
    assert policy.filter_dns("db.example", answers) == []


# --- listen address -------------------------------------------------------------------

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LOCALHOST.", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.2", False),
    ("example.com", False), ("localhost.example.com", False),
])
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# --- properties -----------------------------------------------------------------------

ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ports = st.integers(1, 65535)


@given(ipv4, ports, st.sampled_from(["tcp", "udp"]))
def test_wildcard_allow_never_admits_special_and_admits_the_rest(ip: ipaddress.IPv4Address,
                                                                 port: int, proto: str) -> None:
    special = (ip in ipaddress.ip_network("169.254.0.0/16") or ip.is_multicast
               or ip in ipaddress.ip_network("0.0.0.0/8") or str(ip) in ("255.255.255.255",
                                                                          "100.100.100.200"))
    policy = EgressPolicy(["allow any *:*"])
    assert policy.check_address(ip, port, proto).allowed is not special
    mapped = ipaddress.IPv6Address("::ffff:" + str(ip))
    assert policy.check_address(mapped, port, proto).allowed is not special


@given(st.lists(st.tuples(st.sampled_from(["allow", "deny"]),
                          st.sampled_from(["tcp", "udp", "any"]),
                          st.integers(1, 60), st.integers(0, 20)), max_size=6),
       st.integers(1, 80), st.sampled_from(["tcp", "udp"]))
def test_first_match_against_a_naive_model(spec: list, port: int, proto: str) -> None:
    rules = [f"{action} {p} *.example:{lo}-{lo + width}" for action, p, lo, width in spec]
    policy = EgressPolicy(rules)
    expected = policy.default_allow
    for action, p, lo, width in spec:
        if p in ("any", proto) and lo <= port <= lo + width:
            expected = action == "allow"
            break
    assert policy.check_name("www.example", port, proto).allowed is expected
    # with no port: allowed exactly when some port is
    some = any(policy.check_name("www.example", q, r).allowed
               for q in range(1, 82) for r in ("tcp", "udp"))
    assert policy.check_name("www.example").allowed is some


@given(st.text(max_size=300), st.one_of(st.none(), ports), st.sampled_from([None, "tcp", "udp"]))
def test_any_client_name_gets_a_decision(name: str, port: int | None, proto: str | None) -> None:
    policy = EgressPolicy(["deny *.evil.example", "allow tcp *.internal:5432", "allow 10.0.0.0/8"])
    assert isinstance(policy.check_name(name, port, proto).allowed, bool)
    assert isinstance(policy.check_address("10.0.0.1", port, proto, name=name).allowed, bool)
