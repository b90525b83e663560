"""Gateway settings: one frozen dataclass shared by the library API and the CLI."""
from __future__ import annotations

import importlib
import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Union

from ksw1fast.protocol.constants import DEFAULT_MAX_PAYLOAD
from ksw1fast.security.egress import Rule
from ksw1fast.security.peers import FORWARDED_HEADERS
from ksw1fast.errors import AT_LEAST_1, NOT_NEGATIVE, POSITIVE, MissingExtra, SettingCheck, check_settings
from ksw1fast.pkcs11.settings import Pkcs11Settings

# what the audit trail says: "security" (handshakes, refusals, limits, PKCS#11 logins
# and failures) or "all" (also every allowed Open, DNS answer and PKCS#11 key use)
AUDIT_LEVELS = ("security", "all")


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8088
    path: str = "/ws"
    max_streams: int = 1024          # per connection; a Hello may ask for fewer
    max_payload: int = DEFAULT_MAX_PAYLOAD
    handshake_timeout: float = 5.0   # seconds for the HTTP upgrade request to arrive
    connect_timeout: float = 10.0    # resolve + TCP connect of one Open
    dns_timeout: float = 5.0         # one DnsQuery
    max_dns_queries: int = 64        # DnsQuery lookups in flight per connection
    max_open_rate: float = 200.0     # Opens and DnsQueries a second per connection; 0 = off
    max_lookups: int = 1024          # name lookups in flight per worker (DNS and Opens)
    send_buffer_limit: int = 4 << 20  # bytes queued for a client before it is no longer read
    send_timeout: float = 30.0       # seconds a client may stay over that before 1008
    idle_ping: float = 20.0          # keepalive: a client silent up to this long is pinged,
                                     # closed (1001) if the ping stays unanswered for half
                                     # as long again; 0 = off
    # -- operations (docs/operations.md) --
    workers: int = 1                 # worker processes (each its own loop and listener)
    reuse_port: bool = False         # SO_REUSEPORT listener (set for workers)
    drain_timeout: float = 30.0      # seconds open connections get after SIGTERM
    metrics_port: Optional[int] = None  # /metrics, /healthz, /readyz listener; None = off
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"         # "text" or "json"
    audit_log: Optional[str] = None  # append the audit trail to this file (else: the log)
    audit: str = "security"          # "all": also what is allowed (ksw1fast.ops.audit)
    tls_cert: Optional[str] = None   # PEM certificate chain: serve wss://
    tls_key: Optional[str] = None    # its private key (PEM)
    tls_client_ca: Optional[str] = None  # CA certificates (PEM): require client
                                         # certificates they signed (mutual TLS)
    pkcs11: Pkcs11Settings = field(default_factory=Pkcs11Settings)
    # -- security (docs/security.md) --
    token_file: Optional[str] = None       # static tokens, one per line or sha256:<hex>
    token_secret_env: Optional[str] = None  # env var holding the HMAC secret of signed tokens
    # JSON Web Tokens (ksw1fast.security.jwt_tokens): either key source enables them
    jwt_secret_env: Optional[str] = None   # env var holding the HS256 secret
    jwt_jwks: Optional[str] = None         # JWKS file of RS256/ES256/EdDSA public keys
    jwt_audience: Optional[str] = None     # then every JWT must have this `aud`
    jwt_issuer: Optional[str] = None       # then every JWT must have this `iss`
    jwt_leeway: float = 30.0               # seconds of clock skew for exp, nbf and iat
    open_token: bool = False               # upgrade without a handshake token; each Open
                                           # must then carry one (OpenToken)
    allow_origins: tuple[str, ...] = ()    # Origin patterns; empty = none or localhost only
    # egress rules, first match wins (ksw1fast.security.egress): strings from flags, the
    # rules the config file parsed
    egress: tuple[Union[Rule, str], ...] = ()
    insecure: bool = False                 # listen beyond loopback without auth
    # -- operators' limits and the real client address (docs/operations.md) --
    max_connections: int = 4096            # upgraded connections per worker
    max_connections_per_ip: int = 256      # per worker, per client address (see below)
    proxy_protocol: bool = False           # every connection starts with a PROXY header
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose forwarding header counts
    forwarded_header: str = "x-forwarded-for"  # or "forwarded" (RFC 7239): what they set

    def __post_init__(self) -> None:
        check_settings(self, _CHECKS)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")

    def require_extras(self) -> None:
        """MissingExtra when a setting needs an optional package that does not import:
        found before serving, rather than as a traceback or a warning per agent later."""
        if self.pkcs11.lib:
            _require_extra("PyKCS11", "pkcs11", "--pkcs11-lib")
        if self.metrics_port is not None:
            _require_extra("prometheus_client", "metrics", "--metrics-port")


_PORT: SettingCheck = (lambda v: 0 <= v <= 65535, "must be 0-65535")
_NOT_EMPTY: SettingCheck = (lambda v: bool(v), "must not be empty")
_CHECKS: dict[str, SettingCheck] = {
    "port": _PORT, "metrics_port": _PORT,
    "path": (lambda v: v.startswith("/"), "must start with '/'"),
    "max_streams": AT_LEAST_1,
    "max_payload": (lambda v: 0 < v <= 0xFFFFFFFF, "must be 1-4294967295 (a u32)"),
    "send_buffer_limit": AT_LEAST_1, "max_dns_queries": AT_LEAST_1, "max_lookups": AT_LEAST_1,
    "max_open_rate": NOT_NEGATIVE,
    "max_connections": AT_LEAST_1, "max_connections_per_ip": AT_LEAST_1,
    "trusted_proxies": (lambda v: all(_is_network(c) for c in v),
                        "must be networks such as 10.0.0.0/8 or fd00::/8"),
    "forwarded_header": (lambda v: v in FORWARDED_HEADERS,
                         "must be 'x-forwarded-for' or 'forwarded'"),
    "handshake_timeout": POSITIVE, "connect_timeout": POSITIVE, "dns_timeout": POSITIVE,
    "send_timeout": POSITIVE, "idle_ping": NOT_NEGATIVE,
    "workers": AT_LEAST_1, "drain_timeout": NOT_NEGATIVE,
    "log_format": (lambda v: v in ("text", "json"), "must be 'text' or 'json'"),
    "audit": (lambda v: v in AUDIT_LEVELS, "must be 'security' or 'all'"),
    "jwt_audience": _NOT_EMPTY, "jwt_issuer": _NOT_EMPTY,
    "jwt_leeway": (lambda v: 0 <= v <= 3600, "must be 0-3600 (seconds)"),
}


def _require_extra(module: str, extra: str, needed_by: str) -> None:
    """MissingExtra unless `module` imports (an import, not a look-up: a package whose
    compiled part does not load is as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{needed_by} needs {module}, which is not installed: "
                           f"pip install 'ksw1fast[{extra}]'") from None


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return False
    return True
