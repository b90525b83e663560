"""Egress policy: which destinations a client may open, resolve or reach (docs/protocol.md
§4, §7, §8).

Pure decisions over plain values, no I/O.

Rule syntax (CLI and TOML strings)::

    ACTION [PROTO] TARGET

    ACTION  allow | deny
    PROTO   tcp | udp | any                       (default any)
    TARGET  HOST[:PORTS] | [IPV6[/LEN]][:PORTS] | IPV6[/LEN]
    HOST    *                    any destination, name or address
            a host name pattern  `*` matches any run of characters, dots included;
                                 case-insensitive; no other wildcards
            an IPv4 address or CIDR
    PORTS   N | N-M | *          (default *: every port)

An IPv6 address or network takes brackets when it has ports (`[::1]:1-65535`,
`[fd00::/8]:22`); without ports it may be bare (`deny fd00::/8`). Examples::

    allow tcp db.internal:5432
    allow tcp *.internal:8000-8999
    allow udp *:53
    allow tcp [::1]:1-65535
    deny any 10.0.0.0/8
    deny 169.254.0.0/16
    allow 169.254.169.254:80      # the metadata service, on purpose

TOML may give the same rule as a table: ``{action = "allow", proto = "tcp",
host = "*.internal", ports = "5432"}`` (`proto` defaults to any, `host` to `*`,
`ports` to every port; `ports` may be an integer).

Semantics:

- Rules are tried in order and the first rule matching protocol, port and host wins.
- With no matching rule the default is deny when any `allow` rule exists, else allow.
- `*.example.com` does not match `example.com`; list both when both are meant.
  A name pattern never matches an IP literal: write a CIDR for those.
- Special addresses (link-local 169.254.0.0/16 and fe80::/10, where cloud metadata
  lives, cloud metadata fd00:ec2::254 and 100.100.100.200, 0.0.0.0/8, `::`,
  multicast, broadcast) are denied unless a CIDR `allow` lying inside that special
  range admits them: neither `*` nor name rules nor `allow 0.0.0.0/0` reach
  169.254.169.254. IPv4-mapped IPv6 (`::ffff:169.254.169.254`) is its IPv4 everywhere
  (a dual-stack socket sends it as IPv4).
- Other IPv6 forms carry an IPv4 that a translator or tunnel delivers to: NAT64
  `64:ff9b::/96` and SIIT `::ffff:0:a.b.c.d` (the low 32 bits), the deprecated
  IPv4-compatible `::a.b.c.d` (not `::` or `::1`), the local-use NAT64 `64:ff9b:1::/48`
  (read in the RFC 6052 layout of a /48 prefix: bits 48-63 and 72-87), 6to4 `2002::/16`
  (bits 16-47) and Teredo `2001::/32` (two: its server, bits 32-63, and its client, the
  low 32 bits inverted). Such an address meets IPv4 CIDR rules as its IPv4 (Teredo: both
  must lie in the network), IPv6 CIDR rules as itself, `*` and name rules as any address;
  first match wins as ever. On top, its IPv4 judged alone must not be refused (special,
  or met by a deny before any allow): `allow [64:ff9b::/96]` admits NAT64 destinations,
  but never one whose IPv4 is special or denied, wherever the rules stand. A special
  IPv4 needs an IPv4 CIDR allow inside its special range in every form it comes in
  (`allow 169.254.169.254` admits `64:ff9b::a9fe:a9fe`; `allow [64:ff9b::a9fe:a9fe]` alone
  does not). Token scopes match CIDRs the same way.

Using it against DNS rebinding (the server's job, made natural here)::

    policy.check_name(host, port, proto)             # before resolving: may one ask?
    for ip in resolved:                              # then every address to be used
        policy.check_address(ip, port, proto, name=host)
    policy.filter_dns(name, addresses)               # DnsResult: keep allowed answers

`check_name` judges name rules only (a CIDR `allow` admits a name provisionally,
pending its addresses); `check_address` is authoritative, so a name allowed by pattern
that resolves to 169.254.169.254 is still denied. Name `deny` rules are advisory
(resolver search domains, numeric forms like `2852039166`); CIDR denies are not.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Mapping, TypeVar

from ksw1fast.protocol.constants import Proto

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Addr = TypeVar("Addr", bound="str | bytes | IPAddress")

ANY_PORT = (0, 65535)
_PROTOS = ("tcp", "udp")
_SYNTAX = "expected 'allow|deny [tcp|udp|any] HOST[:PORTS]'"
_NAME_PATTERN = re.compile(r"[a-z0-9_*-]+(\.[a-z0-9_*-]+)*")
_NUMERIC = re.compile(r"[0-9.*]+")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

_SPECIAL: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), what) for net, what in (
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("fe80::/10", "link-local"),
        ("fd00:ec2::254/128", "cloud metadata (AWS IPv6)"),
        ("100.100.100.200/32", "cloud metadata (Alibaba)"),
        ("0.0.0.0/8", "in 0.0.0.0/8 (reaches the local host)"),
        ("::/128", "the unspecified address (reaches the local host)"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("255.255.255.255/32", "broadcast"),
    ))
# _SPECIAL as integer bounds per IP version, in the same order: every check consults it,
# and comparing ints is several times cheaper than `ip in network`
_SPECIAL_BOUNDS: dict[int, tuple[tuple[int, int, IPNetwork, str], ...]] = {
    version: tuple((int(net.network_address), int(net.broadcast_address), net, what)
                   for net, what in _SPECIAL if net.version == version)
    for version in (4, 6)}
# everything an IPv4 literal is made of; an IPv6 literal always has a colon
_IPV4_CHARS = frozenset("0123456789.")
_LITERAL_CHARS = frozenset("0123456789abcdefABCDEF.:")  # and IPv6's
LITERALS_REMEMBERED = 4096  # (literal, port, proto) decisions an EgressPolicy keeps
# IPv6 prefixes that carry an IPv4, as integers of the address bits above their length
_LOW32 = 0xFFFF_FFFF
_NAT64 = 0x64_FF9B << 64       # 64:ff9b::/96
_SIIT = 0xFFFF << 16           # ::ffff:0:0:0/96
_NAT64_LOCAL = 0x64_FF9B_0001  # 64:ff9b:1::/48
_TEREDO = 0x2001_0000          # 2001::/32
_6TO4 = 0x2002                 # 2002::/16


def compile_wildcard(pattern: str) -> re.Pattern[str]:
    """A regex (for `fullmatch`) where `*` matches any run of characters and all else is
    literal.

    Unlike fnmatch there are no `?` or `[...]` classes, so `[::1]` means itself.
    Callers lower-case both sides.
    """
    return re.compile(".*".join(map(re.escape, pattern.split("*"))))


_compiled = lru_cache(maxsize=1024)(compile_wildcard)


def normalize_name(name: str) -> str | None:
    """A host name as the resolver sees it: IDNA (punycode), lower case, no final dot.

    None when it cannot be encoded (getaddrinfo would refuse it too).
    """
    name = name.strip()
    name = name[:-1] if name.endswith(".") else name
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return name.lower() or None


def _unmap(ip: IPAddress) -> IPAddress:
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def to_address(ip: str | bytes | IPAddress) -> IPAddress:
    """An address from text (zone id allowed), 4/16 raw bytes or an address; IPv4-mapped
    IPv6 becomes its IPv4. Raises ValueError for anything else."""
    if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip = ipaddress.ip_address(ip)  # (given an address, it would parse its text again)
    return _unmap(ip)


def _literal(host: str) -> IPAddress | None:
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" not in text and not _IPV4_CHARS.issuperset(text):
        return None  # a name, as most are: spare ipaddress two failed parses and raises
    try:
        return to_address(text)
    except ValueError:
        return None


def parse_literal(host: str) -> IPAddress | None:
    """The IP address `host` is as written (a zone id allowed, IPv4-mapped IPv6 kept as
    such: it is what a socket connects to); None for a name."""
    if not _LITERAL_CHARS.issuperset(host.split("%", 1)[0]):
        return None  # a name: spare ipaddress two failed parses and raises
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def normalize_proto(proto: str | int | None) -> str | None:
    """'tcp', 'udp' or None (any) from tcp/udp/any, a `Proto` or None; ValueError else."""
    if proto is None:
        return None
    if isinstance(proto, int):
        return Proto(proto).name.lower()
    name = proto.strip().lower()
    if name == "any":
        return None
    if name not in _PROTOS:
        raise ValueError(f"unknown protocol {proto!r}: use tcp, udp or any")
    return name


def _inside(net: IPNetwork, special: IPNetwork) -> bool:
    """Whether `net` lies inside the special range `special` (of the same version)."""
    return (net.version == special.version
            and int(special.network_address) <= int(net.network_address)
            and int(net.broadcast_address) <= int(special.broadcast_address))


def _special(ip: IPAddress) -> tuple[IPNetwork, str] | None:
    value = int(ip)
    for low, high, net, what in _SPECIAL_BOUNDS[ip.version]:
        if low <= value <= high:
            return net, what
    return None


def _embedded(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address hands to a translator or tunnel (see the
    module docstring); () for every other address. Integer tests: it runs on every check."""
    if ip.version == 4:
        return ()
    value = int(ip)
    top96 = value >> 32
    if top96 == _NAT64 or top96 == _SIIT or (top96 == 0 and value > 1):
        v4 = value & _LOW32
    elif value >> 96 == _TEREDO:  # server, then the client (stored inverted)
        return (ipaddress.IPv4Address((value >> 64) & _LOW32),
                ipaddress.IPv4Address(~value & _LOW32))
    elif value >> 112 == _6TO4:
        v4 = (value >> 80) & _LOW32
    elif value >> 80 == _NAT64_LOCAL:  # 16 bits, the 'u' octet (ignored), 16 bits
        v4 = ((value >> 64) & 0xFFFF) << 16 | ((value >> 40) & 0xFFFF)
    else:
        return ()
    return (ipaddress.IPv4Address(v4),)


def _is_special(ip: IPAddress) -> bool:
    """Whether `ip` or an IPv4 it embeds is special: what the default policy refuses."""
    if _special(ip) is not None:
        return True
    # (most answers are IPv4: spare them the call and the generator)
    return ip.version == 6 and any(_special(v4) is not None for v4 in _embedded(ip))


def _dest(host: object, port: int | None, proto: str | None) -> str:
    text = f"[{host}]" if ":" in str(host) and port is not None else str(host)
    return f"{proto or 'any'} {text}" + (f":{port}" if port is not None else "")


@dataclass(frozen=True)
class Decision:
    """The answer of a check; `reason` is fit for logs and OpenErr messages, `rule` says
    which rule decided for the audit trail: a rule as written (`allow tcp db:5432`), or
    DEFAULT_ALLOW, DEFAULT_DENY, `special address: ...` or INVALID_NAME."""

    allowed: bool
    reason: str
    rule: str = ""


DEFAULT_ALLOW = "default: allow (no allow rules)"
DEFAULT_DENY = "default: deny (no allow rule matches)"
INVALID_NAME = "invalid host name"


@dataclass(frozen=True)
class Rule:
    """One parsed rule. `host` is `*`, a lower-case name pattern or the network's text."""

    action: str                       # "allow" or "deny"
    proto: str | None                 # "tcp", "udp" or None for any
    host: str
    network: IPNetwork | None = None  # set when the host is an address or CIDR
    ports: tuple[int, int] = ANY_PORT

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Rule:
        """A rule from a TOML table: keys action (required), proto, host, ports."""
        where = f"rule {dict(data)!r}"
        unknown = set(data) - {"action", "proto", "host", "ports"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        if "action" not in data:
            raise ValueError(f"{where}: 'action' (allow or deny) is required")
        host = str(data.get("host", "*")).strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(_action(str(data["action"]), where),
                   _rule_proto(str(data.get("proto", "any")), where),
                   *_host(host, where), _ports(str(data.get("ports", "*")), where))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        lo, hi = self.ports
        ports = "" if self.ports == ANY_PORT else f":{lo}" if lo == hi else f":{lo}-{hi}"
        return f"{self.action} {self.proto or 'any'} {host}{ports}"

    def matches(self, host: str, port: int | None = None, proto: str | int | None = None) -> bool:
        """Whether this rule covers a destination as a client names it (a host name or an
        IP literal); a None port or proto is not checked."""
        proto = normalize_proto(proto)
        if proto is not None and self.proto not in (None, proto):
            return False
        if port is not None and not self.ports[0] <= port <= self.ports[1]:
            return False
        ip = _literal(host)
        if ip is None:
            return self._host_matches(None, normalize_name(host))
        return self._host_matches(ip, None, _embedded(ip))

    def _host_matches(self, ip: IPAddress | None, name: str | None,
                      embedded: tuple[ipaddress.IPv4Address, ...] = ()) -> bool:
        """`embedded`: the IPv4s `ip` carries (`_embedded`), which meet IPv4 networks."""
        net = self.network
        if net is not None:
            if ip is None:
                return False
            if ip.version == net.version:  # (`in` would compare mixed versions as integers)
                return ip in net
            return bool(embedded) and all(v4 in net for v4 in embedded)
        if self.host == "*":
            return True
        return name is not None and _compiled(self.host).fullmatch(name) is not None


def _action(text: str, where: str) -> str:
    action = text.strip().lower()
    if action not in ("allow", "deny"):
        raise ValueError(f"{where}: action must be allow or deny, not {text!r}")
    return action


def _rule_proto(text: str, where: str) -> str | None:
    try:
        return normalize_proto(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _host(text: str, where: str) -> tuple[str, IPNetwork | None]:
    if text == "*":
        return "*", None
    try:
        net = ipaddress.ip_network(text)
    except ValueError as exc:
        if "/" in text or ":" in text:
            raise ValueError(f"{where}: {exc}") from None
    else:
        if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
            net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        return str(net.network_address if net.num_addresses == 1 else net), net
    name = normalize_name(text)
    if name is None or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{where}: {text!r} is not a host name pattern, address or CIDR")
    if _NUMERIC.fullmatch(name):  # `10.*` would silently never match an address
        raise ValueError(f"{where}: {text!r} looks like an address; write a CIDR (10.0.0.0/8)")
    return name, None


def _ports(text: str, where: str) -> tuple[int, int]:
    text = text.strip()
    if text == "*":
        return ANY_PORT
    low, dash, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if dash else low)
    except ValueError:
        raise ValueError(f"{where}: ports must be N, N-M or *, not {text!r}") from None
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"{where}: ports {text!r} must lie in 1-65535, low first")
    return lo, hi


def _target(text: str, where: str) -> tuple[str, IPNetwork | None, tuple[int, int]]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{where}: write an IPv6 target as [ADDRESS[/LEN]][:PORTS]")
        if ":" not in host:
            raise ValueError(f"{where}: brackets are for IPv6 addresses, not {host!r}")
        ports = rest[1:] if rest else "*"
    elif text.count(":") > 1:  # a bare IPv6 address or network, every port
        host, ports = text, "*"
    else:
        host, colon, ports = text.partition(":")
        ports = ports if colon else "*"
    if not host:
        raise ValueError(f"{where}: the host is empty ({_SYNTAX})")
    return (*_host(host, where), _ports(ports, where))


def _parse(action: str, words: list[str], where: str) -> Rule:
    if len(words) == 1 and words[0].lower() not in (*_PROTOS, "any"):
        return Rule(action, None, *_target(words[0], where))
    if len(words) == 2:
        return Rule(action, _rule_proto(words[0], where), *_target(words[1], where))
    raise ValueError(f"{where}: {_SYNTAX}")


def parse_rule(text: str) -> Rule:
    """Parse `ACTION [PROTO] TARGET`, e.g. `allow tcp db.internal:5432`; ValueError if bad."""
    where = f"rule {text.strip()!r}"
    words = text.split()
    if not words:
        raise ValueError(f"{where}: {_SYNTAX}")
    return _parse(_action(words[0], where), words[1:], where)


def parse_destination(text: str) -> Rule:
    """Parse `[PROTO] TARGET` (a rule without its action) as an allow rule, e.g. a token
    scope entry `udp *:53`."""
    return _parse("allow", text.split(), f"destination {text.strip()!r}")


def _uncovered(lo: int, hi: int, covered: list[tuple[int, int]]) -> bool:
    """Whether some port in lo..hi lies in none of the `covered` ranges."""
    for a, b in sorted(covered):
        if a > lo:
            return True
        lo = max(lo, b + 1)
        if lo > hi:
            return False
    return lo <= hi


RuleSource = Rule | str | Mapping[str, object]


def _as_rule(source: RuleSource) -> Rule:
    if isinstance(source, Rule):
        return source
    return parse_rule(source) if isinstance(source, str) else Rule.from_mapping(source)


class EgressPolicy:
    """An ordered rule list; see the module docstring for syntax and semantics.

    Every check takes `port` and `proto` (tcp, udp, any, a `Proto`); None for either
    (DnsQuery has neither) asks whether ANY port/protocol would be allowed.
    """

    def __init__(self, rules: Iterable[RuleSource] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(map(_as_rule, rules))
        self.default_allow = not any(r.action == "allow" for r in self.rules)
        self._literals: dict[tuple[str, int, str], tuple[IPAddress, Decision]] = {}

    def __repr__(self) -> str:
        return f"EgressPolicy({[str(r) for r in self.rules]!r})"

    def is_default(self) -> bool:
        """True for the permissive default: no rules (special addresses still denied)."""
        return not self.rules

    def check_name(self, name: str, port: int | None = None,
                   proto: str | int | None = None) -> Decision:
        """May a client ask for `name` at all (before resolving; DnsQuery)?

        Name rules and `*` decide; a CIDR `allow` admits the name pending its addresses.
        An IP literal is judged as `check_address` would.
        """
        ip = _literal(name)
        if ip is not None:
            return self.check_address(ip, port, proto)
        norm = normalize_name(name)
        if norm is None:
            return Decision(False, f"invalid host name {name!r}", INVALID_NAME)

        def host_match(rule: Rule) -> bool:
            if rule.network is not None:
                return rule.action == "allow"
            return rule._host_matches(None, norm)

        proto = normalize_proto(proto)
        return self._evaluate(host_match, port, proto, _dest(norm, port, proto), None)

    def check_literal(self, host: str, port: int, proto: str
                      ) -> tuple[IPAddress, Decision] | None:
        """An Open of IP literal `host`: `parse_literal`'s address and `check_address`'s
        decision; None for a name or a literal with a zone id. Remembered, up to
        `LITERALS_REMEMBERED`: applications open the same few addresses again and again,
        and the parse and check cost about as much as the rest of an Open's bookkeeping.
        A policy never changes (a reload makes a new one)."""
        key = (host, port, proto)
        known = self._literals.get(key)
        if known is not None:
            return known
        if "%" in host:
            return None  # a zone id: the caller resolves it (and it would grow the memo)
        address = parse_literal(host)
        if address is None:
            return None
        if len(self._literals) >= LITERALS_REMEMBERED:  # bounded whatever clients open
            self._literals.clear()
        known = self._literals[key] = (address, self.check_address(address, port, proto))
        return known

    def check_address(self, ip: str | bytes | IPAddress, port: int | None = None,
                      proto: str | int | None = None, name: str | None = None) -> Decision:
        """May the gateway use address `ip` (after resolving `name`, if given)?

        CIDR rules, `*`, and name rules for `name` apply; a special address needs a CIDR
        allow inside its special range. An IPv6 address embedding an IPv4 must pass as
        itself and its IPv4 must not be refused alone (module docstring). `ip`: text,
        4/16 raw bytes or an address.
        """
        addr = to_address(ip)
        norm = None if name is None or _literal(name) is not None else normalize_name(name)
        proto = normalize_proto(proto)
        embedded = _embedded(addr)
        decision = self._check(addr, embedded, port, proto, norm)
        if not decision.allowed:
            return decision
        for v4 in embedded:  # an IPv6 rule must not open a way to an IPv4 the rules refuse
            alone = self._check(v4, (), port, proto, norm, lenient=True)
            if not alone.allowed:
                return Decision(False, f"{alone.reason} (embedded in {addr})", alone.rule)
        return decision

    def _check(self, addr: IPAddress, embedded: tuple[ipaddress.IPv4Address, ...],
               port: int | None, proto: str | None, norm: str | None,
               lenient: bool = False) -> Decision:
        """`check_address` of one parsed address, without judging its embedded IPv4s alone."""
        special = _special(addr)

        def host_match(rule: Rule) -> bool:
            if special is not None and rule.action == "allow":
                net = rule.network
                return (net is not None and net.version == addr.version and addr in net
                        and _inside(net, special[0]))
            return rule._host_matches(addr, norm, embedded)

        dest = _dest(addr, port, proto) + (f" ({norm})" if norm else "")
        reason = None if special is None else f"{addr} is {special[1]}"
        return self._evaluate(host_match, port, proto, dest, reason, lenient,
                              None if special is None else special[1])

    def filter_dns(self, name: str, addresses: Iterable[Addr]) -> list[Addr]:
        """The DnsResult answers for `name` the rules allow, as given; empty → Refused."""
        if not self.rules:  # nothing to match: check_address would refuse the special only
            return [a for a in addresses if not _is_special(to_address(a))]
        return [a for a in addresses if self.check_address(a, None, None, name).allowed]

    def _evaluate(self, host_match: Callable[[Rule], bool], port: int | None,
                  proto: str | None, dest: str, special: str | None,
                  lenient: bool = False, what: str | None = None) -> Decision:
        """First match over the rules. `lenient`: no matching rule counts as allowed, as
        without allow rules, so only a refusal (special, or a deny first) denies.
        `special`: why the address is special (the reason), `what` it is (for the rule)."""
        if not self.rules:  # the default policy: what the loop below comes to without rules
            return (Decision(True, f"{dest} allowed by default (no allow rules)", DEFAULT_ALLOW)
                    if special is None else Decision(False, special, _special_rule(what)))
        # First match, generalised to unknown port/proto: allowed when some (proto, port)
        # of the query reaches an allow rule before every deny covering it.
        protos = _PROTOS if proto is None else (proto,)
        lo, hi = (1, 65535) if port is None else (port, port)  # port 0 is no destination
        denied: dict[str, list[tuple[int, int]]] = {p: [] for p in protos}
        first_deny: Rule | None = None
        for rule in self.rules:
            r_lo, r_hi = max(lo, rule.ports[0]), min(hi, rule.ports[1])
            hit = [p for p in protos if rule.proto in (None, p)]
            if r_lo > r_hi or not hit or not host_match(rule):
                continue
            if rule.action == "deny":
                for p in hit:
                    denied[p].append((r_lo, r_hi))
                first_deny = first_deny or rule
            elif any(_uncovered(r_lo, r_hi, denied[p]) for p in hit):
                text = str(rule)
                return Decision(True, f"{dest} allowed by rule '{text}'", text)
        if ((self.default_allow or lenient) and special is None
                and any(_uncovered(lo, hi, denied[p]) for p in protos)):
            return Decision(True, f"{dest} allowed by default (no allow rules)", DEFAULT_ALLOW)
        if first_deny is not None:
            text = str(first_deny)
            return Decision(False, f"{dest} denied by rule '{text}'", text)
        if special is not None:
            return Decision(False, special, _special_rule(what))
        return Decision(False, f"no rule allows {dest}", DEFAULT_DENY)


def _special_rule(what: str | None) -> str:
    return f"special address: {what}" if what else DEFAULT_DENY


def is_loopback_host(host: str) -> bool:
    """Whether a listen address is loopback only: 127.0.0.0/8, ::1 (or mapped), localhost."""
    if normalize_name(host) == "localhost":
        return True
    ip = _literal(host)
    return ip is not None and ip.is_loopback
