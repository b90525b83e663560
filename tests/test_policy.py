"""Egress policy: rule syntax, first match, defaults, special ranges, rebinding, DNS.

Pure decisions: nothing here opens a socket.
"""
from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import assume, given, strategies as st

from helpers import EMBEDDINGS, FILL
from ksw1fast.protocol.constants import Proto
from ksw1fast.security.egress import (ANY_PORT, EgressPolicy, IPAddress, Rule, is_loopback_host,
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
        assert decision == type(decision)(False, "169.254.169.254 is link-local (cloud metadata)",
                                          "special address: link-local (cloud metadata)")
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


# --- IPv4 inside IPv6 -----------------------------------------------------------------

PREFIX = {"nat64 64:ff9b::/96": "64:ff9b::/96", "nat64 local 64:ff9b:1::/48": "64:ff9b:1::/48",
          "6to4 2002::/16": "2002::/16", "ipv4-compatible ::/96": "::/96",
          "siit ::ffff:0:0:0/96": "::ffff:0:0:0/96", "teredo client": "2001::/32",
          "teredo server": "2001::/32"}
assert PREFIX.keys() == EMBEDDINGS.keys()


def embed(form: str, v4: str) -> ipaddress.IPv6Address:
    return EMBEDDINGS[form](ipaddress.IPv4Address(v4), FILL)


def _refused_everywhere(policy: EgressPolicy, ip: ipaddress.IPv6Address) -> bool:
    """Denied as an address in each form, as an Open's literal, and as a DNS answer."""
    return not any((allowed(policy, ip), allowed(policy, str(ip)), allowed(policy, ip.packed),
                    allowed(policy, ip, None, None, name="x.example"),
                    policy.check_name(str(ip), 80, "tcp").allowed,
                    policy.check_name(f"[{ip}]", None, None).allowed,
                    policy.filter_dns("x.example", [ip.packed, str(ip)])))


@pytest.mark.parametrize("form", EMBEDDINGS)
@pytest.mark.parametrize("v4", ["169.254.169.254", "224.0.0.1", "0.0.0.0", "100.100.100.200",
                                "255.255.255.255"])
def test_embedded_special_ipv4_is_special(form: str, v4: str) -> None:
    ip = embed(form, v4)
    own = [] if ip == ipaddress.IPv6Address("::") else [f"allow [{ip}]"]  # `::` is no embedding
    for rules in ([], ["allow *"], ["allow 0.0.0.0/0", "allow ::/0"], [f"allow {PREFIX[form]}"],
                  own, ["deny 10.0.0.0/8"], ["allow tcp *:80"]):
        assert _refused_everywhere(EgressPolicy(rules), ip), (rules, ip)


@pytest.mark.parametrize("form", EMBEDDINGS)
@pytest.mark.parametrize("v4, deny", [("127.0.0.1", "deny 127.0.0.0/8"),
                                      ("10.0.0.1", "deny 10.0.0.0/8"),
                                      ("10.0.0.1", "deny [::ffff:10.0.0.1]")])
def test_embedded_ipv4_denied_by_rule_is_denied(form: str, v4: str, deny: str) -> None:
    ip = embed(form, v4)
    assert allowed(EgressPolicy(), ip)  # as the IPv4 alone is
    for rules in ([deny], [deny, "allow *"], [f"allow {PREFIX[form]}", deny],
                  ["allow ::/0", deny, "allow *"], ["allow *.internal", f"allow [{ip}]", deny]):
        assert _refused_everywhere(EgressPolicy(rules), ip), (rules, ip)


@pytest.mark.parametrize("form", EMBEDDINGS)
def test_embedded_ipv4_denied_on_some_ports(form: str) -> None:
    ip = embed(form, "10.0.0.1")
    policy = EgressPolicy([f"allow {PREFIX[form]}", "deny tcp 10.0.0.0/8:1-1024"])
    assert not allowed(policy, ip, 80) and not allowed(policy, ip, 1024)
    assert allowed(policy, ip, 1025) and allowed(policy, ip, 80, "udp")
    assert policy.filter_dns("x.example", [ip.packed]) == [ip.packed]  # some port is open


@pytest.mark.parametrize("form", EMBEDDINGS)
def test_embedded_harmless_ipv4_stays_allowed(form: str) -> None:
    ip = embed(form, "8.8.8.8")
    for rules in ([], ["deny 10.0.0.0/8"], ["allow *"], [f"allow {PREFIX[form]}"],
                  ["deny 169.254.0.0/16", f"allow [{ip}]:80"], ["allow ::/0", "deny 10.0.0.0/8"]):
        policy = EgressPolicy(rules)
        assert allowed(policy, ip) and allowed(policy, str(ip)) and allowed(policy, ip.packed)
        assert policy.check_name(str(ip), 80, "tcp").allowed, rules
        assert policy.filter_dns("x.example", [ip.packed]) == [ip.packed], rules
    assert not allowed(EgressPolicy(["allow 1.1.1.1"]), ip)
    assert not allowed(EgressPolicy(["deny 8.8.8.8"]), ip)


@pytest.mark.parametrize("form", sorted(set(EMBEDDINGS) - {"teredo client", "teredo server"}))
def test_embedded_ipv4_meets_ipv4_rules_as_that_ipv4(form: str) -> None:
    ip = embed(form, "10.1.2.3")
    policy = EgressPolicy(["allow tcp 10.0.0.0/8:443", "deny *"])
    assert allowed(policy, ip, 443) and allowed(policy, str(ip), 443)
    assert not allowed(policy, ip, 80)
    assert not allowed(policy, embed(form, "11.1.2.3"), 443)
    assert allowed(EgressPolicy(["allow 169.254.169.254:80"]), embed(form, "169.254.169.254"))
    assert parse_destination("10.0.0.0/8:443").matches(str(ip), 443)  # token scopes too
    assert not parse_destination("11.0.0.0/8").matches(str(ip))


def test_teredo_needs_both_its_ipv4s_in_an_ipv4_rule() -> None:
    server_and_client = ipaddress.IPv6Address("2001:0:a00:5::f5ff:fff9")  # client inverted
    assert server_and_client.teredo == (ipaddress.IPv4Address("10.0.0.5"),
                                        ipaddress.IPv4Address("10.0.0.6"))
    assert allowed(EgressPolicy(["allow 10.0.0.0/8"]), server_and_client)
    assert not allowed(EgressPolicy(["allow 10.0.0.5"]), server_and_client)
    assert not allowed(EgressPolicy(["allow 10.0.0.6"]), server_and_client)
    assert not allowed(EgressPolicy(["deny 10.0.0.6"]), server_and_client)
    assert not allowed(EgressPolicy(["allow 10.0.0.5", "deny 10.0.0.0/8"]), server_and_client)


def test_embedded_refusal_reasons_name_the_ipv4() -> None:
    decision = EgressPolicy(["allow *"]).check_address("64:ff9b::a9fe:a9fe", 80, "tcp")
    assert decision.reason == ("169.254.169.254 is link-local (cloud metadata) "
                               "(embedded in 64:ff9b::a9fe:a9fe)")
    decision = EgressPolicy(["allow [64:ff9b::/96]", "deny 10.0.0.0/8"]).check_address(
        "64:ff9b::a00:1", 80, "tcp")
    assert decision.reason == ("tcp 10.0.0.1:80 denied by rule 'deny any 10.0.0.0/8' "
                               "(embedded in 64:ff9b::a00:1)")


def test_ipv6_rules_still_judge_the_ipv6_form() -> None:
    nat64 = EgressPolicy(["allow tcp [64:ff9b::/96]:443"])
    assert allowed(nat64, "64:ff9b::808:808", 443)
    assert not allowed(nat64, "64:ff9b::808:808", 80)
    assert not allowed(nat64, "8.8.8.8", 443)  # the prefix admits the IPv6 form only
    assert not allowed(EgressPolicy(["deny [64:ff9b::/96]"]), "64:ff9b::808:808")
    assert allowed(EgressPolicy(["deny [64:ff9b::/96]"]), "8.8.8.8")
    first = EgressPolicy(["allow *", "deny [64:ff9b::/96]"])  # first match wins, as ever
    assert allowed(first, "64:ff9b::808:808")


def test_not_embeddings() -> None:
    """Look-alikes outside the prefixes, and :: / ::1, are judged as plain IPv6."""
    policy = EgressPolicy(["deny 0.0.0.0/0"])
    for text in ("::1", "64:ff9b:0:1::a9fe:a9fe", "64:ff9b:2::a9fe:a9fe", "2003::a9fe:a9fe",
                 "2001:1::a9fe:a9fe", "::1:0:a9fe:a9fe", "::fffe:0:a9fe:a9fe", "2001:db8::1"):
        assert allowed(policy, text), text
    assert allowed(EgressPolicy(), "::1") and not allowed(EgressPolicy(), "::")


def test_filter_dns_drops_embedded_answers_of_refused_ipv4s() -> None:
    answers = [embed(form, v4).packed for form in EMBEDDINGS
               for v4 in ("169.254.169.254", "10.0.0.1", "8.8.8.8")]
    harmless = [a for a in answers if ipaddress.IPv6Address(a) in
                {embed(form, "8.8.8.8") for form in EMBEDDINGS}]
    assert len(harmless) == len(EMBEDDINGS)
    assert EgressPolicy(["deny 10.0.0.0/8"]).filter_dns("x.example", answers) == harmless
    assert EgressPolicy().filter_dns("x.example", answers) == [
        a for a in answers if ipaddress.IPv6Address(a) not in
        {embed(form, "169.254.169.254") for form in EMBEDDINGS}]


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


embeddings = st.builds(lambda form, v4, fill: (form, EMBEDDINGS[form](v4, fill), v4),
                       st.sampled_from(list(EMBEDDINGS)), st.one_of(ipv4, st.sampled_from([
                           ipaddress.IPv4Address(a) for a in ("169.254.169.254", "10.1.2.3",
                                                              "127.0.0.1", "224.0.0.1")])),
                       st.binary(min_size=10, max_size=10))
# ::0.0.0.0 and ::0.0.0.1 are the unspecified and the loopback address, no IPv4s
NO_EMBEDDING = {ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")}
IPV4_RULES = [[], ["deny 10.0.0.0/8"], ["allow *"], ["allow 10.0.0.0/8", "deny *"],
              ["deny tcp 127.0.0.0/8:1-1024", "allow tcp *:1-2000"],
              ["allow 169.254.169.254:80", "deny 224.0.0.0/4", "allow *.internal"]]


@given(embeddings, st.one_of(st.none(), ports), st.sampled_from([None, "tcp", "udp"]))
def test_an_ipv6_allow_never_opens_a_refused_ipv4(embedding: tuple, port: int | None,
                                                 proto: str | None) -> None:
    form, ip, v4 = embedding
    assume(ip not in NO_EMBEDDING)
    v4s = ip.teredo or (v4,)
    for denies in (["deny 10.0.0.0/8"], ["deny tcp 127.0.0.0/8:1-1024", "deny udp *:53"], []):
        alone = EgressPolicy(denies)  # no allow rules: only a refusal denies
        if all(alone.check_address(v4, port, proto).allowed for v4 in v4s):
            continue
        for extra in (["allow ::/0"], [f"allow {PREFIX[form]}"], [f"allow [{ip}]"]):
            for rules in (extra + denies, denies + extra):
                assert not EgressPolicy(rules).check_address(ip, port, proto).allowed, rules


@given(embeddings, st.one_of(st.none(), ports), st.sampled_from([None, "tcp", "udp"]),
       st.sampled_from(IPV4_RULES))
def test_without_ipv6_rules_an_embedded_ipv4_is_judged_as_itself(
        embedding: tuple, port: int | None, proto: str | None, rules: list[str]) -> None:
    form, ip, v4 = embedding
    assume(not form.startswith("teredo") and ip not in NO_EMBEDDING)
    policy = EgressPolicy(rules)
    for name in (None, "db.internal"):
        assert (policy.check_address(ip, port, proto, name=name).allowed
                is policy.check_address(v4, port, proto, name=name).allowed)


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
