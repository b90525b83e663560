"""Asynchronous name resolution and connect, with errors mapped to KSW1 codes."""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from typing import NamedTuple, Optional

from ksw1fast.constants import DnsErrCode, OpenErrCode
from ksw1fast.policy import EgressPolicy, IPAddress

_FAMILIES = {0: socket.AF_UNSPEC, 4: socket.AF_INET, 6: socket.AF_INET6}
_NO_NAME = {socket.EAI_NONAME} | {getattr(socket, n) for n in ("EAI_NODATA", "EAI_ADDRFAMILY")
                                  if hasattr(socket, n)}
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH}
_LITERAL_CHARS = frozenset("0123456789abcdefABCDEF.:")


class ResolveError(Exception):
    """A lookup failed; `dns_code` says how, as a DnsErr code."""

    def __init__(self, dns_code: DnsErrCode, message: str) -> None:
        super().__init__(message)
        self.dns_code = dns_code


class Blocked(Exception):
    """The egress policy denies the destination (OpenErr Blocked)."""


class Endpoint(NamedTuple):
    family: int
    sockaddr: tuple  # what socket.connect takes for `family`


def _strip_scope(host: str) -> str:
    return host.split("%", 1)[0]


async def lookup(name: str, port: int = 0, family: int = 0) -> list[Endpoint]:
    """Resolve `name` (or parse a literal) to TCP endpoints, in resolver order, deduplicated.

    `family` is the KSW1 DnsQuery family: 0 any, 4 or 6.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, port, family=_FAMILIES[family],
                                       type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        code = DnsErrCode.NX_DOMAIN if exc.errno in _NO_NAME else DnsErrCode.SERVER_FAILURE
        raise ResolveError(code, f"cannot resolve {name!r}: {exc.strerror}") from None
    except UnicodeError:  # not encodable as an IDNA name
        raise ResolveError(DnsErrCode.FORMAT_ERROR, f"invalid host name {name!r}") from None
    seen: set[tuple] = set()
    endpoints = []
    for fam, _type, _proto, _canon, sockaddr in infos:
        if sockaddr not in seen:
            seen.add(sockaddr)
            endpoints.append(Endpoint(fam, sockaddr))
    if not endpoints:
        raise ResolveError(DnsErrCode.NX_DOMAIN, f"{name!r} has no addresses")
    return endpoints


def address_bytes(endpoint: Endpoint) -> bytes:
    """The raw 4- or 16-byte address of an endpoint, as DnsResult carries it."""
    return socket.inet_pton(endpoint.family, _strip_scope(endpoint.sockaddr[0]))


async def connect(endpoints: list[Endpoint], kind: int = socket.SOCK_STREAM) -> socket.socket:
    """Connect a socket of `kind` to the first endpoint that accepts, trying them in order.

    For UDP, connecting only fixes the peer: it succeeds unless the address is unusable.
    """
    loop = asyncio.get_running_loop()
    last: OSError = OSError("no endpoint")
    for endpoint in endpoints:
        sock = socket.socket(endpoint.family, kind)
        try:
            sock.setblocking(False)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, endpoint.sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:  # cancelled: the client closed the stream
            sock.close()
            raise
    raise last


async def open_socket(host: str, port: int, kind: int = socket.SOCK_STREAM,
                      policy: Optional[EgressPolicy] = None) -> socket.socket:
    """Resolve `host` and connect a socket of `kind` to it: the socket of one Open.

    With a policy, the name is checked first, then every resolved address, and the
    socket connects to a checked address itself: nothing resolves the name again
    between the check and the connect (DNS rebinding).  An IP literal without zone id
    is checked once: its name check judges that very address, and getaddrinfo parses it
    without asking any resolver.
    """
    proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
    address = _parse_literal(_strip_scope(host))  # None for a name
    zoned = "%" in host
    if policy is not None:
        # for a plain literal, check_name would parse it again to run this very check
        decision = (policy.check_address(address, port, proto)
                    if address is not None and not zoned else policy.check_name(host, port, proto))
        if not decision.allowed:
            raise Blocked(decision.reason)
    endpoints = await lookup(host, port)  # uvloop answers a literal without its thread pool
    if policy is not None and (address is None or zoned):
        name = None if address is not None else host
        decisions = [policy.check_address(e.sockaddr[0], port, proto, name=name)
                     for e in endpoints]
        allowed = [e for e, d in zip(endpoints, decisions) if d.allowed]
        if not allowed:
            raise Blocked(decisions[0].reason)
        endpoints = allowed
    return await connect(endpoints, kind)


def _parse_literal(host: str) -> Optional[IPAddress]:
    """The IP address `host` is, maybe with a zone id; None for a name."""
    if not _LITERAL_CHARS.issuperset(_strip_scope(host)):
        return None  # a name: spare ipaddress two failed parses and raises
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def open_error(exc: BaseException) -> tuple[OpenErrCode, str]:
    """Map a failed resolve/connect to an OpenErr code and message (spec §4)."""
    if isinstance(exc, Blocked):
        return OpenErrCode.BLOCKED, str(exc)
    if isinstance(exc, ResolveError):
        return OpenErrCode.RESOLVE_FAIL, str(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return OpenErrCode.TIMEOUT, "connect timed out"
    if isinstance(exc, ConnectionRefusedError):
        return OpenErrCode.CONN_REFUSED, "connection refused"
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return OpenErrCode.UNREACHABLE, exc.strerror or "unreachable"
    return OpenErrCode.INTERNAL, f"connect failed: {exc}"
