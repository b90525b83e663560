"""Access tokens (docs/protocol.md §9): a static token file and HMAC-signed, scoped,
expiring tokens.

Static token file, one entry a line; blank lines and lines starting with `#` are ignored::

    # plain token (the file then holds a secret: keep it private)
    correct-horse-battery-staple
    # or the SHA-256 of the token in hex, so the file holds no secret
    sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8

A static token allows everything the egress policy allows.

Signed token: ``ksw1.<payload>.<mac>``, both parts unpadded base64url, the MAC
HMAC-SHA256(secret, "ksw1." + payload) and the payload compact JSON::

    {"exp": 1767225600, "allow": ["db.internal:5432", "udp *:53"], "dns": true}

`exp` is Unix seconds; `allow` lists destinations in the policy rule syntax without the
action (`[tcp|udp|any] HOST[:PORTS]`); `udp`, `dns`, `pkcs11` are flags, absent = false;
`pkcs11` may instead be an object that limits PKCS#11 to certain slots, tokens,
functions, mechanisms and keys (ksw1fast.pkcs11.scope).
Only RFC 7230 tchar characters appear, so `auth-<token>` is a valid WebSocket
subprotocol. No token or secret ever appears in an exception message or a repr.

JSON Web Tokens (ksw1fast.security.jwt_tokens) are recognised by their shape, three
base64url parts joined by dots (also tchar only), and tried only when a JWT key source
is configured; their `ksw1` claim holds the same scope as a signed token's payload.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from ksw1fast.ops.logs import Throttled
from ksw1fast.pkcs11.scope import Pkcs11Scope, parse_claim
from ksw1fast.protocol.errors import AuthError
from ksw1fast.security.egress import Rule, normalize_proto, parse_destination

if TYPE_CHECKING:
    from ksw1fast.security.jwt_tokens import JwtVerifier

PREFIX = "ksw1"
DEFAULT_SECRET_ENV = "KSW1FAST_TOKEN_SECRET"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_HEX64 = re.compile(rb"[0-9a-fA-F]{64}")
# a JWS compact serialization: header.payload.signature (an unsigned `alg: none` token has
# an empty signature: it is taken for a JWT, and refused as one)
_JWT_SHAPE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
SCOPE_FLAGS = ("udp", "dns", "pkcs11")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_refused = Throttled(logging.getLogger("ksw1fast"))  # tokens whose scope does not parse


@dataclass(frozen=True)
class Grant:
    """What a verified token allows. Holds no token, so its repr is safe to log.

    `scope` None means everything the egress policy allows (static tokens, JWTs without
    a `ksw1` claim, auth off); otherwise only these destinations. `dns` says whether
    DnsQuery is allowed at all. A JWT's grant names whom it was issued to (`sub`) and the
    token's id (`jti`), when it has them, for the audit trail.
    """

    kind: str                          # "static", "signed", "jwt" or "none" (auth off)
    expires_at: float | None = None    # Unix seconds, None = never
    scope: tuple[Rule, ...] | None = None
    allows_udp: bool = True
    allows_pkcs11: bool = True
    dns: bool = True
    skew: float = 0.0
    subject: str | None = None         # a JWT's `sub`
    token_id: str | None = None        # a JWT's `jti`
    pkcs11_scope: Pkcs11Scope | None = None  # limits within allows_pkcs11; None = none

    def allows_open(self, host: str, port: int, proto: str | int = "tcp") -> bool:
        """May an Open go to `host` (a name or IP literal, as the client sent it)?

        A CIDR scope entry admits IP literals only; a name entry the names it matches.
        The egress policy is checked separately and still applies.
        """
        # ("tcp", what every Open but UDP's passes, needs no normalizing: per Open)
        if proto != "tcp" and normalize_proto(proto) == "udp" and not self.allows_udp:
            return False
        return self.scope is None or any(r.matches(host, port, proto) for r in self.scope)

    def allows_dns(self, name: str) -> bool:
        """May a DnsQuery ask for `name`? Signed tokens: only names their scope covers."""
        return self.dns and (self.scope is None or any(r.matches(name) for r in self.scope))

    def expired(self, now: float | None = None) -> bool:
        """Whether the token has expired by `now`: a long-lived connection re-checks its
        grant before each Open, DnsQuery and Pkcs11Request."""
        now = time.time() if now is None else now
        return self.expires_at is not None and now > self.expires_at + self.skew


_UNRESTRICTED = Grant("none")  # auth off: one shared grant, not one per connection


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> bytes:
    return hmac.new(secret, f"{PREFIX}.{payload}".encode("ascii"), hashlib.sha256).digest()


def parse_duration(text: str) -> float:
    """Seconds in `90s`, `30m`, `1h`, `2d`, `1h30m`, `1.5h` or a bare number of seconds."""
    text = text.strip().lower()
    try:
        seconds = float(text) if text and text[-1].isdigit() else _sum_parts(text)
        if not 0 <= seconds < math.inf:
            raise ValueError(text)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 30m, 1h, 2d or 1h30m") from None
    return seconds


def _sum_parts(text: str) -> float:
    if not text or not re.fullmatch(f"(?:{_DURATION_PART.pattern})+", text):
        raise ValueError(text)
    return sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))


def secret_from_env(var: str, environ: Mapping[str, str] | None = None,
                    what: str = "the token secret") -> bytes:
    """A secret (by default the signing secret): the UTF-8 bytes of environment variable
    `var`, which must be set."""
    value = (os.environ if environ is None else environ).get(var)
    if not value:
        raise ValueError(f"environment variable {var} ({what}) is not set or empty")
    return value.encode("utf-8")


def issue_token(secret: bytes, ttl: float, allow: Iterable[str], udp: bool = False,
                dns: bool = False, pkcs11: bool | Mapping[str, object] = False,
                now: float | None = None) -> str:
    """A signed token valid for `ttl` seconds from `now` for the `allow` destinations.

    Each `allow` entry is `[tcp|udp|any] HOST[:PORTS]`; `pkcs11` a flag or a PKCS#11
    scope object (ksw1fast.pkcs11.scope). ValueError for a bad entry or scope, an
    explicit udp entry without `udp=True`, an empty secret or a non-positive ttl.
    """
    if not secret:
        raise ValueError("the token secret is empty")
    if not ttl > 0:
        raise ValueError("the token lifetime must be positive")
    entries = [entry.strip() for entry in allow]
    for entry in entries:
        if parse_destination(entry).proto == "udp" and not udp:
            raise ValueError(f"destination {entry!r} is UDP but UDP is not allowed")
    allowed, scope = parse_claim(dict(pkcs11) if isinstance(pkcs11, Mapping) else pkcs11)
    now = time.time() if now is None else now
    claims: dict[str, object] = {"exp": math.ceil(now + ttl), "allow": entries}
    flags = {"udp": udp, "dns": dns, "pkcs11": allowed}
    claims.update((flag, True) for flag, on in flags.items() if on)
    if scope is not None:
        claims["pkcs11"] = scope.to_json()
    payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    return f"{PREFIX}.{payload}.{_b64encode(_mac(secret, payload))}"


def _load_digests(path: str | os.PathLike[str]) -> tuple[bytes, ...]:
    digests = []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if line[:7].lower() == b"sha256:":
            if not _HEX64.fullmatch(line[7:]):
                raise ValueError(f"{path}:{number}: sha256: needs 64 hex digits")
            digests.append(bytes.fromhex(line[7:].decode("ascii")))
        else:
            digests.append(hashlib.sha256(line).digest())
    return tuple(digests)


class TokenVerifier:
    """Checks presented tokens against a static file, a signing secret and/or JWT keys.

    With none configured auth is off: `enabled` is False and `verify` grants all.
    """

    def __init__(self, static_file: str | os.PathLike[str] | None = None,
                 secret: bytes | None = None, skew: float = 30.0,
                 jwt: JwtVerifier | None = None) -> None:
        if secret is not None and not secret:
            raise ValueError("the token secret is empty")
        self._digests = None if static_file is None else _load_digests(static_file)
        self._secret = secret
        self._jwt = jwt
        self.skew = skew

    @property
    def enabled(self) -> bool:
        return self._digests is not None or self._secret is not None or self._jwt is not None

    def __repr__(self) -> str:
        return (f"TokenVerifier(static={self._digests is not None}, "
                f"signed={self._secret is not None}, jwt={self._jwt is not None}, "
                f"skew={self.skew})")

    def verify(self, token: str | bytes | None, now: float | None = None) -> Grant:
        """The Grant of `token`, or AuthError("missing" | "invalid" | "expired")."""
        if not self.enabled:
            return _UNRESTRICTED
        if not token:
            raise AuthError("missing")
        try:
            raw = token if isinstance(token, bytes) else token.encode("utf-8")
        except UnicodeError:
            raise AuthError("invalid") from None
        if self._digests is not None and self._matches_static(raw):
            return Grant("static")
        if self._secret is not None and raw.startswith(PREFIX.encode() + b"."):
            return self._verify_signed(raw, time.time() if now is None else now)
        if self._jwt is not None and _JWT_SHAPE.fullmatch(raw):
            return self._jwt.verify(raw.decode("ascii"), time.time() if now is None else now)
        raise AuthError("invalid")

    def _matches_static(self, raw: bytes) -> bool:
        # compare against every digest: the time taken says nothing about which matched
        presented = hashlib.sha256(raw).digest()
        found = False
        for digest in self._digests or ():
            found |= hmac.compare_digest(presented, digest)
        return found

    def _verify_signed(self, raw: bytes, now: float) -> Grant:
        assert self._secret is not None
        parts = raw.split(b".")
        if len(parts) != 3 or not all(_B64URL.fullmatch(p.decode("latin-1")) for p in parts[1:]):
            raise AuthError("invalid")
        payload, mac = parts[1].decode("ascii"), parts[2].decode("ascii")
        try:
            given = _b64decode(mac)
        except binascii.Error:
            raise AuthError("invalid") from None
        if not hmac.compare_digest(given, _mac(self._secret, payload)):
            raise AuthError("invalid")
        try:
            grant = _grant(json.loads(_b64decode(payload)), self.skew)
        except (ValueError, TypeError, KeyError, binascii.Error):  # signed, but not by us
            raise AuthError("invalid") from None
        if grant.expired(now):
            raise AuthError("expired")
        return grant


def parse_scope(claims: Mapping[str, object]) -> tuple[tuple[Rule, ...], dict[str, bool]]:
    """The scope in a signed token's payload or a JWT's `ksw1` claim: its `allow` entries
    parsed (absent = none) and its flags (`udp`, `dns`, `pkcs11`; absent = false; a
    `pkcs11` object, which parse_pkcs11 reads, counts as true). ValueError when malformed."""
    allow = claims.get("allow", [])
    flags = {flag: claims.get(flag, False) for flag in SCOPE_FLAGS}
    if isinstance(flags["pkcs11"], dict):
        flags["pkcs11"] = True
    if (not isinstance(allow, list) or not all(isinstance(e, str) for e in allow)
            or not all(isinstance(v, bool) for v in flags.values())):
        raise ValueError("malformed scope")
    return tuple(parse_destination(e) for e in allow), {k: bool(v) for k, v in flags.items()}


def scoped_grant(kind: str, scope: Mapping[str, object] | None, expires_at: float | None,
                 skew: float, subject: str | None = None,
                 token_id: str | None = None) -> Grant:
    """The Grant of a token with `scope` (parse_scope's input; None = no scope limits);
    ValueError when the scope is malformed."""
    if scope is None:
        return Grant(kind, expires_at, skew=skew, subject=subject, token_id=token_id)
    rules, flags = parse_scope(scope)
    return Grant(kind, expires_at, rules, allows_udp=flags["udp"],
                 allows_pkcs11=flags["pkcs11"], dns=flags["dns"], skew=skew,
                 subject=subject, token_id=token_id,
                 pkcs11_scope=parse_pkcs11(kind, scope))


def parse_pkcs11(kind: str, scope: Mapping[str, object]) -> Pkcs11Scope | None:
    """The PKCS#11 scope object in a token's scope, None when `pkcs11` is a flag.
    ValueError, logged with what is wrong (an unknown function or mechanism name...),
    when malformed: such a token is refused, not taken for a wider one."""
    try:
        return parse_claim(scope.get("pkcs11", False))[1]
    except ValueError as exc:  # the message names the scope's fault, never the token
        _refused.info("%s token refused: %s", kind, exc)
        raise


def _grant(claims: object, skew: float) -> Grant:
    if not isinstance(claims, dict):
        raise ValueError("malformed claims")
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        raise ValueError("malformed claims")
    return scoped_grant("signed", claims, float(exp), skew)
