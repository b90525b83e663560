"""JSON Web Tokens (RFC 7519), verified with PyJWT on its `cryptography` backend.

Two key sources, either or both:

- an HS256 secret (`--jwt-secret-env VAR`): at least 32 bytes (RFC 7518 §3.2);
- a JWKS file (`--jwt-jwks FILE`, RFC 7517) of public keys, each with a unique `kid`.

Algorithms are pinned, never taken from the token: the secret verifies HS256 only, and
a JWKS key only the algorithm of its type (RSA: RS256, at least 2048 bits; EC P-256:
ES256; OKP Ed25519: EdDSA). A token's header `alg` picks the source (HS256 the secret,
anything else the JWKS) and its `kid` the JWKS key; an unknown `kid`, a key whose
algorithm is not the token's, `alg: none` and critical header extensions (`crit`) are
refusals. Keys marked `"use": "enc"` are skipped; any other key the gateway cannot use,
or a private one, is an error when the file is loaded.

Claims: `exp` is required; `exp`, `nbf` and `iat` are checked against the same clock,
with `leeway` seconds of skew, as the other tokens' expiry (Grant.expired); `aud` must
name the configured audience (and a token with an `aud` needs one configured, RFC 7519
§4.1.3), `iss` equal the configured issuer; `sub` and `jti`, strings if present, go
into the Grant for the audit trail.

Scope: the `ksw1` claim, an object with `allow` (a list of `[tcp|udp|any] HOST[:PORTS]`,
as `ksw1fast token issue --allow` takes them), `udp`, `dns`, `pkcs11` (booleans, absent =
false; `pkcs11` may be a PKCS#11 scope object, ksw1fast.pkcs11.scope), means what a
signed token's payload means; no other key may appear in it. A JWT
without the claim has no scope limits beyond the egress policy, like a static token.

Every refusal is AuthError "invalid" or "expired"; neither a token nor a key appears in
an exception message or a repr.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import HMACAlgorithm

from ksw1fast.protocol.errors import AuthError
from ksw1fast.security.tokens import SCOPE_FLAGS, Grant, scoped_grant

SCOPE_CLAIM = "ksw1"
DEFAULT_LEEWAY = 30.0
HMAC_ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32   # RFC 7518 §3.2: an HS256 key at least as long as its hash
MIN_RSA_BITS = 2048
# (kty, crv) -> the one algorithm a key of that type verifies, and its public key class
KEY_ALGORITHMS: dict[tuple[str, str | None], tuple[str, type]] = {
    ("RSA", None): ("RS256", RSAPublicKey),
    ("EC", "P-256"): ("ES256", EllipticCurvePublicKey),
    ("OKP", "Ed25519"): ("EdDSA", Ed25519PublicKey),
}
_SCOPE_KEYS = frozenset(("allow", *SCOPE_FLAGS))
# the time claims are checked here, against the verifier's `now`; PyJWT checks the rest
_OPTIONS: Any = {"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                            "enforce_minimum_key_length": True}


def load_jwks(path: str | os.PathLike[str]) -> dict[str, tuple[str, Any]]:
    """The usable keys of the JWKS file at `path`: kid -> (algorithm, public key).

    ValueError (one line naming the file, and the key by its kid or index) for a file
    that cannot be read, is no JWKS, holds a key this gateway cannot use or no key at all.
    """
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as exc:
        raise ValueError(f"JWKS file {os.fspath(path)}: cannot read it: "
                         f"{(exc.strerror or str(exc)).lower()}") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError
        raise ValueError(f"JWKS file {os.fspath(path)}: not JSON") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise ValueError(f"JWKS file {os.fspath(path)}: not a JWKS, an object with a "
                         '"keys" list')
    found: dict[str, tuple[str, Any]] = {}
    for index, jwk in enumerate(keys):
        try:
            entry = _load_key(jwk, found)
        except ValueError as exc:
            raise ValueError(f"JWKS file {os.fspath(path)}: key {index}: {exc}") from None
        if entry is not None:
            kid, algorithm, key = entry
            found[kid] = (algorithm, key)
    if not found:
        raise ValueError(f"JWKS file {os.fspath(path)}: no signing keys")
    return found


def _load_key(jwk: object, found: Mapping[str, object]) -> tuple[str, str, Any] | None:
    """(kid, algorithm, public key) of one JWK, None for an encryption key; ValueError
    saying what is wrong, quoting nothing of the key but its kid, kty, crv and alg."""
    if not isinstance(jwk, dict):
        raise ValueError("not an object")
    if jwk.get("use") == "enc":
        return None
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError('no "kid": each key needs one, tokens select keys by it')
    if kid in found:
        raise ValueError(f"kid {kid!r} appears twice")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    known = KEY_ALGORITHMS.get((kty, crv)) if isinstance(kty, str) and (
        crv is None or isinstance(crv, str)) else None
    if known is None:
        raise ValueError(f"kid {kid!r}: kty {kty!r}" + (f" crv {crv!r}" if crv else "")
                         + " is not supported: RSA (RS256), EC P-256 (ES256) or OKP "
                           "Ed25519 (EdDSA); an HS256 secret goes in --jwt-secret-env")
    algorithm, public_class = known
    if jwk.get("alg", algorithm) != algorithm:
        raise ValueError(f"kid {kid!r}: alg {jwk.get('alg')!r}, but a {kty} key here "
                         f"verifies {algorithm} only")
    if "d" in jwk:
        raise ValueError(f"kid {kid!r} is a private key: the JWKS holds public keys only")
    try:
        key = jwt.PyJWK(jwk, algorithm=algorithm).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):  # their messages quote the key
        raise ValueError(f"kid {kid!r}: not a valid {kty} public key") from None
    if not isinstance(key, public_class):
        raise ValueError(f"kid {kid!r}: not a {kty} public key")
    if isinstance(key, RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"kid {kid!r}: a {key.key_size}-bit RSA key; at least "
                         f"{MIN_RSA_BITS} bits")
    return kid, algorithm, key


def check_secret(secret: bytes) -> bytes:
    """`secret` if it can be an HS256 key; ValueError saying why not (never quoting it)."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the JWT secret is {len(secret)} bytes; HS256 needs at least "
                         f"{MIN_SECRET_BYTES} (RFC 7518 §3.2)")
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError:
        raise ValueError("the JWT secret is an asymmetric key or a certificate (PEM, DER "
                         "or SSH), not an HMAC secret") from None
    return secret


class JwtVerifier:
    """Verifies JWTs with an HS256 `secret` and/or `jwks` keys (load_jwks); see the
    module docstring. `audience` and `issuer`, when given, are required claims."""

    def __init__(self, secret: bytes | None = None,
                 jwks: Mapping[str, tuple[str, Any]] | None = None,
                 audience: str | None = None, issuer: str | None = None,
                 leeway: float = DEFAULT_LEEWAY) -> None:
        if secret is None and not jwks:
            raise ValueError("JWTs need a key source: a secret or a JWKS file")
        self._secret = None if secret is None else check_secret(secret)
        self._jwks = dict(jwks or {})
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._decoder = jwt.PyJWT({**_OPTIONS, "require": [
            "exp", *(["aud"] if audience is not None else []),
            *(["iss"] if issuer is not None else [])]})

    def __repr__(self) -> str:
        return (f"JwtVerifier(hs256={self._secret is not None}, jwks={sorted(self._jwks)}, "
                f"audience={self.audience!r}, issuer={self.issuer!r}, leeway={self.leeway})")

    def verify(self, token: str, now: float) -> Grant:
        """The Grant of `token` at `now` (Unix seconds); AuthError "invalid" or
        "expired"."""
        try:
            header = jwt.get_unverified_header(token)
            key, algorithm = self._key_for(header)
            claims = self._decoder.decode(token, key, algorithms=[algorithm],
                                          audience=self.audience, issuer=self.issuer)
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):  # (deep JSON)
            raise AuthError("invalid") from None
        exp = _numeric_date(claims, "exp")
        if any(_numeric_date(claims, name) > now + self.leeway
               for name in ("nbf", "iat") if name in claims):
            raise AuthError("invalid")  # not valid yet
        if now > exp + self.leeway:
            raise AuthError("expired")
        scope = claims.get(SCOPE_CLAIM)
        if SCOPE_CLAIM in claims and not (isinstance(scope, dict)
                                          and _SCOPE_KEYS.issuperset(scope)):
            raise AuthError("invalid")  # (an unknown key could be a limit we would miss)
        subject, token_id = claims.get("sub"), claims.get("jti")
        if not all(v is None or isinstance(v, str) for v in (subject, token_id)):
            raise AuthError("invalid")  # (newer PyJWTs check too; older ones do not)
        try:
            return scoped_grant("jwt", scope, exp, self.leeway, subject=subject,
                                token_id=token_id)
        except ValueError:
            raise AuthError("invalid") from None

    def _key_for(self, header: Mapping[str, Any]) -> tuple[Any, str]:
        """The key and the one algorithm a token with this header may be verified with;
        the token's `alg` must then be that algorithm (PyJWT checks)."""
        if "crit" in header:  # extensions that must be understood: none are, here
            raise ValueError("critical header extensions")  # (older PyJWTs ignore them)
        if header.get("alg") == HMAC_ALGORITHM:
            if self._secret is None:
                raise ValueError("no JWT secret")
            return self._secret, HMAC_ALGORITHM
        kid = header.get("kid")
        found = self._jwks.get(kid) if isinstance(kid, str) else None
        if found is None:
            raise ValueError("unknown kid")
        algorithm, key = found
        return key, algorithm


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    """A NumericDate claim: a JSON number (not a boolean, not a string), finite."""
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError("invalid")
    try:
        seconds = float(value)
    except OverflowError:
        raise AuthError("invalid") from None
    if not math.isfinite(seconds):
        raise AuthError("invalid")
    return seconds
