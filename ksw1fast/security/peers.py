"""The real client address behind proxies and load balancers.

Two ways a proxy passes it on, and ksw1fast believes neither from just anyone:

- the PROXY protocol (v1 text or v2 binary, as HAProxy's `send-proxy[-v2]` and AWS NLB
  send it): a header in front of the TCP stream, read off the socket before TLS or
  HTTP; with `--proxy-protocol` every connection must start with one;
- `X-Forwarded-For` or `Forwarded` (RFC 7239, `for=`) in the upgrade request, whichever
  one `--forwarded-header` names (the one the proxies set: a proxy passes the other on
  untouched, so a client could write it), honoured only when the connection comes from
  a `--trusted-proxy` network. The address is the nearest hop that is not itself a
  trusted proxy, read from the right: a client can prepend anything, but only the
  proxies append.

Parsing the PROXY header is the `proxy-protocol` library's; this module reads exactly
the header's bytes (so what follows, a TLS ClientHello say, stays on the socket) and
decides which address to believe.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Iterable, NamedTuple, Optional

from proxyprotocol import ProxyProtocolIncompleteError
from proxyprotocol.detect import ProxyProtocolDetect

from ksw1fast.security.handshake import Headers, header_values
from ksw1fast.protocol.errors import KSW1Error
from ksw1fast.security.egress import IPNetwork, to_address
from ksw1fast.security.readiness import readable

V1_MAX_LINE = 107  # the longest v1 header, CRLF included (the protocol's own bound)
_DETECT = ProxyProtocolDetect()


class Peer(NamedTuple):
    """Where a connection comes from: the address its socket, its PROXY header or its
    trusted proxies' headers say (those give no port)."""

    host: str
    port: Optional[int] = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


class ProxyHeaderError(KSW1Error):
    """The connection did not start with a valid PROXY protocol header."""


async def read_proxy_header(sock: socket.socket) -> Optional[Peer]:
    """Read the PROXY protocol header off a fresh non-blocking socket, exactly: the
    client it names, or None for a header naming none (v1 UNKNOWN, v2 LOCAL: a health
    check by the proxy itself). ProxyHeaderError for anything else."""
    data = b""
    while True:
        try:
            result = _DETECT.unpack(data)
            break
        except ProxyProtocolIncompleteError as incomplete:
            want = incomplete.want_read
            if want.want_line:
                data += await _line(sock, V1_MAX_LINE - len(data))
            else:
                data += await _exactly(sock, want.want_bytes or 1)
        except Exception as exc:  # the library's syntax errors, bad addresses and ports
            raise ProxyHeaderError(f"bad PROXY protocol header: {exc}") from None
    peer = getattr(result, "peername", None)  # none for UNKNOWN and LOCAL
    return Peer(str(peer[0]), int(peer[1])) if result.proxied and peer else None


async def _recv(sock: socket.socket, size: int, flags: int = 0) -> bytes:
    while True:
        try:
            data = sock.recv(size, flags)
        except (BlockingIOError, InterruptedError):
            await readable(sock)
            continue
        if not data:
            raise ProxyHeaderError("connection closed before the PROXY protocol header ended")
        return data


async def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await _recv(sock, size - len(data))
    return data


async def _line(sock: socket.socket, limit: int) -> bytes:
    """Up to and including the next LF, never reading past it: a peek finds it, and
    what holds no LF is all part of the line, so it is taken before waiting for more."""
    line = b""
    while len(line) < limit:
        peeked = await _recv(sock, limit - len(line), socket.MSG_PEEK)
        end = peeked.find(b"\n")
        if end >= 0:
            return line + await _exactly(sock, end + 1)
        line += await _exactly(sock, len(peeked))
    raise ProxyHeaderError("PROXY protocol v1 line too long")


FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")


class TrustedProxies:
    """Networks whose forwarding header is believed (`--trusted-proxy CIDR`), and which
    header that is (`--forwarded-header`)."""

    def __init__(self, cidrs: Iterable[str] = (), header: str = "x-forwarded-for") -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)
        self._hops = forwarded_for if header == "forwarded" else x_forwarded_for

    def trusts(self, address: str) -> bool:
        try:
            ip = to_address(address)
        except ValueError:
            return False
        return any(ip.version == net.version and ip in net for net in self.networks)

    def client_of(self, peer: Peer, headers: Headers) -> Peer:
        """The client: `peer`, or, when `peer` is a trusted proxy, the nearest untrusted
        hop its forwarding header names; `peer` when it names none."""
        if not self.networks or not self.trusts(peer.host):
            return peer
        hops = self._hops(headers)
        for hop in reversed(hops):
            if not self.trusts(hop):
                return Peer(hop)
        return Peer(hops[0]) if hops else peer


def _address(text: str) -> Optional[str]:
    """An IP address out of one hop: `1.2.3.4`, `1.2.3.4:80`, `[::1]:80`, `"[::1]"`;
    None for an obfuscated identifier (`_hidden`, `unknown`) or garbage."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def forwarded_for(headers: Headers) -> list[str]:
    """The `for=` addresses of every Forwarded header (RFC 7239), in order."""
    hops = []
    for value in header_values(headers, "forwarded"):
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, token = pair.strip().partition("=")
                if name.lower() == "for":
                    address = _address(token)
                    if address is not None:
                        hops.append(address)
    return hops


def x_forwarded_for(headers: Headers) -> list[str]:
    """The addresses of every X-Forwarded-For header, in order."""
    return [address for value in header_values(headers, "x-forwarded-for")
            for address in map(_address, value.split(",")) if address is not None]
