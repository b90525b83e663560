"""Gateway settings: one frozen dataclass shared by the library API and the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ksw1fast.constants import DEFAULT_MAX_PAYLOAD
from ksw1fast.pkcs11.supervisor import Pkcs11Settings


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
    # -- operations (README "Operating") --
    workers: int = 1                 # worker processes (each its own loop and listener)
    reuse_port: bool = False         # SO_REUSEPORT listener (set for workers)
    drain_timeout: float = 30.0      # seconds open connections get after SIGTERM
    metrics_port: Optional[int] = None  # /metrics, /healthz, /readyz listener; None = off
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"         # "text" or "json"
    tls_cert: Optional[str] = None   # PEM certificate chain: serve wss://
    tls_key: Optional[str] = None    # its private key (PEM)
    pkcs11: Pkcs11Settings = field(default_factory=Pkcs11Settings)
    # -- security (README "Security") --
    token_file: Optional[str] = None       # static tokens, one per line or sha256:<hex>
    token_secret_env: Optional[str] = None  # env var holding the HMAC secret of signed tokens
    open_token: bool = False               # upgrade without a handshake token; each Open
                                           # must then carry one (OpenToken)
    allow_origins: tuple[str, ...] = ()    # Origin patterns; empty = none or localhost only
    egress: tuple[str, ...] = ()           # egress rules, first match wins (ksw1fast.policy)
    insecure: bool = False                 # listen beyond loopback without auth

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError("path must start with '/'")
        if not 0 < self.max_payload <= 0xFFFFFFFF:
            raise ValueError("max_payload must fit a u32 and be positive")
        if self.max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        for name in ("send_buffer_limit", "max_dns_queries", "max_lookups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("handshake_timeout", "connect_timeout", "dns_timeout", "send_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("idle_ping", "max_open_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.workers < 1 or self.drain_timeout < 0:
            raise ValueError("workers must be >= 1 and drain_timeout >= 0")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
