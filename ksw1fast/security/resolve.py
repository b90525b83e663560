"""Asynchronous name resolution and connect, with errors mapped to KSW1 codes."""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from typing import Any, Callable, Iterable, NamedTuple, Optional

import aiodns

from ksw1fast.protocol.constants import DnsErrCode, OpenErrCode
from ksw1fast.protocol.errors import KSW1Error
from ksw1fast.security.egress import EgressPolicy, IPAddress, parse_literal

_FAMILIES = {0: socket.AF_UNSPEC, 4: socket.AF_INET, 6: socket.AF_INET6}
_NO_NAME = {socket.EAI_NONAME} | {getattr(socket, n) for n in ("EAI_NODATA", "EAI_ADDRFAMILY")
                                  if hasattr(socket, n)}
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH}


class ResolveError(KSW1Error):
    """A lookup failed; `dns_code` says how, as a DnsErr code."""

    def __init__(self, dns_code: DnsErrCode, message: str) -> None:
        super().__init__(message)
        self.dns_code = dns_code


class Blocked(KSW1Error):
    """The egress policy denies the destination (OpenErr Blocked); `rule` says which
    rule decided (egress.Decision.rule)."""

    def __init__(self, reason: str, rule: str = "") -> None:
        super().__init__(reason)
        self.rule = rule


class Endpoint(NamedTuple):
    family: int
    sockaddr: tuple  # what socket.connect takes for `family`
    rule: str = ""   # the egress rule that allowed it (`destinations` with a policy)


def _strip_scope(host: str) -> str:
    return host.split("%", 1)[0]


# c-ares' errors, as DnsErr codes (anything else is a server failure)
_ARES_CODES = {
    aiodns.error.ARES_ENOTFOUND: DnsErrCode.NX_DOMAIN,
    aiodns.error.ARES_ENODATA: DnsErrCode.NX_DOMAIN,
    aiodns.error.ARES_EBADNAME: DnsErrCode.FORMAT_ERROR,
    aiodns.error.ARES_EBADQUERY: DnsErrCode.FORMAT_ERROR,
    aiodns.error.ARES_EFORMERR: DnsErrCode.FORMAT_ERROR,
    aiodns.error.ARES_ENOTIMP: DnsErrCode.NOT_IMPLEMENTED,
    aiodns.error.ARES_ETIMEOUT: DnsErrCode.TIMEOUT,
}


class Resolver:
    """Name lookups of one worker: c-ares (aiodns), at most `max_lookups` in flight.

    Not the event loop's getaddrinfo: that runs on libuv's pool of 4 threads, where a
    name whose DNS server never answers holds a thread for 30-40 s whatever its caller
    does, so a few such names stalled every other lookup of the worker.  c-ares keeps
    no thread per query and, with the system resolver's files (/etc/resolv.conf,
    /etc/hosts), ends each query by itself within `timeout` per try.  IP literals never
    reach it.  A lookup's slot is freed when c-ares is done with it, not when its
    caller stops waiting (a DnsQuery answered Timeout still holds its slot meanwhile).
    """

    TRIES = 2

    def __init__(self, max_lookups: int = 1024, timeout: float = 5.0) -> None:
        self.max_lookups = max_lookups
        self.timeout = timeout
        self.in_flight = 0
        self._ares: Optional[aiodns.DNSResolver] = None  # made in the running loop

    async def lookup(self, name: str, port: int = 0, family: int = 0) -> list[Endpoint]:
        """`name` (a host name or an IP literal) as TCP endpoints, in resolver order,
        deduplicated; `family` is the DnsQuery family: 0 any, 4 or 6. ResolveError."""
        literal = _numeric(name, port, family)
        if literal is not None:
            return literal
        if self.in_flight >= self.max_lookups:
            raise ResolveError(DnsErrCode.SERVER_FAILURE,
                               f"more than {self.max_lookups} lookups in flight")
        try:
            ascii_name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ResolveError(DnsErrCode.FORMAT_ERROR, f"invalid host name {name!r}") from None
        if self._ares is None:
            self._ares = aiodns.DNSResolver(timeout=self.timeout / self.TRIES, tries=self.TRIES)
        query = self._ares.getaddrinfo(ascii_name, family=_FAMILIES[family], port=port,
                                       type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        self.in_flight += 1
        query.add_done_callback(self._done)
        try:
            answer = await asyncio.shield(query)  # a cancelled caller leaves c-ares be
        except aiodns.error.DNSError as exc:
            code = _ARES_CODES.get(exc.args[0], DnsErrCode.SERVER_FAILURE)
            raise ResolveError(code, f"cannot resolve {name!r}: {exc.args[1]}") from None
        endpoints = _unique(Endpoint(node.family, (node.addr[0].decode(), *node.addr[1:]))
                            for node in answer.nodes)
        if not endpoints:
            raise ResolveError(DnsErrCode.NX_DOMAIN, f"{name!r} has no addresses")
        return endpoints

    def _done(self, query: "asyncio.Future[Any]") -> None:
        self.in_flight -= 1
        if not query.cancelled():
            query.exception()  # retrieved: its caller may have stopped waiting

    def close(self) -> None:
        if self._ares is not None:
            self._ares.cancel()


def _unique(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    return list(dict.fromkeys(endpoints))


def _numeric(host: str, port: int, family: int) -> Optional[list[Endpoint]]:
    """The endpoint of an IP literal (zone id allowed), parsed without any resolver; None
    for a name.  ResolveError when the literal is not of `family`."""
    address = parse_literal(_strip_scope(host))
    if address is None:
        return None
    if "%" not in host:
        if family and address.version != family:
            raise ResolveError(DnsErrCode.NX_DOMAIN,
                               f"{host!r} is not an IPv{family} address")
        return [_literal_endpoint(address, host, port)]
    try:  # a zone id: the system maps its name to the scope id
        infos = socket.getaddrinfo(host, port, _FAMILIES[family], socket.SOCK_STREAM,
                                   socket.IPPROTO_TCP, socket.AI_NUMERICHOST)
    except socket.gaierror as exc:
        code = DnsErrCode.NX_DOMAIN if exc.errno in _NO_NAME else DnsErrCode.FORMAT_ERROR
        raise ResolveError(code, f"cannot resolve {host!r}: {exc.strerror}") from None
    return _unique(Endpoint(fam, sockaddr) for fam, _type, _proto, _canon, sockaddr in infos)


def _literal_endpoint(address: IPAddress, host: str, port: int, rule: str = "") -> Endpoint:
    """The endpoint of `host`, the text of `address` (no zone id): connect parses the
    text itself, so it is kept as the client wrote it."""
    if address.version == 4:
        return Endpoint(socket.AF_INET, (host, port), rule)
    return Endpoint(socket.AF_INET6, (host, port, 0, 0), rule)


def address_bytes(endpoint: Endpoint) -> bytes:
    """The raw 4- or 16-byte address of an endpoint, as DnsResult carries it."""
    return socket.inet_pton(endpoint.family, _strip_scope(endpoint.sockaddr[0]))


async def open_target(resolver: Resolver, host: str, port: int, udp: bool,
                      policy: Optional[EgressPolicy],
                      factory: Callable[[], asyncio.BaseProtocol]
                      ) -> tuple[asyncio.BaseTransport, list[Endpoint]]:
    """The transport of one Open, `host` resolved, checked and connected (`connect`),
    and the endpoints it was allowed to try (`rule_of` names the rule that allowed it)."""
    endpoints = await destinations(resolver, host, port, "udp" if udp else "tcp", policy)
    return await connect(endpoints, udp, factory), endpoints


def rule_of(endpoints: list[Endpoint], peer: Any) -> str:
    """The egress rule of the endpoint connected to (`peer`, its transport's peername):
    the only one there is, as a rule nearly always allows every address of a name alike,
    else found by address."""
    first = endpoints[0].rule
    if all(e.rule == first for e in endpoints):
        return first
    try:
        connected = ipaddress.ip_address(_strip_scope(peer[0]))
        return next(e.rule for e in endpoints
                    if ipaddress.ip_address(_strip_scope(e.sockaddr[0])) == connected)
    except (TypeError, ValueError, StopIteration):
        return first


async def destinations(resolver: Resolver, host: str, port: int, proto: str = "tcp",
                       policy: Optional[EgressPolicy] = None) -> list[Endpoint]:
    """Where an Open of `host` may connect, in the order to try.

    With a policy, the name is checked first, then every resolved address; the caller
    connects to these addresses themselves, so nothing resolves the name again between
    the check and the connect (DNS rebinding).  An IP literal without zone id is checked
    once (its name check judges that very address) and is parsed, never resolved.
    """
    if policy is not None:
        known = policy.check_literal(host, port, proto)  # None for a name or a zone id
        if known is not None:
            parsed, verdict = known
            if not verdict.allowed:
                raise Blocked(verdict.reason, verdict.rule)
            return [_literal_endpoint(parsed, host, port, verdict.rule)]
    zoned = "%" in host
    address = parse_literal(_strip_scope(host))  # None for a name
    rule = ""
    if policy is not None:  # a name or a literal with a zone id
        decision = policy.check_name(host, port, proto)
        if not decision.allowed:
            raise Blocked(decision.reason, decision.rule)
        rule = decision.rule
    if address is not None and not zoned:
        return [_literal_endpoint(address, host, port, rule)]
    endpoints = await resolver.lookup(host, port)
    if policy is not None:
        name = None if address is not None else host
        decisions = [policy.check_address(e.sockaddr[0], port, proto, name=name)
                     for e in endpoints]
        allowed = [e._replace(rule=d.rule) for e, d in zip(endpoints, decisions) if d.allowed]
        if not allowed:
            raise Blocked(decisions[0].reason, decisions[0].rule)
        endpoints = allowed
    return endpoints


async def connect(endpoints: list[Endpoint], udp: bool,
                  factory: Callable[[], asyncio.BaseProtocol]) -> asyncio.BaseTransport:
    """A transport to the first endpoint that accepts, trying them in order.

    TCP goes through the loop's own connect with the address as text: uvloop parses a
    numeric address itself and connects in libuv, with no thread and no Python
    readiness wait (about 40 % less CPU per Open than connecting a socket here).  UDP
    connects its socket here: connecting a datagram socket only fixes its peer, so it
    never waits, and uvloop's remote_addr path costs more than this.
    """
    loop = asyncio.get_running_loop()
    last: OSError = OSError("no endpoint")
    for endpoint in endpoints:
        try:
            if not udp:
                stream, _ = await loop.create_connection(
                    factory, endpoint.sockaddr[0], endpoint.sockaddr[1], family=endpoint.family)
                return stream
            sock = socket.socket(endpoint.family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect(endpoint.sockaddr)
                datagrams, _ = await loop.create_datagram_endpoint(factory, sock=sock)
            except BaseException:
                sock.close()
                raise
            return datagrams
        except OSError as exc:
            last = exc
    raise last


def open_error(exc: BaseException) -> tuple[OpenErrCode, str]:
    """Map a failed resolve/connect to an OpenErr code and message (docs/protocol.md §4)."""
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
