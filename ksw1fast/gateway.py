"""The listening gateway: picows server, path routing and the embedding API."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import weakref
from typing import Any, Optional
from urllib.parse import urlsplit

from picows import (WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener,
                    ws_create_server)

from ksw1fast import metrics
from ksw1fast._impl import CODEC
from ksw1fast._version import __version__
from ksw1fast.config import GatewayConfig
from ksw1fast.connection import Connection, refusals
from ksw1fast.constants import HEADER_SIZE
from ksw1fast.errors import ListenError
from ksw1fast.pkcs11.supervisor import NoModule, make_provider
from ksw1fast.resolve import Resolver
from ksw1fast.security import HandshakeRefused, Security

log = logging.getLogger("ksw1fast")
_PICOWS_LOG = logging.LoggerAdapter(logging.getLogger("picows.server"), {})


class Gateway:
    """A running KSW1 gateway; `await close()` (or `async with`) stops it."""

    def __init__(self, config: GatewayConfig, pkcs11_backend: Any = None) -> None:
        """`pkcs11_backend`: see `ksw1fast.pkcs11.supervisor` (a backend shared by every
        connection, or a provider with `for_connection()`); default: agents for
        `config.pkcs11`, or a backend answering "no PKCS#11 module configured"."""
        self.config = config
        self.security = Security(config)  # ValueError for settings that do not fit
        self.resolver = Resolver(config.max_lookups, config.dns_timeout)
        self._pkcs11 = pkcs11_backend or make_provider(config.pkcs11) or NoModule()
        # weak: a connection whose upgrade fails never reports its end
        self.connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._server: Optional[asyncio.AbstractServer] = None
        self._byte_counter: Optional[asyncio.Task] = None
        self._keepalive: Optional[asyncio.Task] = None
        self.draining = False

    async def start(self) -> "Gateway":
        """Listen; ListenError (one line: the address and the cause) when it cannot."""
        cfg = self.config
        tls = self._tls_context()  # before listening: a bad certificate is no bind error
        start = getattr(self._pkcs11, "start", None)
        if start is not None:
            await start()
        try:
            self._server = await self._listen(tls)
        except OSError as exc:
            await self._close_pkcs11()  # the agents it pre-started
            raise ListenError(cfg.host, cfg.port, exc) from exc
        self._byte_counter = asyncio.ensure_future(self._count_bytes())
        if cfg.idle_ping > 0:
            self._keepalive = asyncio.ensure_future(self._keep_alive(cfg.idle_ping / 2))
        # here, not at import: agents import this package too, and are not gateways
        metrics.BUILD_INFO.labels(__version__, CODEC).set(1)
        log.info("ksw1fast serving %s", self.address)
        return self

    async def _listen(self, tls: Optional[ssl.SSLContext]) -> asyncio.AbstractServer:
        cfg = self.config
        return await ws_create_server(
            self._route, cfg.host, cfg.port,
            websocket_handshake_timeout=cfg.handshake_timeout,
            # one WebSocket frame may carry one maximal KSW1 frame; our parser bounds the rest
            max_frame_size=cfg.max_payload + HEADER_SIZE,
            enable_auto_ping=False,  # a task per connection: one sweep for all instead
            use_aiofastnet=False,  # uvloop's own transports: pause_reading and write limits
            # an idle connection should cost little: picows grows the buffer when needed
            read_buffer_init_size=2048,
            # not a logging.Logger: picows would make a child Logger per connection
            logger_name=_PICOWS_LOG,
            ssl=tls,
            reuse_port=cfg.reuse_port or None,
        )

    async def _keep_alive(self, period: float) -> None:
        """Keepalive (spec §11): the client never pings, and balancers drop upgraded
        connections idle for 30-60 s.  Every `period` seconds each connection pings a
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
        return self._server is not None and not self.draining

    async def drain(self, timeout: float) -> None:
        """Stop accepting, give open connections `timeout` seconds to finish, then close
        the rest with 1001 (going away)."""
        self.draining = True
        if self._server is not None:
            self._server.close()  # listening sockets only: open connections carry on
        drain = getattr(self._pkcs11, "drain", None)
        if drain is not None:  # e.g. a shared PKCS#11 agent that dies now stays dead
            drain()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        if self.connections:
            log.info("drain timeout: closing %d connection(s) with 1001", len(self.connections))
        await self.close()

    def _tls_context(self) -> Optional[ssl.SSLContext]:
        if not self.config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

    @property
    def port(self) -> int:
        assert self._server is not None, "gateway not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.config.tls_cert else "ws"
        return f"{scheme}://{host}:{self.port}{self.config.path}"

    def _route(self, request: WSUpgradeRequest) -> Optional[WSUpgradeResponseWithListener]:
        path = request.path.decode("latin-1")
        url_path = urlsplit(path).path
        if url_path != self.config.path:
            # the path only, never the query (it may carry ?token=); repr: no log injection
            refusals.info("handshake refused status=404 reason=unknown path %r", url_path[:100])
            return None  # picows answers 404
        try:
            grant, subprotocol = self.security.admit(path, request.headers)
        except HandshakeRefused as exc:
            refusals.info("handshake refused status=%d reason=%s", exc.status, exc)
            if exc.kind == "origin":
                metrics.POLICY_DENIALS.labels("origin").inc()
            else:
                metrics.AUTH_FAILURES.labels(exc.kind).inc()
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(exc.status, str(exc).encode()), None)
        for_connection = getattr(self._pkcs11, "for_connection", None)
        backend = for_connection() if for_connection is not None else self._pkcs11
        conn = Connection(self.config, self.connections.discard, backend, self.security,
                          self.resolver, grant)
        self.connections.add(conn)
        # a browser that offered subprotocols drops the connection unless one is echoed
        headers = {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(headers), conn)

    async def close(self) -> None:
        """Stop listening and close every connection with 1001 (going away)."""
        if self._server is None:
            return
        self._server.close()
        for task in (self._byte_counter, self._keepalive):
            if task is not None:
                task.cancel()
        for conn in list(self.connections):
            conn.go_away()
        await self._server.wait_closed()
        self._server = None
        self.resolver.close()
        await self._close_pkcs11()

    async def _close_pkcs11(self) -> None:
        close = getattr(self._pkcs11, "close", None)
        if close is not None:
            await close()

    async def __aenter__(self) -> "Gateway":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


async def start_gateway(host: str = GatewayConfig.host, port: int = GatewayConfig.port,
                        path: str = GatewayConfig.path, *, pkcs11_backend: Any = None,
                        **settings: Any) -> Gateway:
    """Start a gateway on the running loop; `settings` are further GatewayConfig fields.

    `pkcs11_backend` replaces the built-in PyKCS11 agents: any object with
    `async handle(fn_id: int, args: bytes) -> (status, body)` (pkcs11-rpc.md).

    The loop should be uvloop's (`uvloop.run(...)`): the relay is tuned for its
    transports, though any asyncio loop works.
    """
    config = dataclasses.replace(GatewayConfig(), host=host, port=port, path=path, **settings)
    return await Gateway(config, pkcs11_backend).start()
