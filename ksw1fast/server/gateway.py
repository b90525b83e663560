"""The listening gateway: accepting, the real client address, limits, path routing,
and the embedding API."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from functools import partial
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from picows import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener
from picows.picows import _validate_upgrade_request  # type: ignore[attr-defined]  # not in
                                                     # picows' stubs; picows is pinned

from ksw1fast.ops import audit, metrics
from ksw1fast.extensions import CODEC
from ksw1fast._version import __version__
from ksw1fast.config import GatewayConfig
from ksw1fast.server.connection import Connection, refusals
from ksw1fast.protocol.constants import HEADER_SIZE
from ksw1fast.errors import ListenError, TlsError
from ksw1fast.server.limits import ConnectionLimits
from ksw1fast.server.listener import Listener, bind, ws_protocol
from ksw1fast.security.peers import Peer, ProxyHeaderError, TrustedProxies, read_proxy_header
from ksw1fast.pkcs11.backend import Closable, Drainable, Pkcs11Backend, Provider, Startable
from ksw1fast.pkcs11.supervisor import NoModule, make_provider
from ksw1fast.security.resolve import Resolver
from ksw1fast.security.gate import HandshakeRefused, Security
from ksw1fast.security.handshake import header_values
from ksw1fast.protocol.close import CLOSE_TIMEOUT

log = logging.getLogger("ksw1fast")
RETRY_AFTER = 5  # seconds, in the 503 of a handshake over a connection limit


class Gateway:
    """A running KSW1 gateway; `await close()` (or `async with`) stops it."""

    def __init__(self, config: GatewayConfig, pkcs11_backend: Any = None,
                 security: Optional[Security] = None) -> None:
        """`pkcs11_backend`: see `ksw1fast.pkcs11.supervisor` (a backend shared by every
        connection, or a provider with `for_connection()`); default: agents for
        `config.pkcs11`, or a backend answering "no PKCS#11 module configured".
        `security`: what `config` enforces, when the caller built it already."""
        self.config = config
        # ValueError for settings that do not fit
        self.security = security if security is not None else Security(config)
        self.resolver = Resolver(config.max_lookups, config.dns_timeout)
        self._pkcs11: Union[Pkcs11Backend, Provider] = (
            pkcs11_backend or make_provider(config.pkcs11) or NoModule())
        self.limits = ConnectionLimits(config.max_connections, config.max_connections_per_ip)
        self.proxies = TrustedProxies(config.trusted_proxies, config.forwarded_header)
        # upgraded connections: an upgrade request is checked before its Connection exists,
        # so every one of them reports its end (on_ws_disconnected)
        self.connections: set[Connection] = set()
        self._listener: Optional[Listener] = None
        self._tls: Optional[ssl.SSLContext] = None
        self._accepting: set[asyncio.Task] = set()  # sockets in their PROXY header or TLS
        self._closing = False
        self._byte_counter: Optional[asyncio.Task] = None
        self._keepalive: Optional[asyncio.Task] = None
        self.draining = False

    async def start(self) -> "Gateway":
        """Listen; ListenError (one line: the address and the cause) when it cannot."""
        cfg = self.config
        audit.configure(cfg.audit)
        self._tls = self._tls_context()  # before listening: a bad certificate is no bind error
        if isinstance(self._pkcs11, Startable):
            await self._pkcs11.start()
        try:
            sock = bind(cfg.host, cfg.port, cfg.reuse_port)
        except OSError as exc:
            await self._close_pkcs11()  # the agents it pre-started
            raise ListenError(cfg.host, cfg.port, exc) from exc
        self._listener = Listener(sock, self._accepted)
        self._listener.start()
        self._byte_counter = asyncio.ensure_future(self._count_bytes())
        if cfg.idle_ping > 0:
            self._keepalive = asyncio.ensure_future(self._keep_alive(cfg.idle_ping / 2))
        # here, not at import: agents import this package too, and are not gateways
        metrics.BUILD_INFO.labels(__version__, CODEC).set(1)
        log.info("ksw1fast serving %s", self.address)
        return self

    def _accepted(self, sock: socket.socket, address: tuple) -> None:
        task = asyncio.get_running_loop().create_task(self._accept(sock, Peer(*address[:2])))
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)

    async def _accept(self, sock: socket.socket, peer: Peer) -> None:
        """One accepted socket: its PROXY header (with --proxy-protocol), then TLS and the
        WebSocket upgrade through picows, routed by _route."""
        cfg = self.config
        if cfg.proxy_protocol:
            try:
                proxied = await asyncio.wait_for(read_proxy_header(sock), cfg.handshake_timeout)
                if proxied is not None:  # else the proxy's own check: its socket's address
                    peer = proxied
            except (ProxyHeaderError, asyncio.TimeoutError) as exc:
                reason = str(exc) or "no PROXY protocol header in time"
                refusals.info("connection refused peer=%s reason=%s", peer, reason)
                metrics.child(metrics.LIMITS, "proxy_protocol").inc()
                audit.refusal("limit", "reached", limit="proxy_protocol", peer=peer,
                              reason=reason)
                sock.close()
                return
        # one WebSocket frame may carry one maximal KSW1 frame; our parser bounds the rest
        made: list[Any] = []  # the protocol, for _route to find the client's certificate

        def protocol() -> Any:
            made.append(ws_protocol(partial(self._route, peer, made=made),
                                    cfg.handshake_timeout, cfg.max_payload + HEADER_SIZE))
            return made[0]

        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                protocol, sock, ssl=self._tls,
                ssl_handshake_timeout=cfg.handshake_timeout if self._tls else None)
        except (OSError, asyncio.TimeoutError) as exc:  # a failed TLS handshake, say
            refusals.info("connection refused peer=%s reason=%s", peer, exc)
            audit.refusal("handshake", "refused", peer=peer, reason="tls",
                          detail=str(exc) or type(exc).__name__)

    async def _keep_alive(self, period: float) -> None:
        """Keepalive (docs/protocol.md §11): the client never pings, and balancers drop
        upgraded connections idle for 30-60 s.  Every `period` seconds each connection pings a
        silent client or closes one that left the last ping unanswered."""
        while True:
            await asyncio.sleep(period)
            for conn in list(self.connections):
                conn.keepalive()

    async def _count_bytes(self) -> None:
        """Harvest the streams' byte counters into the metrics once a second."""
        while True:
            await asyncio.sleep(1.0)
            for conn in list(self.connections):
                conn.count_bytes()

    @property
    def ready(self) -> bool:
        """Accepting connections (for /readyz)."""
        return self._listener is not None and not self.draining

    async def drain(self, timeout: float) -> None:
        """Stop accepting, give open connections `timeout` seconds to finish, then close
        the rest with 1001 (going away)."""
        self.draining = True
        if self._listener is not None:
            self._listener.close()  # the listening socket only: open connections carry on
        if isinstance(self._pkcs11, Drainable):  # e.g. a shared agent that dies stays dead
            self._pkcs11.drain()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        if self.connections:
            log.info("drain timeout: closing %d connection(s) with 1001", len(self.connections))
        await self.close()

    def _tls_context(self) -> Optional[ssl.SSLContext]:
        return tls_context(self.config)

    def reload(self, config: GatewayConfig, security: Security,
               tls: Optional[ssl.SSLContext]) -> None:
        """Serve new handshakes and new Opens with `config`, `security` and `tls` (built
        and checked by the caller, ksw1fast.ops.reload); open connections and streams
        carry on. `security` replaces what the running Security enforces in place, so
        the open connections' next Opens and tokens meet it too; their grants stay.
        The listener, the limits and the PKCS#11 agents keep `self.config`'s settings:
        only those ksw1fast.ops.reload.RELOADABLE names should differ."""
        self.config = config
        self.security.adopt(security)
        if self._tls is not None and tls is not None:  # each accept takes self._tls
            self._tls = tls

    @property
    def port(self) -> int:
        assert self._listener is not None, "gateway not started"
        return self._listener.port

    @property
    def address(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.config.tls_cert else "ws"
        return f"{scheme}://{host}:{self.port}{self.config.path}"

    def _route(self, peer: Peer, request: WSUpgradeRequest,
               made: Optional[list[Any]] = None) -> Optional[WSUpgradeResponseWithListener]:
        """An upgrade request from `peer` (after its PROXY header) on the picows protocol
        in `made`: refused with its HTTP status, or a Connection for it (counted until it
        ends)."""
        # taken out of `made`: the protocol holds this callback, which holds `made`, and a
        # cycle would leave every closed connection to the cyclic garbage collector
        protocol = made.pop() if made else None
        client = self.proxies.client_of(peer, request.headers)
        path = request.path.decode("latin-1")
        url_path = urlsplit(path).path
        if url_path != self.config.path:
            # the path only, never the query (it may carry ?token=); repr: no log injection
            refusals.info("handshake refused peer=%s status=404 reason=unknown path %r",
                          client, url_path[:100])
            audit.refusal("handshake", "refused", peer=client, status=404,
                          reason="unknown path", path=url_path[:100])
            return None  # picows answers 404
        try:
            _validate_upgrade_request(request)  # as picows will, before anything is counted
            over = self.limits.admit(client.host)
            if over is not None:
                metrics.child(metrics.LIMITS, over).inc()
                audit.refusal("limit", "reached", limit=over, peer=client)
                raise HandshakeRefused(503, over, f"over the {over.replace('_', ' ')} limit")
            try:
                grant, subprotocol = self.security.admit(path, request.headers)
            except HandshakeRefused:
                self.limits.release(client.host)
                raise
        except RuntimeError as exc:  # picows' word for a request that is no upgrade
            return _refuse(client, HandshakeRefused(400, "malformed", str(exc)), request)
        except HandshakeRefused as exc:
            if exc.kind == "origin":
                metrics.POLICY_DENIALS.labels("origin").inc()
            elif exc.status in (401, 403):
                metrics.AUTH_FAILURES.labels(exc.kind).inc()
            return _refuse(client, exc, request)
        if (grant is not None and grant.subject is None and protocol is not None
                and self.config.tls_client_ca):
            subject = _client_subject(protocol)  # mutual TLS: who the certificate names
            if subject is not None:
                grant = dataclasses.replace(grant, subject=subject)
        backend: Pkcs11Backend
        if isinstance(self._pkcs11, Provider):
            backend, shared = self._pkcs11.for_connection(), False
        else:
            backend, shared = self._pkcs11, True
        conn = Connection(self.config, self._closed, backend, self.security, self.resolver,
                          grant, client, shared_pkcs11=shared)
        self.connections.add(conn)
        if audit.enabled():
            audit.record("handshake", "accepted", peer=client,
                         **(audit.identity(grant) if grant is not None
                            else {"token": "per_request"}),
                         origin=_origin(request))
        # a browser that offered subprotocols drops the connection unless one is echoed
        headers = {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(headers), conn)

    def _closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.limits.release(conn.peer.host)

    async def close(self) -> None:
        """Stop listening and close every connection with 1001 (going away), waiting for
        their answering Closes (at most CLOSE_TIMEOUT, after which they end anyway)."""
        if self._listener is None or self._closing:
            return
        self._closing = True
        self._listener.close()
        for task in (self._byte_counter, self._keepalive, *self._accepting):
            if task is not None:
                task.cancel()
        for conn in list(self.connections):
            conn.go_away()
        deadline = asyncio.get_running_loop().time() + CLOSE_TIMEOUT + 1
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.resolver.close()
        await self._close_pkcs11()

    async def _close_pkcs11(self) -> None:
        if isinstance(self._pkcs11, Closable):
            await self._pkcs11.close()

    async def __aenter__(self) -> "Gateway":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


async def start_gateway(host: str = GatewayConfig.host, port: int = GatewayConfig.port,
                        path: str = GatewayConfig.path, *, pkcs11_backend: Any = None,
                        **settings: Any) -> Gateway:
    """Start a gateway on the running loop; `settings` are further GatewayConfig fields.

    `pkcs11_backend` replaces the built-in PyKCS11 agents: any object with
    `async handle(fn_id: int, args: bytes) -> (status, body)` answering the RPC of
    docs/pkcs11.md.

    The loop should be uvloop's (`uvloop.run(...)`): the relay is tuned for its
    transports, though any asyncio loop works.
    """
    config = dataclasses.replace(GatewayConfig(), host=host, port=port, path=path, **settings)
    return await Gateway(config, pkcs11_backend).start()


def tls_context(config: GatewayConfig) -> Optional[ssl.SSLContext]:
    """The server context of `config.tls_cert` and `config.tls_key` (None without them);
    TlsError, one line naming the files, when they cannot be loaded."""
    cert, key = config.tls_cert, config.tls_key
    if not cert or not key:
        return None
    for setting, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            open(path, "rb").close()
        except OSError as exc:
            raise TlsError(f"{setting} {path}: cannot read it: "
                           f"{(exc.strerror or str(exc)).lower()}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:  # a password callback: OpenSSL would prompt on the terminal for an encrypted key
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"tls_key {key} is not the private key of tls_cert {cert}") from None
        raise TlsError(f"tls_cert {cert} and tls_key {key}: not a PEM certificate chain and "
                       f"its unencrypted private key ({exc.reason or exc.library or 'PEM'})"
                       ) from None
    if config.tls_client_ca:
        _require_client_certificates(context, config.tls_client_ca)
    return context


def _require_client_certificates(context: ssl.SSLContext, cafile: str) -> None:
    """Mutual TLS: a handshake without a client certificate that `cafile`'s CAs signed
    fails; TlsError when the file cannot be loaded."""
    try:
        context.load_verify_locations(cafile=cafile)
    except OSError as exc:  # FileNotFoundError, or ssl.SSLError: no PEM certificates
        reason = ("not PEM CA certificates" if isinstance(exc, ssl.SSLError)
                  else f"cannot read it: {(exc.strerror or str(exc)).lower()}")
        raise TlsError(f"tls_client_ca {cafile}: {reason}") from None
    context.verify_mode = ssl.CERT_REQUIRED


def _client_subject(protocol: Any) -> Optional[str]:
    """The subject (RFC 4514) of the certificate the client of `protocol` presented,
    None without one (no TLS, or no --tls-client-ca)."""
    ssl_object = protocol.transport.underlying_transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:  # OpenSSL took it, cryptography's stricter DER parser does not
        return None


def _refuse(client: Peer, refused: HandshakeRefused,
            request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
    """The HTTP answer to a refused upgrade request, logged (throttled) with its reason."""
    refusals.info("handshake refused peer=%s status=%d reason=%s", client, refused.status,
                  refused)
    audit.refusal("handshake", "refused", peer=client, status=refused.status,
                  reason=refused.kind, detail=str(refused), origin=_origin(request))
    headers = {"Retry-After": str(RETRY_AFTER)} if refused.status == 503 else None
    return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
        refused.status, str(refused).encode(), headers), None)


def _origin(request: WSUpgradeRequest) -> Optional[str]:
    """The request's Origin for the audit trail (several joined; the audit quotes them)."""
    origins = header_values(request.headers, "origin")
    return ", ".join(origins)[:200] if origins else None
