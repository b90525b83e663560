"""Upgrade request checks: token carriers and their priority, the subprotocol echo, Origin."""
from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, strategies as st
from multidict import CIMultiDict

from ksw1fast.security.handshake import (Origin, OriginPolicy, TokenOffer, find_token, header_values,
                                parse_origin)


# --- token carriers -------------------------------------------------------------------

def test_subprotocol_offer_and_the_exact_string_to_echo() -> None:
    offer = find_token("/ws", {"Sec-WebSocket-Protocol": "ksw1, auth-abc.DEF_1-2 ,other"})
    assert offer == TokenOffer("abc.DEF_1-2", "subprotocol", "auth-abc.DEF_1-2")
    offer = find_token("/ws", {"sec-websocket-protocol": "auth-xyz, ksw1"})
    assert offer is not None and offer.subprotocol == "auth-xyz"


def test_repeated_headers_as_pairs_and_multidict() -> None:
    pairs = [("Sec-WebSocket-Protocol", "ksw1"), ("Sec-WebSocket-Protocol", "auth-second")]
    assert find_token("/ws", pairs) == TokenOffer("second", "subprotocol", "auth-second")
    multi = CIMultiDict(pairs)
    assert find_token("/ws", multi) == TokenOffer("second", "subprotocol", "auth-second")
    raw = [(b"SEC-WEBSOCKET-PROTOCOL", b"auth-bytes")]
    assert find_token(b"/ws", raw) == TokenOffer("bytes", "subprotocol", "auth-bytes")
    assert header_values(multi, "SEC-websocket-protocol") == ["ksw1", "auth-second"]


def test_first_auth_offer_wins_and_empty_ones_are_skipped() -> None:
    offer = find_token("/ws", {"Sec-WebSocket-Protocol": "auth-, auth-one, auth-two"})
    assert offer is not None and offer.token == "one"
    assert find_token("/ws", {"Sec-WebSocket-Protocol": "Auth-upper, ksw1"}) is None


def test_query_token() -> None:
    assert find_token("/ws?token=abc", {}) == TokenOffer("abc", "query")
    assert find_token("/ws?x=1&token=a%2Bb%3D&token=second", {}) == TokenOffer("a+b=", "query")
    assert find_token("/ws?token=&x=1", {}) is None
    assert find_token("/ws?tokens=abc", {}) is None


def test_bearer_token() -> None:
    assert find_token("/ws", {"Authorization": "Bearer  abc "}) == TokenOffer("abc", "bearer")
    assert find_token("/ws", {"authorization": "bearer abc"}) == TokenOffer("abc", "bearer")
    assert find_token("/ws", {"Authorization": "Basic dXNlcjpwYXNz"}) is None
    assert find_token("/ws", {"Authorization": "Bearer"}) is None
    pairs = [("Authorization", "Basic x"), ("Authorization", "Bearer later")]
    assert find_token("/ws", pairs) == TokenOffer("later", "bearer")


def test_priority_subprotocol_then_query_then_bearer() -> None:
    all_three = {"Sec-WebSocket-Protocol": "auth-sub", "Authorization": "Bearer bear"}
    assert find_token("/ws?token=query", all_three) == TokenOffer("sub", "subprotocol", "auth-sub")
    no_sub = {"Sec-WebSocket-Protocol": "ksw1", "Authorization": "Bearer bear"}
    assert find_token("/ws?token=query", no_sub) == TokenOffer("query", "query")
    assert find_token("/ws", no_sub) == TokenOffer("bear", "bearer")
    assert find_token("/ws", {"Host": "x"}) is None


def test_offer_repr_hides_the_token() -> None:
    offer = find_token("/ws", {"Sec-WebSocket-Protocol": "auth-s3cr3t"})
    assert "s3cr3t" not in repr(offer) and "subprotocol" in repr(offer)


# --- Origin ---------------------------------------------------------------------------

@pytest.mark.parametrize("origin", [
    None, "", "http://localhost", "https://localhost", "http://localhost:5173",
    "HTTP://LocalHost:8080", "http://127.0.0.1", "https://127.0.0.1:443", "http://[::1]",
    "http://[::1]:3000", "http://[0:0::1]:3000", " http://localhost\t",
])
def test_default_allows_missing_and_localhost_family(origin: str | None) -> None:
    assert OriginPolicy().allowed(origin)


@pytest.mark.parametrize("origin", [
    "null", "https://example.com", "http://localhost.evil.com", "http://evil.com#localhost",
    "http://localhost:80.evil.com", "ws://localhost", "file://", "http://127.0.0.2",
    "http://127.0.0.1.nip.io", "http://[::2]", "http://localhost:", "http://user@localhost",
    "http://localhost:80?x", "http://localhost#", "http://localhost\\@evil.com",
    "http://localhostevil.com", "http://localhost:8O", "http://localhost/", "http://localhost:0",
    "http://localhost:65536", "http://localhost:080", "http://local host", "http://[::1%lo]",
    "http://localhost:5173/path", "http://localhost\t:80", "http://localhost:+80",
])
def test_default_refuses_other_origins(origin: str) -> None:
    assert not OriginPolicy().allowed(origin)


@pytest.mark.parametrize("pattern, origin, allowed", [
    # the attack strings of issue #13
    ("http://localhost:*", "http://localhost:80?x", False),
    ("http://localhost:*", "http://localhost#", False),
    ("http://localhost:*", "http://localhost\\@evil.com", False),
    ("http://localhost:*", "http://localhostevil.com", False),
    ("http://localhost:*", "http://localhost:8O", False),
    ("http://localhost:*", "http://localhost:80", True),
    ("http://localhost:*", "http://localhost", True),  # port 80, omitted
    ("https://*.example.com", "https://evil.example.com.attacker.net", False),
    ("https://*.example.com", "https://example.com", False),
    ("https://*.example.com", "https://.example.com", False),
    ("https://*.example.com", "https://a.example.com", True),
    ("https://*.example.com", "https://a.b.example.com", True),
    ("https://*.example.com", "https://a.example.com:443", True),
    ("https://*.example.com", "https://a.example.com:8443", False),
    ("https://*.example.com", "https://a.example.com:", False),
    ("https://*.example.com", "http://a.example.com", False),
    ("https://*.example.com", "https://evil.com/.example.com", False),
    ("https://*.example.com", "https://evil.com?.example.com", False),
    ("https://*.example.com", "https://evil.com#.example.com", False),
    ("https://*.example.com", "https://evil.com:1.example.com", False),
    ("https://*.example.com", "https://x@a.example.com", False),
    ("https://*.example.com", "https://a.example.com/", False),
    ("https://*.example.com", "HTTPS://A.Example.COM", True),
    ("HTTPS://*.EXAMPLE.COM", "https://a.example.com", True),
    # exact origins, default ports, trailing slash on the pattern
    ("https://app.test", "https://app.test", True),
    ("https://app.test/", "https://app.test", True),
    ("https://app.test", "https://app.test/", False),
    ("https://app.test", "https://app.test:443", True),
    ("https://app.test:443", "https://app.test", True),
    ("https://app.test", "https://app.test:80", False),
    ("http://app.test:80", "http://app.test", True),
    ("http://app.test:8080", "http://app.test", False),
    ("https://app.test", "http://app.test", False),
    ("https://app.test", "https://APP.test", True),
    ("https://app.test", "https://app.test.", False),
    ("https://app.test", "https://app.testx", False),
    # `*` within a label, in the middle, for every port, IDNA
    ("https://pr-*.preview.test", "https://pr-42.preview.test", True),
    ("https://pr-*.preview.test", "https://pr-.preview.test", False),
    ("https://pr-*.preview.test", "https://pr-4.2.preview.test", False),
    ("https://api.*.test:*", "https://api.eu.west.test:8443", True),
    ("https://api.*.test:*", "https://api.test", False),
    ("https://*.bücher.example", "https://www.xn--bcher-kva.example", True),
    ("https://*.bücher.example", "https://www.bücher.example", False),  # browsers: punycode
    ("https://*.bücher.example", "https://www.buecher.example", False),
    ("http://[::1]:*", "http://[::1]:8080", True),
    ("http://[::1]:*", "http://::1:8080", False),  # fnmatch would read [::1] as a class
    ("http://[::1]:*", "http://1:8080", False),
    # other schemes: no default port
    ("chrome-extension://abcdefgh", "chrome-extension://abcdefgh", True),
    ("chrome-extension://abcdefgh", "chrome-extension://abcdefgh:80", False),
])
def test_origin_patterns(pattern: str, origin: str, allowed: bool) -> None:
    assert OriginPolicy([pattern]).allowed(origin) is allowed


def test_patterns_replace_the_default() -> None:
    policy = OriginPolicy(["https://*.example.com", "http://localhost:*"])
    assert policy.allowed("http://localhost:5173") and policy.allowed(None)
    assert not policy.allowed("https://127.0.0.1") and not policy.allowed("http://[::1]")
    assert not policy.allowed("null")


@pytest.mark.parametrize("pattern, message", [
    ("localhost", "does not start with scheme://"),
    ("*.example.com", "does not start with scheme://"),
    ("https://example.com/app", "no path, query or fragment"),
    ("https://example.com?x", "no path, query or fragment"),
    ("https://user@example.com", "no user info"),
    ("https://", "the host is empty"),
    ("https://:443", "the host is empty"),
    ("https://ex ample.com", "not a name or an address"),
    ("https://ex\\ample.com", "not a name or an address"),
    ("https://example..com", "not a name or an address"),
    ("http://[::1", "not a name or an address"),
    ("http://[*]:80", "not an IPv6 address"),
    ("http://[::1]x", "'x' follows the host"),
    ("http://localhost:8O", "port '8O' is not 1-65535 or *"),
    ("http://localhost:0", "port '0'"),
    ("http://localhost:70000", "port '70000'"),
    ("http://localhost:*8", "port '*8'"),
    ("http://localhost:", "port ''"),
])
def test_bad_patterns_are_refused_with_a_reason(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"origin pattern {pattern!r}: ") + ".*"
                       + re.escape(message)):
        OriginPolicy(["https://fine.example", pattern])


def test_parse_origin() -> None:
    assert parse_origin("HTTPS://Example.COM:443") == Origin("https", "example.com", None)
    assert parse_origin("http://[0::1]:8080") == Origin("http", "[::1]", 8080)
    assert parse_origin("https://xn--bcher-kva.example") == Origin("https",
                                                                   "xn--bcher-kva.example")
    for text in ("null", "", "https:", "//example.com", "https://example.com/", "https://",
                 "https://[::1", "https://a:b:c", "https://bücher.example",
                 "https://evil\uff0eexample.com"):
        assert parse_origin(text) is None, text


def test_null_star_and_missing() -> None:
    assert OriginPolicy(["null"]).allowed("null") and OriginPolicy(["NULL"]).allowed("null")
    assert not OriginPolicy(["null"]).allowed("https://x.test")
    assert not OriginPolicy(["null"]).allowed("NULL")  # the opaque origin is lower case
    assert OriginPolicy(["*"]).allowed("null") and OriginPolicy(["*"]).allowed("https://x.test")
    assert OriginPolicy(["*", "https://x.test"]).allowed("anything at all")
    assert not OriginPolicy(["https://x.test"], allow_missing=False).allowed(None)
    assert not OriginPolicy(allow_missing=False).allowed("")


@given(st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
       st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")))
def test_star_stays_within_the_host(host: str, port: str) -> None:
    assume(not host.endswith(".example.com"))
    policy = OriginPolicy(["https://*.example.com"])
    assert policy.allowed(f"https://{host}.example.com")
    assert policy.allowed(f"https://{host}.example.com{port}") is (port in ("", ":443"))
    assert not policy.allowed(f"https://{host}{port}")


@given(st.text(max_size=30), st.sampled_from(["https://*.example.com", "http://localhost:*",
                                               "https://app.test", "*.test:*"]))
def test_nothing_but_a_clean_origin_is_ever_allowed(tail: str, pattern: str) -> None:
    """Whatever follows an allowed origin, only scheme://host[:port] may pass."""
    pattern = pattern if "://" in pattern else f"https://{pattern}"
    base = {"https://*.example.com": "https://a.example.com", "http://localhost:*":
            "http://localhost:3000"}.get(pattern, "https://app.test")
    if OriginPolicy([pattern]).allowed(base + tail):
        assert re.fullmatch(r"https?://[a-z0-9.-]+(:[1-9][0-9]*)?", (base + tail).strip(" \t"),
                            re.IGNORECASE), base + tail


@given(st.text(max_size=100), st.lists(st.tuples(st.sampled_from(
    ["Sec-WebSocket-Protocol", "Authorization", "Origin", "X"]), st.text(max_size=60)),
    max_size=5), st.one_of(st.none(), st.text(max_size=60)))
def test_any_request_gets_an_answer(path: str, headers: list[tuple[str, str]],
                                    origin: str | None) -> None:
    offer = find_token(path, headers)
    assert offer is None or (offer.token and offer.carrier in ("subprotocol", "query", "bearer"))
    assert isinstance(OriginPolicy().allowed(origin), bool)
    assert isinstance(OriginPolicy(["https://*.example.com"]).allowed(origin), bool)
