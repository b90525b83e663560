"""JSON Web Tokens (docs/security.md, "JSON Web Tokens"): HS256 from a secret, RS256,
ES256 and EdDSA from a JWKS file; pinned algorithms, time claims, audience and issuer,
the `ksw1` scope claim; through the gateway's carriers end to end.

Tokens are made with PyJWT and keys with cryptography, except the ones no honest
library would make (`alg: none`, HS256 keyed with a public key), crafted by hand."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

import ksw1fast
from ksw1fast import client as kclient
from ksw1fast.config import GatewayConfig
from ksw1fast.protocol.constants import DnsErrCode, Feature, OpenErrCode, Pkcs11Status
from ksw1fast.protocol.errors import AuthError, DnsError, OpenError
from ksw1fast.security.gate import Security
from ksw1fast.security.jwt_tokens import JwtVerifier, load_jwks
from ksw1fast.security.tokens import TokenVerifier, issue_token

from helpers import GatewayProcess

pytestmark = pytest.mark.timeout(60)

SECRET = b"a JWT secret of at least 32 bytes!"
SECRET_ENV = "KSW1FAST_TEST_JWT_SECRET"
NOW = 1_700_000_000.0
KEY_ALGS = ("RS256", "ES256", "EdDSA")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """A private key per JWKS algorithm, its kid the algorithm's name in lower case."""
    return {"RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ES256": ec.generate_private_key(ec.SECP256R1()),
            "EdDSA": ed25519.Ed25519PrivateKey.generate()}


def _public_jwk(alg: str, private: Any, **extra: Any) -> dict[str, Any]:
    codec = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg]
    jwk = codec.to_jwk(private.public_key(), as_dict=True)
    return {**jwk, "kid": alg.lower(), "use": "sig", **extra}


def _write_jwks(path: Path, keys: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"keys": keys}))
    return path


@pytest.fixture(scope="module")
def jwks_file(keys: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    encryption = {**_public_jwk("RS256", keys["RS256"]), "kid": "enc", "use": "enc",
                  "alg": "RSA-OAEP"}  # what Keycloak publishes beside: skipped
    return _write_jwks(tmp_path_factory.mktemp("jwks") / "jwks.json",
                       [_public_jwk(a, keys[a]) for a in KEY_ALGS] + [encryption])


def make(alg: str = "HS256", keys: dict[str, Any] | None = None, now: float = NOW,
         ttl: float = 300, kid: str | None = None, **claims: Any) -> str:
    """A token signed with SECRET (HS256) or the `alg` key of `keys`; claims given as
    None are left out."""
    body: dict[str, Any] = {"sub": "alice", "jti": "t-1", "iat": int(now), "exp": now + ttl}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    if alg == "HS256":
        return jwt.encode(body, SECRET, algorithm="HS256",
                          headers={"kid": kid} if kid else None)
    assert keys is not None
    return jwt.encode(body, keys[alg], algorithm=alg, headers={"kid": kid or alg.lower()})


def hand_made(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"",
              key: bytes | None = None) -> str:
    """A compact JWS from parts: HMAC-SHA256 under `key` if given, else `signature`."""
    signing_input = (f"{_b64(json.dumps(header).encode())}."
                     f"{_b64(json.dumps(claims).encode())}")
    if key is not None:
        signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def verifier(jwks_file: Path | None = None, secret: bytes | None = SECRET,
             **settings: Any) -> TokenVerifier:
    return TokenVerifier(jwt=JwtVerifier(
        secret=secret, jwks=load_jwks(jwks_file) if jwks_file else None, **settings))


def refusal(v: TokenVerifier, token: str | bytes, now: float = NOW) -> str:
    with pytest.raises(AuthError) as info:
        v.verify(token, now=now)
    return info.value.kind


# --- accepted tokens ------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["HS256", *KEY_ALGS])
def test_each_algorithm_is_accepted(alg: str, keys: dict[str, Any], jwks_file: Path) -> None:
    token = make(alg, keys, jti=f"id-{alg}")
    grant = verifier(jwks_file).verify(token, now=NOW)
    assert grant.kind == "jwt" and grant.expires_at == NOW + 300 and grant.skew == 30
    assert (grant.subject, grant.token_id) == ("alice", f"id-{alg}")
    # no ksw1 claim: no limits beyond the egress policy, like a static token
    assert grant.scope is None and grant.allows_udp and grant.allows_pkcs11
    assert grant.allows_open("anything.example", 1, "udp") and grant.allows_dns("x.example")
    assert token not in repr(grant)


def test_sub_and_jti_are_optional() -> None:
    grant = verifier().verify(make(sub=None, jti=None), now=NOW)
    assert grant.subject is None and grant.token_id is None


def test_the_ksw1_claim_means_what_a_signed_tokens_scope_means() -> None:
    allow = ["tcp db.internal:5432", "*.svc.internal:8000-8999", "10.0.0.0/8:443", "udp *:53"]
    for flags in ({}, {"udp": True, "dns": True}, {"pkcs11": True}, {"dns": True}):
        signed = TokenVerifier(secret=SECRET).verify(
            issue_token(SECRET, 300, allow if flags.get("udp") else allow[:3], now=NOW,
                        **flags), now=NOW)
        grant = verifier().verify(
            make(ksw1={"allow": allow if flags.get("udp") else allow[:3], **flags}), now=NOW)
        assert [str(r) for r in grant.scope or ()] == [str(r) for r in signed.scope or ()]
        assert ((grant.allows_udp, grant.dns, grant.allows_pkcs11)
                == (signed.allows_udp, signed.dns, signed.allows_pkcs11))
        for host, port, proto in (("db.internal", 5432, "tcp"), ("db.internal", 5433, "tcp"),
                                  ("a.svc.internal", 8080, "tcp"), ("10.2.3.4", 443, "tcp"),
                                  ("db.internal", 443, "tcp"), ("ns.example", 53, "udp")):
            assert grant.allows_open(host, port, proto) == signed.allows_open(host, port, proto)
        for name in ("db.internal", "x.svc.internal", "other.example"):
            assert grant.allows_dns(name) == signed.allows_dns(name)
    empty = verifier().verify(make(ksw1={}), now=NOW)  # a scope that allows nothing
    assert empty.scope == () and not empty.allows_open("x", 1, "tcp")
    assert not (empty.allows_udp or empty.dns or empty.allows_pkcs11)


def test_leeway_and_expiry_on_later_requests() -> None:
    token = make(ttl=60)
    v = verifier()  # 30 s by default
    assert v.verify(token, now=NOW + 90).kind == "jwt"
    assert refusal(v, token, now=NOW + 90.5) == "expired"
    grant = v.verify(token, now=NOW)
    assert not grant.expired(NOW + 90) and grant.expired(NOW + 91)  # a long connection
    strict = verifier(leeway=0)
    assert strict.verify(token, now=NOW + 60).kind == "jwt"
    assert refusal(strict, token, now=NOW + 60.5) == "expired"
    # nbf and iat: in the future by up to the leeway is fine
    assert v.verify(make(nbf=NOW + 30, iat=NOW + 30), now=NOW).kind == "jwt"


def test_audience_and_issuer_when_configured() -> None:
    v = verifier(audience="ksw1fast", issuer="https://id.example")
    for aud in ("ksw1fast", ["other", "ksw1fast"]):
        assert v.verify(make(aud=aud, iss="https://id.example"), now=NOW).kind == "jwt"


# --- refusals -------------------------------------------------------------------------

def test_time_claims() -> None:
    v = verifier()
    assert refusal(v, make(now=NOW - 3600)) == "expired"
    assert refusal(v, make(nbf=NOW + 31)) == "invalid"           # not yet valid
    assert refusal(v, make(iat=NOW + 31)) == "invalid"           # issued in the future
    assert refusal(v, make(exp=None)) == "invalid"               # exp is required
    for bad in ("9999999999", True, None, 1e400, 10**400, [NOW + 60]):
        assert refusal(v, hand_made({"alg": "HS256"}, {"exp": bad}, key=SECRET)) == "invalid"
    for name in ("nbf", "iat"):
        assert refusal(v, make(**{name: "0"})) == "invalid"


def test_audience_and_issuer_refusals() -> None:
    v = verifier(audience="ksw1fast", issuer="https://id.example")
    good = {"aud": "ksw1fast", "iss": "https://id.example"}
    for changes in ({"aud": "other"}, {"aud": ["other"]}, {"aud": None},
                    {"iss": "https://evil.example"}, {"iss": "https://id.example.evil"},
                    {"iss": "id.example"}, {"iss": None}):
        assert refusal(v, make(**{**good, **changes})) == "invalid", changes
    # a token meant for some audience is not for a gateway that names none (RFC 7519)
    assert refusal(verifier(), make(aud="ksw1fast")) == "invalid"


def test_key_selection_and_pinned_algorithms(keys: dict[str, Any], jwks_file: Path) -> None:
    v = verifier(jwks_file)
    assert refusal(v, make("ES256", keys, kid="unknown")) == "invalid"
    assert refusal(v, make("ES256", keys, kid="enc")) == "invalid"  # skipped: no such key
    no_kid = jwt.encode({"exp": NOW + 60}, keys["ES256"], algorithm="ES256")
    assert refusal(v, no_kid) == "invalid"
    # a key verifies only its own type's algorithm: an ES256 token naming the RSA key
    assert refusal(v, make("ES256", keys, kid="rs256")) == "invalid"
    other = ec.generate_private_key(ec.SECP256R1())  # the right kid, someone else's key
    assert refusal(v, make("ES256", {"ES256": other})) == "invalid"
    # HS256 only from the secret: a JWKS-only gateway refuses HS256 whatever its kid
    assert refusal(verifier(jwks_file, secret=None), make(kid="es256")) == "invalid"
    assert refusal(verifier(jwks_file, secret=None), make("HS256", kid="hs")) == "invalid"
    # and an RS256 token with only a secret configured
    assert refusal(verifier(), make("RS256", keys)) == "invalid"


def test_alg_none_is_refused(keys: dict[str, Any], jwks_file: Path) -> None:
    claims = {"exp": NOW + 60, "sub": "mallory"}
    v = verifier(jwks_file)
    for alg in ("none", "None", "NONE", ""):
        for header in ({"alg": alg}, {"alg": alg, "kid": "rs256"}, {"alg": alg, "typ": "JWT"}):
            for signature in (b"", b"x" * 32):
                assert refusal(v, hand_made(header, claims, signature)) == "invalid", header
    no_alg = hand_made({"kid": "rs256"}, claims, b"x")
    assert refusal(v, no_alg) == "invalid"


def test_hs256_keyed_with_a_jwks_public_key_is_refused(keys: dict[str, Any],
                                                       jwks_file: Path) -> None:
    """Algorithm confusion: a verifier that let the token's `alg` pick how to use the
    RSA key would check this HMAC with the public key anyone can read, and accept it."""
    public = keys["RS256"].public_key()
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk_json = json.dumps(_public_jwk("RS256", keys["RS256"])).encode()
    for key in (pem, der, jwk_json):
        token = hand_made({"alg": "HS256", "kid": "rs256"}, {"exp": NOW + 60}, key=key)
        assert refusal(verifier(jwks_file), token) == "invalid"
        assert refusal(verifier(jwks_file, secret=None), token) == "invalid"


@pytest.mark.parametrize("scope", [
    None, [], "db.internal:5432", ["db.internal:5432"], 1, True,
    {"allow": "db.internal:5432"}, {"allow": [5432]}, {"allow": ["db.internal:0"]},
    {"allow": ["db.internal:99999"]}, {"allow": ["bogus db.internal"]}, {"allow": [""]},
    {"allow": None}, {"udp": "yes"}, {"dns": 1}, {"pkcs11": None},
    {"allow": ["*"], "deny": ["db.internal"]}, {"Allow": ["*"]},
])
def test_a_malformed_ksw1_claim_is_refused(scope: Any) -> None:
    token = hand_made({"alg": "HS256"}, {"exp": NOW + 60, "ksw1": scope}, key=SECRET)
    assert refusal(verifier(), token) == "invalid"


def test_other_malformed_tokens() -> None:
    v = verifier()
    token = make()
    header, payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for bad in (f"{header}.{payload}.{flipped}", f"{header}.{payload}", f"{token}.x",
                f"{header}.{payload}x.{signature}", f"{header}..{signature}", "a.b.c",
                hand_made({"alg": "HS256"}, ["not", "an", "object"], key=SECRET),  # type: ignore[arg-type]
                hand_made({"alg": "HS256"}, {"exp": NOW + 60, "sub": 7}, key=SECRET),
                hand_made({"alg": "HS256"}, {"exp": NOW + 60, "jti": ["x"]}, key=SECRET),
                hand_made({"alg": "HS256", "kid": 1}, {"exp": NOW + 60}, key=SECRET),
                hand_made({"alg": "HS256", "crit": ["unknown"], "unknown": 1},
                          {"exp": NOW + 60}, key=SECRET),
                token.encode() + b"\xff"):
        assert refusal(v, bad) == "invalid", bad
    assert refusal(verifier(), make().replace("e", "f", 1)) == "invalid"


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.text(alphabet="eyJAZaz09-_.=", max_size=200)))
def test_garbage_only_ever_raises_auth_error(token: str | bytes) -> None:
    with pytest.raises(AuthError):
        verifier().verify(token, now=NOW)


def test_nothing_secret_in_reprs_or_errors(keys: dict[str, Any], jwks_file: Path) -> None:
    v = verifier(jwks_file, audience="ksw1fast")
    token = make(aud="ksw1fast")
    texts = [repr(v), repr(v.verify(token, now=NOW))]
    for bad, now in ((token + "x", NOW), (token, NOW + 3600)):
        with pytest.raises(AuthError) as info:
            v.verify(bad, now=now)
        texts += [str(info.value), repr(info.value)]
    for text in texts:
        assert token.split(".")[2] not in text and SECRET.decode() not in text, text


# --- the other token kinds beside JWTs ------------------------------------------------

def test_jwts_beside_static_and_signed_tokens(tmp_path: Path, keys: dict[str, Any],
                                              jwks_file: Path) -> None:
    (tmp_path / "tokens").write_text("static-token\n")
    both = TokenVerifier(static_file=tmp_path / "tokens", secret=b"signing secret",
                         jwt=JwtVerifier(secret=SECRET, jwks=load_jwks(jwks_file)))
    assert both.verify("static-token", now=NOW).kind == "static"
    signed = issue_token(b"signing secret", 60, ["x:1"], now=NOW)
    assert both.verify(signed, now=NOW).kind == "signed"
    assert both.verify(make(), now=NOW).kind == "jwt"
    assert both.verify(make("EdDSA", keys), now=NOW).kind == "jwt"
    # a JWT is tried only when a JWT key source is configured
    assert refusal(TokenVerifier(static_file=tmp_path / "tokens", secret=SECRET),
                   make()) == "invalid"
    # and a signed token is not taken for a JWT where only JWTs are configured
    assert refusal(verifier(), issue_token(SECRET, 60, ["x:1"], now=NOW)) == "invalid"


# --- configuration --------------------------------------------------------------------

def test_jwks_file_errors(tmp_path: Path, keys: dict[str, Any]) -> None:
    rsa_jwk = _public_jwk("RS256", keys["RS256"])
    private = {**RSAAlgorithm.to_jwk(keys["RS256"], as_dict=True), "kid": "priv"}
    small = _public_jwk("RS256", rsa.generate_private_key(public_exponent=65537,
                                                          key_size=1024), kid="small")
    p384 = {**ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(),
                                 as_dict=True), "kid": "p384"}
    cases: list[tuple[Any, str]] = [
        ({"keys": []}, "no signing keys"),
        ({"keys": [{**rsa_jwk, "use": "enc"}]}, "no signing keys"),
        ([rsa_jwk], 'not a JWKS, an object with a "keys" list'),
        ({"keys": "x"}, 'not a JWKS'),
        ({"keys": [1]}, "key 0: not an object"),
        ({"keys": [{k: v for k, v in rsa_jwk.items() if k != "kid"}]}, 'key 0: no "kid"'),
        ({"keys": [rsa_jwk, rsa_jwk]}, "key 1: kid 'rs256' appears twice"),
        ({"keys": [{"kty": "oct", "k": _b64(SECRET), "kid": "hs"}]},
         "key 0: kid 'hs': kty 'oct' is not supported"),
        ({"keys": [p384]}, "key 0: kid 'p384': kty 'EC' crv 'P-384' is not supported"),
        ({"keys": [{**rsa_jwk, "alg": "PS256"}]}, "alg 'PS256', but a RSA key here verifies RS256"),
        ({"keys": [{**rsa_jwk, "alg": "HS256"}]}, "alg 'HS256'"),
        ({"keys": [private]}, "kid 'priv' is a private key"),
        ({"keys": [small]}, "kid 'small': a 1024-bit RSA key; at least 2048 bits"),
        ({"keys": [{**rsa_jwk, "n": "!!"}]}, "kid 'rs256': not a valid RSA public key"),
        ({"keys": [{"kty": "EC", "crv": "P-256", "kid": "e", "x": "AA", "y": "AA"}]},
         "kid 'e': not a valid EC public key"),
    ]
    for data, message in cases:
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError) as info:
            load_jwks(path)
        text = str(info.value)
        assert text.startswith(f"JWKS file {path}: ") and message in text, text
        assert "\n" not in text and rsa_jwk["n"][:20] not in text, text
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not JSON$"):
        load_jwks(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"missing\.json: cannot read it: no such file"):
        load_jwks(tmp_path / "missing.json")


def test_secret_must_be_an_hs256_key(keys: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="the JWT secret is 31 bytes; HS256 needs at least 32"):
        JwtVerifier(secret=b"x" * 31)
    pem = keys["ES256"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError, match="is an asymmetric key or a certificate") as info:
        JwtVerifier(secret=pem)
    assert pem.decode() not in str(info.value)
    with pytest.raises(ValueError, match="key source"):
        JwtVerifier()


def test_security_config(monkeypatch: pytest.MonkeyPatch, jwks_file: Path) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ValueError, match=f"environment variable {SECRET_ENV} "
                                         r"\(the JWT secret\) is not set or empty"):
        Security(GatewayConfig(jwt_secret_env=SECRET_ENV))
    with pytest.raises(ValueError, match="jwt_audience and jwt_issuer need JWTs"):
        Security(GatewayConfig(jwt_audience="ksw1fast"))
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    # JWTs are auth: listening beyond loopback, and open_token, are allowed with them
    for settings in ({"jwt_secret_env": SECRET_ENV}, {"jwt_jwks": str(jwks_file)}):
        security = Security(GatewayConfig(host="0.0.0.0", open_token=True, **settings))
        assert security.tokens.enabled
    for bad, message in (({"jwt_leeway": -1.0}, "jwt_leeway must be 0-3600"),
                         ({"jwt_audience": ""}, "jwt_audience must not be empty")):
        with pytest.raises(ValueError, match=message):
            GatewayConfig(**bad)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksw1fast", *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})},
                          stdin=subprocess.DEVNULL)


def test_a_bad_jwks_file_is_one_line_at_start(tmp_path: Path, jwks_file: Path) -> None:
    missing = tmp_path / "missing.json"
    result = _run("serve", "--port", "0", "--jwt-jwks", str(missing))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"ksw1fast serve: error: JWKS file {missing}: cannot read it: no such file or directory")
    config = tmp_path / "ksw1fast.toml"
    config.write_text(f'host = "0.0.0.0"\njwt_jwks = "{jwks_file}"\njwt_audience = "ksw1fast"\n'
                      f'jwt_issuer = "https://id.example"\njwt_leeway = 10\n'
                      f'jwt_secret_env = "{SECRET_ENV}"\n')
    assert _run("check-config", str(config), env={SECRET_ENV: SECRET.decode()}).returncode == 0
    unset = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    result = subprocess.run([sys.executable, "-m", "ksw1fast", "check-config", str(config)],
                            capture_output=True, text=True, timeout=30, env=unset)
    assert result.returncode == 2 and "(the JWT secret) is not set" in result.stderr


# --- through a gateway ----------------------------------------------------------------

async def _refused_with(address: str, **kwargs: Any) -> int:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(address, **kwargs):
            pass
    return info.value.response.status_code


async def test_scoped_hs256_token_through_the_carriers(monkeypatch: pytest.MonkeyPatch,
                                                       echo_port: int) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    now = time.time()
    token = make(now=now, aud="ksw1fast", ksw1={"allow": [f"127.0.0.1:{echo_port}"]})
    async with await ksw1fast.start_gateway(port=0, jwt_secret_env=SECRET_ENV,
                                            jwt_audience="ksw1fast") as gw:
        async with websockets.connect(gw.address, subprotocols=[f"auth-{token}"]) as ws:
            assert ws.subprotocol == f"auth-{token}"  # else a browser drops the socket
        async with websockets.connect(gw.address,
                                      additional_headers={"Authorization": f"Bearer {token}"}):
            pass
        for bad in (make(now=now - 3600, aud="ksw1fast"), make(now=now, aud="other"),
                    make(now=now, aud="ksw1fast", ksw1={"allow": "*"})):
            assert await _refused_with(gw.address, subprotocols=[f"auth-{bad}"]) == 403
            assert await _refused_with(f"{gw.address}?token={bad}") == 403
        for client in (await kclient.connect(f"{gw.address}?token={token}"),
                       await kclient.connect(gw.address, extra_headers={
                           "Sec-WebSocket-Protocol": f"auth-{token}"})):
            stream = await client.open_connection("127.0.0.1", echo_port)
            stream.write(b"in scope")
            assert await stream.readexactly(8) == b"in scope"
            with pytest.raises(OpenError) as info:  # outside `allow`: as a signed token
                await client.open_connection("127.0.0.1", echo_port + 1)
            assert info.value.code == OpenErrCode.AUTH_FAILED
            with pytest.raises(OpenError) as info:  # no `udp`
                await client.open_udp("127.0.0.1", echo_port)
            assert info.value.code == OpenErrCode.AUTH_FAILED
            with pytest.raises(DnsError) as dns:    # no `dns`
                await client.resolve("localhost")
            assert dns.value.code == DnsErrCode.REFUSED
            assert (await client.pkcs11(0)).status == Pkcs11Status.AUTH_DENIED  # no `pkcs11`
            await client.close()


async def test_jwks_tokens_in_the_hello_and_open_frames(keys: dict[str, Any], jwks_file: Path,
                                                        echo_port: int) -> None:
    """--open-token: the per-frame carriers, with RS256's long tokens."""
    now = time.time()
    rs256 = make("RS256", keys, now=now, ksw1={"allow": ["127.0.0.1", "localhost"], "dns": True})
    async with await ksw1fast.start_gateway(port=0, jwt_jwks=str(jwks_file),
                                            open_token=True) as gw:
        client = await kclient.connect(gw.address, features=0x3E)
        assert client.features & Feature.OPEN_TOKEN
        for token in (rs256, make("ES256", keys, now=now), make("EdDSA", keys, now=now)):
            stream = await client.open_connection("127.0.0.1", echo_port, token=token.encode())
            stream.write(b"ok")
            assert await stream.readexactly(2) == b"ok"
        for token, code in ((make("ES256", keys, now=now - 3600), OpenErrCode.AUTH_FAILED),
                            (make("ES256", keys, now=now, kid="nope"), OpenErrCode.AUTH_FAILED),
                            (b"", OpenErrCode.AUTH_REQUIRED)):
            with pytest.raises(OpenError) as info:
                await client.open_connection("127.0.0.1", echo_port,
                                             token=token if isinstance(token, bytes)
                                             else token.encode())
            assert info.value.code == code
        await client.close()
        client = await kclient.connect(gw.address, token=rs256.encode())  # the Hello
        assert "127.0.0.1" in await client.resolve("localhost")
        with pytest.raises(DnsError) as dns:  # DNS only for names `allow` covers
            await client.resolve("example.com")
        assert dns.value.code == DnsErrCode.REFUSED
        await client.close()
        async with websockets.connect(gw.address, subprotocols=[f"auth-{rs256}"]) as ws:
            assert ws.subprotocol == f"auth-{rs256}"


def test_the_serve_command_takes_the_jwt_flags(keys: dict[str, Any], jwks_file: Path) -> None:
    gateway = GatewayProcess("--jwt-jwks", str(jwks_file), "--jwt-secret-env", SECRET_ENV,
                             "--jwt-issuer", "https://id.example", "--jwt-leeway", "5",
                             env={SECRET_ENV: SECRET.decode()})
    try:
        async def check() -> None:
            now = time.time()
            for token in (make("EdDSA", keys, now=now, iss="https://id.example"),
                          make(now=now, iss="https://id.example")):
                async with websockets.connect(f"{gateway.address}?token={token}"):
                    pass
            for bad in (make(now=now, iss="https://other.example"),
                        make(now=now, iss="https://id.example", nbf=now + 60)):
                assert await _refused_with(f"{gateway.address}?token={bad}") == 403

        asyncio.run(check())
    finally:
        log = gateway.stop()
    assert SECRET.decode() not in log
    # no --jwt-audience: the start-up log says what that lets in, once
    assert log.count("WARNING ksw1fast[") == 1
    assert "jwt_jwks without jwt_audience: every token those keys signed without an aud" in log
