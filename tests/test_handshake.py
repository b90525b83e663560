"""Upgrade request checks: token carriers and their priority, the subprotocol echo, Origin."""
from __future__ import annotations

import pytest
from hypothesis import assume, given, strategies as st
from multidict import CIMultiDict

from ksw1fast.handshake import OriginPolicy, TokenOffer, find_token, header_values


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
    "http://[::1]:3000",
])
def test_default_allows_missing_and_localhost_family(origin: str | None) -> None:
    assert OriginPolicy().allowed(origin)


@pytest.mark.parametrize("origin", [
    "null", "https://example.com", "http://localhost.evil.com", "http://evil.com#localhost",
    "http://localhost:80.evil.com", "ws://localhost", "file://", "http://127.0.0.2",
    "http://127.0.0.1.nip.io", "http://[::2]", "http://localhost:", "http://user@localhost",
])
def test_default_refuses_other_origins(origin: str) -> None:
    assert not OriginPolicy().allowed(origin)


def test_patterns_replace_the_default() -> None:
    policy = OriginPolicy(["https://*.example.com", "http://localhost:*", "https://app.test/"])
    for origin in ("https://a.example.com", "https://a.b.example.com", "HTTPS://A.Example.COM",
                   "http://localhost:5173", "https://app.test", None):
        assert policy.allowed(origin), origin
    for origin in ("https://example.com", "http://a.example.com", "https://a.example.com:8443",
                   "https://evil.com/.example.com", "https://evil.com:1.example.com",
                   "https://x@a.example.com", "http://localhost", "https://127.0.0.1", "null",
                   "https://a.example.com.evil.net"):
        assert not policy.allowed(origin), origin


def test_ipv6_origin_pattern_is_literal() -> None:
    policy = OriginPolicy(["http://[::1]:*"])  # fnmatch would read [::1] as a class
    assert policy.allowed("http://[::1]:8080")
    assert not policy.allowed("http://::8080") and not policy.allowed("http://1:8080")


def test_null_star_and_missing() -> None:
    assert OriginPolicy(["null"]).allowed("null")
    assert not OriginPolicy(["null"]).allowed("https://x.test")
    assert OriginPolicy(["*"]).allowed("null") and OriginPolicy(["*"]).allowed("https://x.test")
    assert not OriginPolicy(["https://x.test"], allow_missing=False).allowed(None)
    assert not OriginPolicy(allow_missing=False).allowed("")


@given(st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
       st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")))
def test_star_stays_within_the_host(host: str, port: str) -> None:
    assume(not host.endswith(".example.com"))
    policy = OriginPolicy(["https://*.example.com"])
    assert policy.allowed(f"https://{host}.example.com")
    assert policy.allowed(f"https://{host}.example.com{port}") is (port == "")
    assert not policy.allowed(f"https://{host}{port}")


@given(st.text(max_size=100), st.lists(st.tuples(st.sampled_from(
    ["Sec-WebSocket-Protocol", "Authorization", "Origin", "X"]), st.text(max_size=60)),
    max_size=5), st.one_of(st.none(), st.text(max_size=60)))
def test_any_request_gets_an_answer(path: str, headers: list[tuple[str, str]],
                                    origin: str | None) -> None:
    offer = find_token(path, headers)
    assert offer is None or (offer.token and offer.carrier in ("subprotocol", "query", "bearer"))
    assert isinstance(OriginPolicy().allowed(origin), bool)
    assert isinstance(OriginPolicy(["https://*.example.com"]).allowed(origin), bool)
