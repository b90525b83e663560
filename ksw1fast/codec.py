"""KSW1 frame and payload codec in pure Python (spec ksw1.md §1-§8).

The readable reference: ``ksw1fast._codec`` is its compiled twin with the same
API and behaviour, byte for byte and error for error.  All integers are
little-endian.
"""
from __future__ import annotations

import operator
import socket
import struct
from typing import Iterable, Optional, Union

from ksw1fast.protocol.constants import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, MAGIC, VERSION, AddrKind, WSClose
from ksw1fast.errors import FrameError, MalformedPayload
from ksw1fast.protocol.messages import (
    DnsQuery,
    ErrorReply,
    Frame,
    Hello,
    HelloAck,
    OpenOkInfo,
    OpenRequest,
    Pkcs11Request,
    Pkcs11Response,
    SockAddr,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD", "HEADER_SIZE", "FrameParser", "encode_frame", "pack_header",
    "encode_hello", "decode_hello", "encode_hello_ack", "decode_hello_ack",
    "encode_open", "decode_open", "encode_open_ok", "decode_open_ok",
    "encode_open_err", "decode_open_err", "encode_dns_err", "decode_dns_err",
    "encode_close", "decode_close", "encode_data_ack", "decode_data_ack",
    "encode_dns_query", "decode_dns_query", "encode_dns_result", "decode_dns_result",
    "encode_pkcs11_request", "decode_pkcs11_request",
    "encode_pkcs11_response", "decode_pkcs11_response",
]

Buffer = Union[bytes, bytearray, memoryview]

# magic, version, type, flags, (reserved), stream_id, payload_len
_HEADER = struct.Struct("<4sBBBxII")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HELLO = struct.Struct("<II")
_HELLO_ACK_EXT = struct.Struct("<IIII")
_PREFIX = struct.Struct("<4sB")  # magic, version: the first 5 bytes of a header
_OPEN_HEAD = struct.Struct("<BBH")  # proto, addr_kind, port; addr and token follow
_SOCKADDR_HEAD = struct.Struct("<BHH")  # addr_kind, port, len
_ERROR_HEAD = struct.Struct("<BH")  # code, msg_len
_U16_MAX = 0xFFFF
_IP_LEN = {AddrKind.IPV4: 4, AddrKind.IPV6: 16}
_IP_FAMILY = {AddrKind.IPV4: socket.AF_INET, AddrKind.IPV6: socket.AF_INET6}


def _byte_view(data: Buffer) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous bytes-like object."""
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _uint(value: int, bits: int, what: str) -> int:
    """`value` as an int, or ValueError when it does not fit an unsigned `bits`-bit field."""
    value = operator.index(value)
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} must fit in u{bits}, got {value}")
    return value


# -- frames --------------------------------------------------------------------


class FrameParser:
    """Splits the inbound byte stream of one connection into frames.

    Successive `feed` calls are one stream: a call may hold several frames and
    a frame may be cut anywhere, even inside its header.  Only the bytes of one
    unfinished frame are ever held, and a payload over `max_payload` is refused
    from its header alone, before any of it is buffered.
    """

    __slots__ = ("_max_payload", "_partial", "_need", "_error")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._max_payload = _uint(max_payload, 32, "max_payload")
        self._partial = bytearray()  # bytes of an unfinished frame carried across feeds
        self._need = 0  # total size of that frame once its header is known, else 0
        self._error: Optional[FrameError] = None

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame currently held."""
        return len(self._partial)

    def feed(self, data: Buffer) -> list[Frame]:
        """Frames completed by `data`.

        A frame wholly inside `data` gets a memoryview slice of it as payload (no
        copy); a frame completed from carried-over bytes gets `bytes`.  Raises
        FrameError on a stream that is not KSW1, then again on every later call.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        try:
            return self._parse(_byte_view(data))
        except FrameError as exc:
            self._error = exc
            raise

    def _parse(self, view: memoryview) -> list[Frame]:
        frames: list[Frame] = []
        pos, end = 0, len(view)
        if self._partial:
            pos, frame = self._continue_partial(view)
            if frame is None:
                return frames
            frames.append(frame)
        while pos < end:
            need = self._frame_size(view, pos, end - pos)
            if not need or pos + need > end:
                # an unfinished frame: carry it (and only it) to the next feed
                self._partial += view[pos:]
                self._need = need
                break
            _, _, type_, flags, stream_id, _ = _HEADER.unpack_from(view, pos)
            frames.append(Frame(type_, flags, stream_id, view[pos + HEADER_SIZE:pos + need]))
            pos += need
        return frames

    def _continue_partial(self, view: memoryview) -> tuple[int, Optional[Frame]]:
        """Extends the carried frame from the start of `view`: (bytes used, frame if done)."""
        partial = self._partial
        pos = 0
        if not self._need:  # header still incomplete
            pos = min(HEADER_SIZE - len(partial), len(view))
            partial += view[:pos]
            self._need = self._frame_size(partial, 0, len(partial))
            if not self._need:
                return pos, None
        take = min(self._need - len(partial), len(view) - pos)
        partial += view[pos:pos + take]
        pos += take
        if len(partial) < self._need:
            return pos, None
        _, _, type_, flags, stream_id, _ = _HEADER.unpack_from(partial)
        del partial[:HEADER_SIZE]  # cheap: a bytearray drops a prefix by moving its start
        frame = Frame(type_, flags, stream_id, bytes(partial))
        partial.clear()
        self._need = 0
        return pos, frame

    def _frame_size(self, buf: Buffer, offset: int, available: int) -> int:
        """Header+payload size of the frame at `offset`, or 0 while its header is incomplete.

        Checks magic and version as soon as their 5 bytes are there, and the
        payload length as soon as the header is complete.
        """
        if available < 5:
            return 0
        magic, version = _PREFIX.unpack_from(buf, offset)
        if magic != MAGIC or version != VERSION:
            raise FrameError(WSClose.PROTOCOL_ERROR, f"not a KSW1 v1 frame (magic {magic!r}, version {version})")
        if available < HEADER_SIZE:
            return 0
        payload_len = _HEADER.unpack_from(buf, offset)[5]
        if payload_len > self._max_payload:
            raise FrameError(WSClose.MESSAGE_TOO_BIG,
                             f"payload of {payload_len} bytes exceeds the limit of {self._max_payload}")
        return HEADER_SIZE + payload_len


def pack_header(buf: Buffer, offset: int, type: int, flags: int, stream_id: int, payload_len: int) -> None:
    """Writes a 16-byte frame header into the writable buffer `buf` at `offset`."""
    header = _HEADER.pack(MAGIC, VERSION, _uint(type, 8, "type"), _uint(flags, 8, "flags"),
                          _uint(stream_id, 32, "stream_id"), _uint(payload_len, 32, "payload_len"))
    offset = operator.index(offset)
    with _byte_view(buf) as view:
        if view.readonly:
            raise TypeError("pack_header needs a writable buffer")
        if not 0 <= offset <= len(view) - HEADER_SIZE:
            raise ValueError(f"no room for a {HEADER_SIZE}-byte header at offset {offset} of {len(view)} bytes")
        view[offset:offset + HEADER_SIZE] = header


def encode_frame(type: int, stream_id: int, payload: Buffer = b"", flags: int = 0) -> bytes:
    """One frame: header (reserved 0, version 1) then `payload`."""
    with _byte_view(payload) as body:
        header = _HEADER.pack(MAGIC, VERSION, _uint(type, 8, "type"), _uint(flags, 8, "flags"),
                              _uint(stream_id, 32, "stream_id"), _uint(len(body), 32, "payload length"))
        return header + body


# -- payload decoding helpers ------------------------------------------------------


class _Reader:
    """Sequential little-endian reads over a payload; a short read is MalformedPayload.

    Use as a context manager so the view of the payload is released even when
    decoding fails (a live view would stop a bytearray from resizing).
    """

    __slots__ = ("_view", "_pos", "_what")

    def __init__(self, payload: Buffer, what: str) -> None:
        self._view = _byte_view(payload)
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
            raise MalformedPayload(
                f"{self._what} payload truncated: needs {start + n} bytes, has {len(self._view)}")
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


def _field(value: Buffer, what: str) -> bytes:
    """u16 length + `value`, for the variable-length fields of a payload."""
    data = _byte_view(value).tobytes()
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
    head = _HELLO.pack(_uint(features, 32, "features"), _uint(max_streams, 32, "max_streams"))
    return head if token is None else head + _field(token, "token")


def decode_hello(payload: Buffer) -> Hello:
    with _Reader(payload, "Hello") as r:
        features, max_streams = r.u32(), r.u32()
        token = r.field() if r.remaining else None
        return Hello(features, max_streams, token)


def encode_hello_ack(features: int, max_streams: int, max_payload: Optional[int] = None,
                     initial_credit: Optional[int] = None) -> bytes:
    """HelloAck; the extension is sent when both `max_payload` and `initial_credit` are given."""
    features = _uint(features, 32, "features")
    max_streams = _uint(max_streams, 32, "max_streams")
    if max_payload is None and initial_credit is None:
        return _HELLO.pack(features, max_streams)
    if max_payload is None or initial_credit is None:
        raise ValueError("HelloAck extension needs both max_payload and initial_credit")
    return _HELLO_ACK_EXT.pack(features, max_streams, _uint(max_payload, 32, "max_payload"),
                               _uint(initial_credit, 32, "initial_credit"))


def decode_hello_ack(payload: Buffer) -> HelloAck:
    with _Reader(payload, "HelloAck") as r:
        features, max_streams = r.u32(), r.u32()
        if r.remaining < 8:
            return HelloAck(features, max_streams, None, None)
        return HelloAck(features, max_streams, r.u32(), r.u32())


# -- Open / OpenOk / OpenErr -------------------------------------------------------


def encode_open(proto: int, addr_kind: int, port: int, addr: Buffer, token: Buffer = b"") -> bytes:
    head = _OPEN_HEAD.pack(_uint(proto, 8, "proto"), _uint(addr_kind, 8, "addr_kind"), _uint(port, 16, "port"))
    return head + _field(addr, "addr") + _field(token, "token")


def decode_open(payload: Buffer) -> OpenRequest:
    """Decodes without judging proto/addr_kind values: the server answers those itself."""
    with _Reader(payload, "Open") as r:
        proto, addr_kind, port = r.u8(), r.u8(), r.u16()
        addr = r.field()
        return OpenRequest(proto, addr_kind, port, addr, r.field())


def _pack_sockaddr(addr: SockAddr) -> bytes:
    raw = addr.packed_host()
    kind = AddrKind.IPV4 if len(raw) == 4 else AddrKind.IPV6
    return _SOCKADDR_HEAD.pack(kind, _uint(addr.port, 16, "port"), len(raw)) + raw


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
    return _ERROR_HEAD.pack(_uint(code, 8, "code"), len(msg)) + msg


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
    return _U32.pack(_uint(reason, 32, "reason"))


def decode_close(payload: Buffer) -> int:
    """Close or CloseAck reason; an empty payload means 0."""
    with _Reader(payload, "Close") as r:
        return r.u32() if r.remaining else 0


def encode_data_ack(credit: int) -> bytes:
    return _U32.pack(_uint(credit, 32, "credit"))


def decode_data_ack(payload: Buffer) -> int:
    with _Reader(payload, "DataAck") as r:
        return r.u32()


# -- DNS ---------------------------------------------------------------------------------


def encode_dns_query(family: int, name: str) -> bytes:
    return _U8.pack(_uint(family, 8, "family")) + _field(name.encode("utf-8"), "name")


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
        raw = _byte_view(address).tobytes()
        if len(raw) not in (4, 16):
            raise ValueError(f"an address is 4 or 16 bytes, not {len(raw)}")
        fields.append(_U16.pack(len(raw)) + raw)
    return _U16.pack(_uint(len(fields), 16, "address count")) + b"".join(fields)


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
    return b"".join((_U16.pack(_uint(fn_id, 16, "fn_id")), args))


def decode_pkcs11_request(payload: Buffer) -> Pkcs11Request:
    with _Reader(payload, "Pkcs11Request") as r:
        fn_id = r.u16()
        return Pkcs11Request(fn_id, r.rest())


def encode_pkcs11_response(status: int, body: Buffer = b"") -> bytes:
    return b"".join((_U8.pack(_uint(status, 8, "status")), body))


def decode_pkcs11_response(payload: Buffer) -> Pkcs11Response:
    with _Reader(payload, "Pkcs11Response") as r:
        status = r.u8()
        return Pkcs11Response(status, r.rest())
