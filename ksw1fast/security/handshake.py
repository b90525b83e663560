"""Pure checks of the WebSocket upgrade request: where the token is, and whether the
Origin may connect (docs/protocol.md §9).

Token carriers, first found wins:

1. a `Sec-WebSocket-Protocol` offer `auth-<token>` (what browsers can send); the 101
   response MUST echo `TokenOffer.subprotocol` exactly, or the browser drops the socket;
2. `?token=<token>` in the URL query;
3. `Authorization: Bearer <token>` (non-browser clients).

An Origin is a serialized origin (RFC 6454): `scheme://host[:port]` or the opaque
`null`. Anything else (a path, query or fragment, userinfo, a backslash, spaces, an empty
host, a port that is not 1-65535 in plain digits) is not an origin and never allowed.
Origins are ASCII, as browsers send them (IDNA names in punycode). Schemes and hosts
compare case-insensitively (IPv6 literals in their compressed form); http's port 80 and
https' 443 equal an omitted port.

Origin patterns are origins (checked when the policy is made: ValueError if not) where
`*` may stand for the whole port, or in the host for one or more whole labels (`*` as
a label) or one or more characters within a label; it never matches an empty string,
a dot within a label, or anything outside the host. A Unicode host is IDNA-encoded and
a trailing `/` ignored::

    https://app.example.com      https://*.example.com      http://localhost:*

`https://*.example.com` matches `https://a.example.com` and `https://a.b.example.com`,
not `https://example.com`, `https://a.example.com:8443` or `http://a.example.com`.
The pattern `*` alone allows every Origin value and `null` the opaque origin. With no
patterns, only localhost-family origins pass: http(s)://localhost, 127.0.0.1 or [::1],
with any port or none. Requests without an Origin (non-browser clients, which could
send any Origin anyway) pass unless `allow_missing=False`; a request with more than one
Origin header is refused by the caller (`Security.admit`), whatever their values.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

SUBPROTOCOL_PREFIX = "auth-"
Headers = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]

_ANY_PORT = -1  # a pattern's `:*`
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_LABEL = "[a-z0-9_-]+"
_HOST = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_HOST_PATTERN = re.compile(r"[a-z0-9_*-]+(\.[a-z0-9_*-]+)*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")


@dataclass(frozen=True)
class TokenOffer:
    """A token found in the upgrade request. The repr hides the token."""

    token: str = field(repr=False)
    carrier: str                                         # "subprotocol", "query" or "bearer"
    subprotocol: str | None = field(default=None, repr=False)  # echo this in the 101


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def header_values(headers: Headers, name: str) -> list[str]:
    """Every value of header `name` (case-insensitive), repeated headers included;
    bytes are read as Latin-1."""
    getall = getattr(headers, "getall", None)
    if getall is not None:  # a case-insensitive multidict (picows' request headers)
        return [_text(v) for v in getall(name, ())]
    items = headers.items() if isinstance(headers, Mapping) else headers
    name = name.lower()
    return [_text(v) for k, v in items if _text(k).lower() == name]


def find_token(path: str | bytes, headers: Headers) -> TokenOffer | None:
    """The first token offered by the request (see the module docstring), or None.

    `headers` is a mapping (a multidict yields repeated headers) or (name, value) pairs.
    """
    for value in header_values(headers, "sec-websocket-protocol"):
        for offer in value.split(","):
            offer = offer.strip()
            if offer.startswith(SUBPROTOCOL_PREFIX) and len(offer) > len(SUBPROTOCOL_PREFIX):
                return TokenOffer(offer[len(SUBPROTOCOL_PREFIX):], "subprotocol", offer)
    for key, value in parse_qsl(urlsplit(_text(path)).query):
        if key == "token" and value:
            return TokenOffer(value, "query")
    for value in header_values(headers, "authorization"):
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return TokenOffer(credentials.strip(), "bearer")
    return None


@dataclass(frozen=True)
class Origin:
    """A serialized origin, normalised: lower-case scheme and host (an IPv6 literal
    compressed, in brackets), the scheme's default port as None. In a pattern the host
    may hold `*` (and be IDNA-encoded from Unicode) and the port be -1 for `:*`."""

    scheme: str
    host: str
    port: int | None = None

    @classmethod
    def parse(cls, text: str, pattern: bool = False) -> Origin:
        """`scheme://host[:port]`; `pattern` admits `*` (module docstring). ValueError
        saying what is wrong for anything else, "null" included."""
        # (not urlsplit: it drops tabs and newlines anywhere, and takes userinfo,
        # backslashes and paths, so it would need all these checks first anyway)
        scheme, sep, authority = text.partition("://")
        scheme = scheme.lower()
        if not sep or not _SCHEME.fullmatch(scheme):
            raise ValueError("it does not start with scheme://")
        if any(c in authority for c in "/?#"):
            raise ValueError("an origin has no path, query or fragment")
        if "@" in authority:
            raise ValueError("an origin has no user info")
        if authority.startswith("["):  # an IPv6 literal: its colons are not the port's
            inside, bracket, rest = authority.partition("]")
            host = inside + bracket
        else:
            cut = authority.find(":")
            host, rest = (authority, "") if cut < 0 else (authority[:cut], authority[cut:])
        if rest and not rest.startswith(":"):
            raise ValueError(f"{rest!r} follows the host")
        port = _port(rest[1:], scheme, pattern) if rest else None
        return cls(scheme, _host(host, pattern), port)


def _host(text: str, pattern: bool) -> str:
    if text.startswith("[") and text.endswith("]") and "%" not in text:
        try:
            return f"[{ipaddress.IPv6Address(text[1:-1])}]"
        except ValueError:
            raise ValueError(f"{text!r} is not an IPv6 address") from None
    if not text.isascii():  # browsers send IDNA (punycode); a pattern may be Unicode
        if not pattern:
            raise ValueError(f"host {text!r} is not ASCII")
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"host {text!r} is not a valid name") from None
    name = text.lower()
    if not name:
        raise ValueError("the host is empty")
    if not (_HOST_PATTERN if pattern else _HOST).fullmatch(name):
        raise ValueError(f"host {text!r} is not a name or an address")
    return name


def _port(text: str, scheme: str, pattern: bool) -> int | None:
    if pattern and text == "*":
        return _ANY_PORT
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ValueError(f"port {text!r} is not 1-65535" + (" or *" if pattern else ""))
    port = int(text)
    return None if port == _DEFAULT_PORTS.get(scheme) else port


def parse_origin(text: str) -> Origin | None:
    """The origin an Origin header value names; None for "null" and anything invalid."""
    try:
        return Origin.parse(text)
    except ValueError:
        return None


class OriginPattern:
    """One `--allow-origin` pattern other than `*` and `null` (module docstring)."""

    def __init__(self, text: str) -> None:
        bare = text[:-1] if text.endswith("/") and not text.endswith("://") else text
        try:
            self.origin = Origin.parse(bare, pattern=True)
        except ValueError as exc:
            raise ValueError(f"origin pattern {text!r}: {exc} (write scheme://host[:port] with "
                             "`*` for the port or in the host, or `*`, or `null`)") from None
        self._host = re.compile(r"\.".join(map(_label_regex, self.origin.host.split("."))))

    def matches(self, origin: Origin) -> bool:
        want = self.origin
        return (origin.scheme == want.scheme and want.port in (_ANY_PORT, origin.port)
                and self._host.fullmatch(origin.host) is not None)


def _label_regex(label: str) -> str:
    if label == "*":  # one or more whole labels
        return rf"{_LABEL}(\.{_LABEL})*"
    return _LABEL.join(map(re.escape, label.split("*")))  # a `*` within one label


_LOCAL_PATTERNS = tuple(OriginPattern(f"{scheme}://{host}:*") for scheme in ("http", "https")
                        for host in ("localhost", "127.0.0.1", "[::1]"))


class OriginPolicy:
    """Which browser origins may open a WebSocket (defends against cross-site WebSocket
    hijacking); see the module docstring for the pattern syntax and the default.
    ValueError for a pattern that is not one."""

    def __init__(self, patterns: Iterable[str] = (), allow_missing: bool = True) -> None:
        self.patterns = tuple(p.strip() for p in patterns if p.strip())
        self.allow_missing = allow_missing
        self.allow_any = "*" in self.patterns
        self.allow_null = "null" in (p.lower() for p in self.patterns)
        self._patterns = (tuple(OriginPattern(p) for p in self.patterns
                                if p != "*" and p.lower() != "null")
                          if self.patterns else _LOCAL_PATTERNS)

    def __repr__(self) -> str:
        return f"OriginPolicy({list(self.patterns)!r}, allow_missing={self.allow_missing})"

    def allowed(self, origin: str | None) -> bool:
        """Whether one Origin header value (None: no header) may connect."""
        origin = None if origin is None else origin.strip(" \t")  # (optional whitespace)
        if not origin:
            return self.allow_missing
        if self.allow_any:
            return True
        if origin == "null":
            return self.allow_null
        parsed = parse_origin(origin)
        return parsed is not None and any(p.matches(parsed) for p in self._patterns)
