"""What the gateway enforces, built once from its config: tokens, Origins, egress rules.
Building it also checks that the secrets the config names (the token secret, the JWT
secret, the PKCS#11 PIN) are set in the environment, and reads the JWKS file."""
from __future__ import annotations

from typing import Optional

from ksw1fast.security.jwt_tokens import JwtVerifier, load_jwks
from ksw1fast.security.tokens import Grant, TokenVerifier, secret_from_env
from ksw1fast.protocol.errors import AuthError, KSW1Error
from ksw1fast.config import GatewayConfig
from ksw1fast.security.handshake import Headers, OriginPolicy, find_token, header_values
from ksw1fast.security.egress import Decision, EgressPolicy, is_loopback_host


class HandshakeRefused(KSW1Error):
    """The upgrade request is refused with HTTP `status`; `kind` is "origin" or the
    token problem ("missing", "invalid", "expired")."""

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.kind = kind


class Security:
    """Tokens, Origins and egress rules, built once per gateway (the session's Authority,
    ksw1fast.protocol.session)."""

    def __init__(self, config: GatewayConfig) -> None:
        secret = secret_from_env(config.token_secret_env) if config.token_secret_env else None
        if config.pkcs11.pin_env:  # unset, the agents would quietly serve without that PIN
            secret_from_env(config.pkcs11.pin_env, what="the PKCS#11 PIN")
        self.tokens = TokenVerifier(static_file=config.token_file, secret=secret,
                                    jwt=_jwt_verifier(config))
        self.origins = OriginPolicy(config.allow_origins)
        self.egress = EgressPolicy(config.egress)
        self.open_token = config.open_token
        if not self.tokens.enabled and config.open_token:
            raise ValueError("open_token needs tokens: set token_file, token_secret_env, "
                             "jwt_secret_env or jwt_jwks")
        if not (is_loopback_host(config.host) or self.tokens.enabled or config.insecure):
            raise ValueError(
                f"refusing to listen on {config.host!r} without auth: anyone who can reach "
                "it could open sockets into this network through it. Configure tokens "
                "(--token-file / --token-secret-env / --jwt-secret-env / --jwt-jwks) or "
                "pass --insecure if something in front of the gateway already authenticates")

    def adopt(self, other: "Security") -> None:
        """Enforce what `other` enforces from now on (a reload, ksw1fast.ops.reload):
        in place, as connections and their sessions hold this object."""
        self.tokens, self.origins = other.tokens, other.origins
        self.egress, self.open_token = other.egress, other.open_token

    def admit(self, path: str, headers: Headers) -> tuple[Optional[Grant], Optional[str]]:
        """Check an upgrade request: the connection's grant (None when tokens are to come
        per frame) and the subprotocol to echo; HandshakeRefused otherwise."""
        origins = header_values(headers, "origin")
        if len(origins) > 1:  # no browser sends two; which one would count is anyone's guess
            raise HandshakeRefused(403, "origin", "more than one Origin header")
        if not self.origins.allowed(origins[0] if origins else None):
            raise HandshakeRefused(403, "origin", "origin not allowed")
        offer = find_token(path, headers)
        # echoed even with auth off: a browser drops a connection whose offer is unanswered
        subprotocol = offer.subprotocol if offer is not None else None
        if not self.tokens.enabled:
            return self.tokens.verify(None), subprotocol  # the unrestricted grant
        if offer is None:
            if self.open_token:
                return None, None
            raise HandshakeRefused(401, "missing", "a token is required")
        try:
            return self.tokens.verify(offer.token), subprotocol
        except AuthError as exc:
            raise HandshakeRefused(exc.http_status, exc.kind, f"token {exc.kind}") from None

    def verify(self, token: bytes) -> Grant:
        """A token carried in a frame (Hello extension, Open); AuthError when not valid."""
        return self.tokens.verify(token)

    def check_name(self, name: str) -> Decision:
        """May a client ask for `name` at all (a DnsQuery)?"""
        return self.egress.check_name(name)

    def filter_dns(self, name: str, addresses: list[bytes]) -> list[bytes]:
        """The DnsResult answers for `name` the egress policy allows."""
        return self.egress.filter_dns(name, addresses)


def config_warnings(config: GatewayConfig) -> list[str]:
    """What a valid config allows that an operator rarely means, one line each (serve
    logs them at start-up, check-config prints them)."""
    warnings = []
    if config.jwt_jwks and config.jwt_audience is None:
        warnings.append(
            "jwt_jwks without jwt_audience: every token those keys signed without an aud "
            "claim is accepted, whichever application it was issued for; set "
            "--jwt-audience (and --jwt-issuer) to what your identity provider puts in "
            "this gateway's tokens")
    return warnings


def _jwt_verifier(config: GatewayConfig) -> Optional[JwtVerifier]:
    """The JWT verifier the config asks for (None without a key source); ValueError for
    an unset secret variable, an unusable JWKS file, or JWT settings without a source."""
    if not (config.jwt_secret_env or config.jwt_jwks):
        if config.jwt_audience is not None or config.jwt_issuer is not None:
            raise ValueError("jwt_audience and jwt_issuer need JWTs: set jwt_secret_env "
                             "or jwt_jwks")
        return None
    secret = (secret_from_env(config.jwt_secret_env, what="the JWT secret")
              if config.jwt_secret_env else None)
    jwks = load_jwks(config.jwt_jwks) if config.jwt_jwks else None
    return JwtVerifier(secret=secret, jwks=jwks, audience=config.jwt_audience,
                       issuer=config.jwt_issuer, leeway=config.jwt_leeway)
