"""The operations listener: /metrics (Prometheus text), /healthz and /readyz.

A separate port from the WebSocket (`--metrics-port`, off by default), so it can stay
private while the gateway faces browsers.  Deliberately tiny: GET only, one request per
connection, bounded reads.  /healthz answers 200 with a small JSON body saying the
version and the codec: this process's, or in a supervisor each live worker's.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Optional

from ksw1fast.ops import metrics
from ksw1fast.extensions import CODEC
from ksw1fast._version import __version__
from ksw1fast.errors import ListenError

log = logging.getLogger("ksw1fast")

_MAX_REQUEST = 8192
_TIMEOUT = 5.0


def process_health() -> dict[str, Any]:
    """/healthz of a gateway process."""
    return {"status": "ok", "version": __version__, "codec": CODEC}


def workers_health() -> dict[str, Any]:
    """/healthz of a supervisor: its live workers, as their metrics report them."""
    return {"status": "ok", "version": __version__, "workers": metrics.worker_codecs()}


class OpsServer:
    """`is_ready()` answers /readyz: accepting connections, not draining; `health()` is
    the body of /healthz."""

    def __init__(self, is_ready: Callable[[], bool],
                 health: Callable[[], dict[str, Any]] = process_health) -> None:
        self._is_ready = is_ready
        self._health = health
        self._server: Optional[asyncio.Server] = None

    async def start(self, host: str, port: int) -> "OpsServer":
        """Listen; ListenError (one line: the address and the cause) when it cannot."""
        if not metrics.AVAILABLE:
            raise RuntimeError("--metrics-port needs prometheus_client: "
                               "pip install 'ksw1fast[metrics]'")
        try:
            self._server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:
            raise ListenError(host, port, exc) from exc
        log.info("ksw1fast metrics and health on http://%s:%d/metrics", host, self.port)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _respond(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            body, content_type = metrics.render()
            return 200, body, content_type
        if path == "/healthz":
            return 200, json.dumps(self._health()).encode() + b"\n", "application/json"
        if path == "/readyz":
            ready = self._is_ready()
            return (200, b"ready\n", "text/plain") if ready else (503, b"draining\n",
                                                                   "text/plain")
        return 404, b"not found\n", "text/plain"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _TIMEOUT)
            method, path, _ = head[:_MAX_REQUEST].split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method != "GET":
                status, body, content_type = 405, b"GET only\n", "text/plain"
            else:
                status, body, content_type = self._respond(path.split("?", 1)[0])
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (
                             status, _REASONS[status], content_type.encode(), len(body)) + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, ConnectionError):
            pass  # a malformed or slow request just gets the connection closed
        finally:
            writer.close()


_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed",
            503: b"Service Unavailable"}
