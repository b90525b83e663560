"""Tokens: static file (plain and sha256 lines), signed tokens, expiry, scope, no leaks."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import string
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from ksw1fast.protocol.errors import AuthError
from ksw1fast.security.tokens import (Grant, TokenVerifier, issue_token, parse_duration,
                                      secret_from_env)
from ksw1fast.protocol.constants import DnsErrCode, OpenErrCode, Pkcs11Status
from ksw1fast.security.egress import parse_destination

SECRET = b"test-secret-0123456789"
NOW = 1_700_000_000.0
TCHAR = set(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


def kind_of(verifier: TokenVerifier, token: str | bytes | None, now: float = NOW) -> str:
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now=now)
    return info.value.kind


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# gateway tokens\n\n  plain-token-1  \n"
                    f"sha256:{hashlib.sha256(b'hashed-token-2').hexdigest()}\n"
                    f"SHA256:{hashlib.sha256(b'upper').hexdigest().upper()}\n"
                    "#commented-out\n")
    return path


# --- static file ----------------------------------------------------------------------

def test_static_file_plain_and_sha256_lines(token_file: Path) -> None:
    verifier = TokenVerifier(static_file=token_file)
    assert verifier.enabled
    for token in ("plain-token-1", b"plain-token-1", "hashed-token-2", "upper"):
        grant = verifier.verify(token)
        assert grant.kind == "static" and grant.expires_at is None
    for token in ("plain-token-2", "plain-token-1 ", "#commented-out", "# gateway tokens",
                  hashlib.sha256(b"hashed-token-2").hexdigest(), "ksw1.x.y"):
        assert kind_of(verifier, token) == "invalid"


def test_static_grant_allows_everything_the_policy_allows(token_file: Path) -> None:
    grant = TokenVerifier(static_file=token_file).verify("plain-token-1")
    assert grant.allows_open("anything.example", 1, "tcp")
    assert grant.allows_open("10.0.0.1", 65535, "udp")
    assert grant.allows_dns("x.example") and grant.allows_pkcs11 and grant.allows_udp
    assert not grant.expired()
    with pytest.raises(ValueError):  # not a protocol, whatever the grant allows
        grant.allows_open("10.0.0.1", 1, "sctp")


def test_bad_sha256_line_names_the_line_not_its_content(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("ok\nsha256:not-hex-my-secret\n")
    with pytest.raises(ValueError, match=r"tokens:2: sha256: needs 64 hex digits") as info:
        TokenVerifier(static_file=path)
    assert "my-secret" not in str(info.value)


def test_empty_static_file_enables_auth_and_refuses_all(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# nobody yet\n")
    verifier = TokenVerifier(static_file=path)
    assert verifier.enabled and kind_of(verifier, "anything") == "invalid"


# --- auth off, missing tokens ---------------------------------------------------------

def test_no_source_means_auth_off() -> None:
    verifier = TokenVerifier()
    assert not verifier.enabled
    for token in (None, "", "whatever"):
        grant = verifier.verify(token)
        assert grant.kind == "none" and grant.scope is None and grant.allows_open("x", 1, "udp")


@pytest.mark.parametrize("token", [None, "", b""])
def test_missing_token(token: str | bytes | None) -> None:
    assert kind_of(TokenVerifier(secret=SECRET), token) == "missing"


def test_error_mapping() -> None:
    missing, invalid, expired = AuthError("missing"), AuthError("invalid"), AuthError("expired")
    assert (missing.http_status, invalid.http_status, expired.http_status) == (401, 403, 403)
    assert missing.open_err is OpenErrCode.AUTH_REQUIRED
    assert invalid.open_err is expired.open_err is OpenErrCode.AUTH_FAILED
    assert missing.dns_err is DnsErrCode.REFUSED
    assert expired.pkcs11_status is Pkcs11Status.AUTH_DENIED
    assert str(expired) == "token expired"


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="secret is empty"):
        TokenVerifier(secret=b"")
    with pytest.raises(ValueError, match="secret is empty"):
        issue_token(b"", 60, ["x:1"])


# --- signed tokens --------------------------------------------------------------------

def test_signed_round_trip_and_scope() -> None:
    token = issue_token(SECRET, 3600, ["tcp db.internal:5432", "*.svc.internal:8000-8999",
                                       "10.0.0.0/8:443", "udp *:53"],
                        udp=True, dns=True, now=NOW)
    assert token.startswith("ksw1.") and token.count(".") == 2
    grant = TokenVerifier(secret=SECRET).verify(token, now=NOW)
    assert grant.kind == "signed" and grant.expires_at == NOW + 3600
    assert grant.allows_udp and not grant.allows_pkcs11
    assert grant.allows_open("db.internal", 5432, "tcp")
    assert grant.allows_open("DB.Internal.", 5432, "tcp")
    assert not grant.allows_open("db.internal", 5432, "udp")
    assert not grant.allows_open("db.internal", 5433, "tcp")
    assert grant.allows_open("a.svc.internal", 8080, "tcp")
    assert grant.allows_open("10.2.3.4", 443, "tcp")
    assert not grant.allows_open("db.internal", 443, "tcp")  # CIDR scope: literals only
    assert grant.allows_open("ns.example", 53, "udp")
    assert not grant.allows_open("ns.example", 53, "tcp")
    assert grant.allows_dns("db.internal") and grant.allows_dns("x.svc.internal")
    assert grant.allows_dns("anything.example")  # `udp *:53` covers every name


def test_signed_flags_default_off() -> None:
    grant = TokenVerifier(secret=SECRET).verify(issue_token(SECRET, 60, ["db.internal:5432"],
                                                            now=NOW), now=NOW)
    assert not grant.allows_udp and not grant.allows_pkcs11
    assert not grant.allows_dns("db.internal")
    assert not grant.allows_open("db.internal", 5432, "udp")  # proto any, but no UDP flag
    dns = TokenVerifier(secret=SECRET).verify(issue_token(SECRET, 60, ["db.internal:5432"],
                                                          dns=True, now=NOW), now=NOW)
    assert dns.allows_dns("db.internal") and not dns.allows_dns("other.internal")
    pkcs11 = TokenVerifier(secret=SECRET).verify(issue_token(SECRET, 60, [], pkcs11=True,
                                                             now=NOW), now=NOW)
    assert pkcs11.allows_pkcs11 and not pkcs11.allows_open("x", 1, "tcp")


def test_issue_rejects_bad_scope() -> None:
    with pytest.raises(ValueError, match="destination 'udp \\*:53' is UDP"):
        issue_token(SECRET, 60, ["udp *:53"])
    with pytest.raises(ValueError, match="ports"):
        issue_token(SECRET, 60, ["db.internal:99999"])
    with pytest.raises(ValueError, match="positive"):
        issue_token(SECRET, 0, ["db.internal:1"])


def test_expiry_with_skew() -> None:
    token = issue_token(SECRET, 60, ["x:1"], now=NOW)
    verifier = TokenVerifier(secret=SECRET)  # 30 s skew
    assert verifier.verify(token, now=NOW + 60 + 30).kind == "signed"
    assert kind_of(verifier, token, now=NOW + 60 + 30.5) == "expired"
    strict = TokenVerifier(secret=SECRET, skew=0)
    assert strict.verify(token, now=NOW + 60).kind == "signed"
    assert kind_of(strict, token, now=NOW + 60.5) == "expired"
    grant = verifier.verify(token, now=NOW)
    assert not grant.expired(NOW + 90) and grant.expired(NOW + 91)


def test_wrong_secret_is_invalid_not_expired() -> None:
    token = issue_token(SECRET, 60, ["x:1"], now=NOW)
    assert kind_of(TokenVerifier(secret=b"other"), token) == "invalid"
    assert kind_of(TokenVerifier(secret=b"other"), token, now=NOW + 10**6) == "invalid"


def _tamper_payload(token: str, **changes: object) -> str:
    prefix, payload, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    raw = json.dumps(claims, separators=(",", ":")).encode()
    return f"{prefix}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{mac}"


def test_tampering_is_invalid() -> None:
    token = issue_token(SECRET, 60, ["db.internal:5432"], now=NOW)
    verifier = TokenVerifier(secret=SECRET)
    prefix, payload, mac = token.split(".")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    for bad in (_tamper_payload(token, exp=NOW + 10**6), _tamper_payload(token, allow=["*"]),
                _tamper_payload(token, pkcs11=True), f"{prefix}.{payload}.{flipped}",
                f"{prefix}.{payload}.", f"{prefix}.{payload}", f"{token}.x", f"{token}=",
                f"{prefix}.{payload}.{mac}==", f"{prefix}.{payload}.{mac[:-1]}",
                f"{prefix}.{payload}.{mac[:-1]}*", f"{prefix}.{payload}x.{mac}",
                "ksw1..", "ksw1.é.é", "ksw1.\x00.\x00", token.encode() + b"\xff"):
        assert kind_of(verifier, bad) == "invalid", bad


def test_signed_correctly_but_malformed_claims_are_invalid() -> None:
    verifier = TokenVerifier(secret=SECRET)
    for claims in (b"[]", b"{}", b'{"exp":"soon"}', b'{"exp":true}',
                   b'{"exp":9999999999,"allow":"x"}', b'{"exp":9999999999,"allow":["x:0"]}',
                   b'{"exp":9999999999,"udp":1}', b"not json"):
        payload = base64.urlsafe_b64encode(claims).rstrip(b"=").decode()
        mac = hmac.new(SECRET, f"ksw1.{payload}".encode(), hashlib.sha256).digest()
        token = f"ksw1.{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
        assert kind_of(verifier, token) == "invalid", claims


def test_static_and_signed_together(token_file: Path) -> None:
    verifier = TokenVerifier(static_file=token_file, secret=SECRET)
    assert verifier.verify("plain-token-1").kind == "static"
    assert verifier.verify(issue_token(SECRET, 60, ["x:1"], now=NOW), now=NOW).kind == "signed"
    assert kind_of(verifier, "nope") == "invalid"


def test_nothing_secret_in_reprs_or_errors() -> None:
    token = issue_token(SECRET, 60, ["db.internal:5432"], dns=True, now=NOW)
    verifier = TokenVerifier(secret=SECRET)
    grant = verifier.verify(token, now=NOW)
    texts = [repr(grant), str(grant), repr(verifier)]
    for bad, now in ((token + "x", NOW), (token, NOW + 3600)):
        with pytest.raises(AuthError) as info:
            verifier.verify(bad, now=now)
        texts += [str(info.value), repr(info.value)]
    for text in texts:
        assert token.split(".")[2] not in text and SECRET.decode() not in text, text


@given(st.lists(st.tuples(st.sampled_from(["", "tcp ", "any "]),
                          st.from_regex(r"(\*|[a-z]{1,8})(\.[a-z]{1,8}){0,3}", fullmatch=True),
                          st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))),
                max_size=5),
       st.booleans(), st.booleans(), st.booleans(), st.floats(1, 10**7),
       st.binary(min_size=1, max_size=64))
def test_signed_round_trip_over_random_scopes(entries: list, udp: bool, dns: bool, pkcs11: bool,
                                              ttl: float, secret: bytes) -> None:
    allow = [f"{proto}{host}{port}" for proto, host, port in entries]
    token = issue_token(secret, ttl, allow, udp=udp, dns=dns, pkcs11=pkcs11, now=NOW)
    assert set(token) <= TCHAR and "=" not in token
    assert re.fullmatch(r"ksw1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}", token)
    grant = TokenVerifier(secret=secret).verify(token, now=NOW + ttl)
    assert grant.expires_at is not None and grant.expires_at >= NOW + ttl
    assert (grant.allows_udp, grant.dns, grant.allows_pkcs11) == (udp, dns, pkcs11)
    assert [str(rule) for rule in grant.scope or ()] == \
        [str(parse_destination(e)) for e in allow]
    for _, host, port in entries:
        if "*" not in host:
            assert grant.allows_open(host, int(port[1:]) if port else 80, "tcp")
    assert kind_of(TokenVerifier(secret=secret + b"x"), token) == "invalid"


# --- durations and secrets ------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("1h", 3600),
                                           ("2d", 172800), ("1h30m", 5400), ("1.5h", 5400),
                                           ("45", 45), (" 2H ", 7200)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1w", "-5", "1h-", "inf", "nan", "1 h", "5m1"])
def test_parse_duration_errors(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_secret_from_env() -> None:
    assert secret_from_env("S", {"S": "abc"}) == b"abc"
    for env in ({}, {"S": ""}):
        with pytest.raises(ValueError, match="environment variable S .*not set or empty"):
            secret_from_env("S", env)


def test_grant_scope_none_is_unrestricted() -> None:
    assert Grant("static").allows_open("169.254.169.254", 80)  # the egress policy decides


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.text(alphabet="ksw1.AZaz09-_=", max_size=120).map(lambda t: "ksw1." + t)))
def test_garbage_tokens_only_ever_raise_auth_error(token: str | bytes) -> None:
    verifier = TokenVerifier(secret=SECRET)
    with pytest.raises(AuthError):
        verifier.verify(token, now=NOW)
