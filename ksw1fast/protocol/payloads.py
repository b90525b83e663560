"""KSW1 payloads: the one encoder and decoder of every payload (docs/protocol.md §2-§8).

Plain Python and used by both the compiled and the pure-Python paths: payloads are
decoded once per Open, query or call, never per Data frame, so only framing is
compiled.  All integers are little-endian; a payload that does not decode is
MalformedPayload, answered on the wire.
"""
from __future__ import annotations

import socket
import struct
from typing import Iterable, Optional

from ksw1fast.protocol.buffers import Buffer, byte_view, uint
from ksw1fast.protocol.constants import AddrKind
from ksw1fast.protocol.errors import MalformedPayload
from ksw1fast.protocol.messages import (DnsQuery, ErrorReply, Hello, HelloAck, OpenOkInfo,
                                        OpenRequest, Pkcs11Request, Pkcs11Response, SockAddr)

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HELLO = struct.Struct("<II")
_HELLO_ACK_EXT = struct.Struct("<IIII")
_OPEN_HEAD = struct.Struct("<BBH")  # proto, addr_kind, port; addr and token follow
_OPEN_FIXED = struct.Struct("<BBHH")  # the same and the address' length
_SOCKADDR_HEAD = struct.Struct("<BHH")  # addr_kind, port, len
_ERROR_HEAD = struct.Struct("<BH")  # code, msg_len
_U16_MAX = 0xFFFF
_IP_LEN: dict[int, int] = {AddrKind.IPV4: 4, AddrKind.IPV6: 16}
_IP_FAMILY: dict[int, int] = {AddrKind.IPV4: socket.AF_INET, AddrKind.IPV6: socket.AF_INET6}


# -- payload decoding helpers ------------------------------------------------------


class _Reader:
    """Sequential little-endian reads over a payload; a short read is MalformedPayload.

    Use as a context manager so the view of the payload is released even when
    decoding fails (a live view would stop a bytearray from resizing).
    """

    __slots__ = ("_view", "_pos", "_what")

    def __init__(self, payload: Buffer, what: str) -> None:
        self._view = byte_view(payload)
        self._pos = 0
        self._what = what

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._view.release()

    @property
    def remaining(self) -> int:
        return len(self._view) - self._pos

    def _advance(self, n: int) -> int:
        start = self._pos
        if n > len(self._view) - start:
            raise _truncated(self._what, start + n, len(self._view))
        self._pos = start + n
        return start

    def u8(self) -> int:
        return self._view[self._advance(1)]

    def u16(self) -> int:
        return _U16.unpack_from(self._view, self._advance(2))[0]

    def u32(self) -> int:
        return _U32.unpack_from(self._view, self._advance(4))[0]

    def take(self, n: int) -> bytes:
        start = self._advance(n)
        return self._view[start:start + n].tobytes()

    def field(self) -> bytes:
        """A u16-length-prefixed byte string."""
        return self.take(self.u16())

    def rest(self) -> bytes:
        return self.take(self.remaining)


def _truncated(what: str, needs: int, has: int) -> MalformedPayload:
    return MalformedPayload(f"{what} payload truncated: needs {needs} bytes, has {has}")


def _field(value: Buffer, what: str) -> bytes:
    """u16 length + `value`, for the variable-length fields of a payload."""
    data = byte_view(value).tobytes()
    if len(data) > _U16_MAX:
        raise ValueError(f"{what} is {len(data)} bytes, the limit is {_U16_MAX}")
    return _U16.pack(len(data)) + data


def _utf8_prefix(text: str, limit: int) -> bytes:
    """`text` as UTF-8 cut to at most `limit` bytes, never inside a character."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    cut = limit
    while data[cut] & 0xC0 == 0x80:  # a continuation byte: the character at `cut` started earlier
        cut -= 1
    return data[:cut]


# -- Hello / HelloAck ------------------------------------------------------------


def encode_hello(features: int, max_streams: int, token: Optional[bytes] = None) -> bytes:
    head = _HELLO.pack(uint(features, 32, "features"), uint(max_streams, 32, "max_streams"))
    return head if token is None else head + _field(token, "token")


def decode_hello(payload: Buffer) -> Hello:
    with _Reader(payload, "Hello") as r:
        features, max_streams = r.u32(), r.u32()
        token = r.field() if r.remaining else None
        return Hello(features, max_streams, token)


def encode_hello_ack(features: int, max_streams: int, max_payload: Optional[int] = None,
                     initial_credit: Optional[int] = None) -> bytes:
    """HelloAck; the extension is sent when both `max_payload` and `initial_credit` are given."""
    features = uint(features, 32, "features")
    max_streams = uint(max_streams, 32, "max_streams")
    if max_payload is None and initial_credit is None:
        return _HELLO.pack(features, max_streams)
    if max_payload is None or initial_credit is None:
        raise ValueError("HelloAck extension needs both max_payload and initial_credit")
    return _HELLO_ACK_EXT.pack(features, max_streams, uint(max_payload, 32, "max_payload"),
                               uint(initial_credit, 32, "initial_credit"))


def decode_hello_ack(payload: Buffer) -> HelloAck:
    with _Reader(payload, "HelloAck") as r:
        features, max_streams = r.u32(), r.u32()
        if r.remaining < 8:
            return HelloAck(features, max_streams, None, None)
        return HelloAck(features, max_streams, r.u32(), r.u32())


# -- Open / OpenOk / OpenErr -------------------------------------------------------


def encode_open(proto: int, addr_kind: int, port: int, addr: Buffer, token: Buffer = b"") -> bytes:
    head = _OPEN_HEAD.pack(uint(proto, 8, "proto"), uint(addr_kind, 8, "addr_kind"), uint(port, 16, "port"))
    return head + _field(addr, "addr") + _field(token, "token")


def decode_open(payload: Buffer) -> OpenRequest:
    """Decodes without judging proto/addr_kind values: the server answers those itself.

    Read with two struct calls rather than a _Reader: it runs for every Open, and the
    reader's calls per field cost as much as the rest of the session's work on it."""
    if type(payload) is not bytes:  # lengths and slices in bytes, whatever its format
        payload = byte_view(payload)
    size = len(payload)
    if size < _OPEN_FIXED.size:
        raise _truncated("Open", _OPEN_FIXED.size, size)
    proto, addr_kind, port, addr_len = _OPEN_FIXED.unpack_from(payload)
    addr_end = _OPEN_FIXED.size + addr_len
    if size < addr_end + 2:
        raise _truncated("Open", addr_end + 2, size)
    token_end = addr_end + 2 + _U16.unpack_from(payload, addr_end)[0]
    if size < token_end:
        raise _truncated("Open", token_end, size)
    return OpenRequest(proto, addr_kind, port, bytes(payload[_OPEN_FIXED.size:addr_end]),
                       bytes(payload[addr_end + 2:token_end]))


def _pack_sockaddr(addr: SockAddr) -> bytes:
    raw = addr.packed_host()
    kind = AddrKind.IPV4 if len(raw) == 4 else AddrKind.IPV6
    return _SOCKADDR_HEAD.pack(kind, uint(addr.port, 16, "port"), len(raw)) + raw


def _read_sockaddr(r: _Reader) -> SockAddr:
    kind, port, size = r.u8(), r.u16(), r.u16()
    if _IP_LEN.get(kind) != size:
        raise MalformedPayload(f"OpenOk address of kind {kind} cannot be {size} bytes")
    return SockAddr(socket.inet_ntop(_IP_FAMILY[kind], r.take(size)), port)


def encode_open_ok(info: Optional[OpenOkInfo] = None) -> bytes:
    """Empty (what the reference sends), or the local and peer addresses (ksw1fast extension)."""
    if info is None:
        return b""
    return _pack_sockaddr(info.local) + _pack_sockaddr(info.peer)


def decode_open_ok(payload: Buffer) -> Optional[OpenOkInfo]:
    with _Reader(payload, "OpenOk") as r:
        if not r.remaining:
            return None
        local = _read_sockaddr(r)
        return OpenOkInfo(local, _read_sockaddr(r))


def _encode_error_reply(code: int, message: str) -> bytes:
    msg = _utf8_prefix(message, _U16_MAX)
    return _ERROR_HEAD.pack(uint(code, 8, "code"), len(msg)) + msg


def _decode_error_reply(payload: Buffer, what: str) -> ErrorReply:
    with _Reader(payload, what) as r:
        code = r.u8()
        return ErrorReply(code, r.field().decode("utf-8", "replace"))


def encode_open_err(code: int, message: str) -> bytes:
    """OpenErr; the message is cut to 65535 UTF-8 bytes at a character boundary."""
    return _encode_error_reply(code, message)


def decode_open_err(payload: Buffer) -> ErrorReply:
    return _decode_error_reply(payload, "OpenErr")


# -- Close / DataAck ------------------------------------------------------------------


def encode_close(reason: int = 0) -> bytes:
    return _U32.pack(uint(reason, 32, "reason"))


def decode_close(payload: Buffer) -> int:
    """Close or CloseAck reason; an empty payload means 0."""
    with _Reader(payload, "Close") as r:
        return r.u32() if r.remaining else 0


def encode_data_ack(credit: int) -> bytes:
    return _U32.pack(uint(credit, 32, "credit"))


def decode_data_ack(payload: Buffer) -> int:
    with _Reader(payload, "DataAck") as r:
        return r.u32()


# -- DNS ---------------------------------------------------------------------------------


def encode_dns_query(family: int, name: str) -> bytes:
    return _U8.pack(uint(family, 8, "family")) + _field(name.encode("utf-8"), "name")


def decode_dns_query(payload: Buffer) -> DnsQuery:
    """Decodes without judging the family value."""
    with _Reader(payload, "DnsQuery") as r:
        family, name = r.u8(), r.field()
    try:
        return DnsQuery(family, name.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MalformedPayload(f"DnsQuery name is not UTF-8: {exc}") from None


def encode_dns_result(addresses: Iterable[Buffer]) -> bytes:
    """u16 count, then each raw IPv4 (4 bytes) or IPv6 (16 bytes) address, length-prefixed."""
    fields = []
    for address in addresses:
        raw = byte_view(address).tobytes()
        if len(raw) not in (4, 16):
            raise ValueError(f"an address is 4 or 16 bytes, not {len(raw)}")
        fields.append(_U16.pack(len(raw)) + raw)
    return _U16.pack(uint(len(fields), 16, "address count")) + b"".join(fields)


def decode_dns_result(payload: Buffer) -> list[bytes]:
    with _Reader(payload, "DnsResult") as r:
        return [r.field() for _ in range(r.u16())]


def encode_dns_err(code: int, message: str) -> bytes:
    """DnsErr; same layout and truncation as OpenErr."""
    return _encode_error_reply(code, message)


def decode_dns_err(payload: Buffer) -> ErrorReply:
    return _decode_error_reply(payload, "DnsErr")


# -- PKCS#11 -----------------------------------------------------------------------------


def encode_pkcs11_request(fn_id: int, args: Buffer = b"") -> bytes:
    return b"".join((_U16.pack(uint(fn_id, 16, "fn_id")), args))


def decode_pkcs11_request(payload: Buffer) -> Pkcs11Request:
    with _Reader(payload, "Pkcs11Request") as r:
        fn_id = r.u16()
        return Pkcs11Request(fn_id, r.rest())


def encode_pkcs11_response(status: int, body: Buffer = b"") -> bytes:
    return b"".join((_U8.pack(uint(status, 8, "status")), body))


def pkcs11_message(message: str) -> bytes:
    """The body of a ProtocolError, Internal or AuthDenied Pkcs11Response: the message as
    a u32-length-prefixed UTF-8 string (docs/pkcs11.md §2)."""
    text = message.encode("utf-8")
    return _U32.pack(len(text)) + text


def encode_pkcs11_refusal(status: int, message: str) -> bytes:
    """A Pkcs11Response the gateway answers itself, without asking a module."""
    return encode_pkcs11_response(status, pkcs11_message(message))


def decode_pkcs11_response(payload: Buffer) -> Pkcs11Response:
    with _Reader(payload, "Pkcs11Response") as r:
        status = r.u8()
        return Pkcs11Response(status, r.rest())
