"""Pure checks of the WebSocket upgrade request: where the token is, and whether the
Origin may connect (spec §9).

Token carriers, first found wins:

1. a `Sec-WebSocket-Protocol` offer `auth-<token>` (what browsers can send); the 101
   response MUST echo `TokenOffer.subprotocol` exactly, or the browser drops the socket;
2. `?token=<token>` in the URL query;
3. `Authorization: Bearer <token>` (non-browser clients).

Origin patterns match the whole origin, case-insensitively, with `*` standing for any
run of characters other than `/`, `:` and `@` (so it stays within a host or a port)::

    https://app.example.com      https://*.example.com      http://localhost:*

The pattern `*` alone allows every origin and `null` the opaque origin "null". With no
patterns, only localhost-family origins pass: http(s)://localhost, 127.0.0.1 or [::1],
with any port or none. Requests without an Origin (non-browser clients, which could
send any Origin anyway) pass unless `allow_missing=False`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

from ksw1fast.policy import compile_wildcard

SUBPROTOCOL_PREFIX = "auth-"
Headers = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]

_LOCAL_ORIGIN = re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]+)?")


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


class OriginPolicy:
    """Which browser origins may open a WebSocket (defends against cross-site WebSocket
    hijacking); see the module docstring for the pattern syntax and the default."""

    def __init__(self, patterns: Iterable[str] = (), allow_missing: bool = True) -> None:
        self.patterns = tuple(p.strip().lower().rstrip("/") for p in patterns if p.strip())
        self.allow_missing = allow_missing
        self._regexes = ([compile_wildcard(p, star="[^/:@]*") for p in self.patterns]
                         if self.patterns else [_LOCAL_ORIGIN])

    def __repr__(self) -> str:
        return f"OriginPolicy({list(self.patterns)!r}, allow_missing={self.allow_missing})"

    def allowed(self, origin: str | None) -> bool:
        if origin is None or not origin.strip():
            return self.allow_missing
        if "*" in self.patterns:
            return True
        origin = origin.strip().lower()
        return any(regex.fullmatch(origin) for regex in self._regexes)
