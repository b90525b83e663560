# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""KSW1 frame and payload codec, compiled (spec ksw1.md §1-§8).

Same API and behaviour as its readable twin ``ksw1fast.codec``, byte for byte
and error for error.  The compiled relay also uses the C-level API declared in
_codec.pxd: ``FrameParser.start``/``next_frame`` (no Python objects for frames
wholly in the input) and ``write_header``.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.number cimport PyNumber_Index
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcmp, memcpy

import socket

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

cdef enum:
    _HDR = 16        # header size (spec §1)
    _PREFIX = 5      # magic + version: enough to tell a stream is not KSW1
    _VERSION = 1
    _U16_MAX = 0xFFFF

assert HEADER_SIZE == _HDR and VERSION == _VERSION and MAGIC == b"KSW1"

cdef dict _IP_LEN = {AddrKind.IPV4: 4, AddrKind.IPV6: 16}
cdef dict _IP_FAMILY = {AddrKind.IPV4: socket.AF_INET, AddrKind.IPV6: socket.AF_INET6}


# -- little-endian access, byte by byte: right on any host, at any alignment ---------

cdef inline uint16_t _rd_u16(const unsigned char* p) noexcept nogil:
    return <uint16_t>(p[0] | (p[1] << 8))


cdef inline uint32_t _rd_u32(const unsigned char* p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void _wr_u16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline void _wr_u32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = v >> 24


cdef uint32_t _uint(value, int bits, str what) except? 0xFFFFFFFF:
    """`value` as a C integer, or ValueError when it does not fit an unsigned `bits`-bit field."""
    value = PyNumber_Index(value)
    if value < 0 or value >> bits:
        raise ValueError(f"{what} must fit in u{bits}, got {value}")
    return value


cdef object _byte_view(data):
    """A flat unsigned-byte memoryview of any C-contiguous bytes-like object."""
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


cdef inline bytes _new_bytes(Py_ssize_t size, unsigned char** out):
    """An uninitialised bytes object of `size` bytes for the caller to fill through *out."""
    data = PyBytes_FromStringAndSize(NULL, size)
    out[0] = <unsigned char*>PyBytes_AS_STRING(data)
    return data


# -- frames ---------------------------------------------------------------------------

cdef void write_header(char* dst, uint8_t type, uint8_t flags, uint32_t stream_id,
                       uint32_t payload_len) noexcept nogil:
    cdef unsigned char* p = <unsigned char*>dst
    memcpy(p, b"KSW1", 4)
    p[4] = _VERSION
    p[5] = type
    p[6] = flags
    p[7] = 0
    _wr_u32(p + 8, stream_id)
    _wr_u32(p + 12, payload_len)


cdef inline void _fill(FrameView* out, const unsigned char* header, const char* payload,
                       Py_ssize_t payload_len) noexcept nogil:
    out.type = header[5]
    out.flags = header[6]
    out.stream_id = _rd_u32(header + 8)
    out.payload = payload
    out.payload_len = payload_len


cdef int _input_done(FrameParser self) except -1:
    """Forgets the input (the caller owns it and may free it now); next_frame's 0."""
    self._in = NULL
    self._in_len = 0
    self._in_pos = 0
    return 0


cdef int _fail(FrameParser self, close_code, str reason) except -1:
    """Kills the parser: this and every later call raise the same FrameError."""
    self._error = FrameError(close_code, reason)
    _input_done(self)
    raise self._error


cdef Py_ssize_t _frame_size(FrameParser self, const unsigned char* p, Py_ssize_t available) except -1:
    """Header+payload size of the frame at `p`, or 0 while its header is incomplete.

    Checks magic and version as soon as their 5 bytes are there, and the payload
    length as soon as the header is complete.
    """
    cdef uint32_t payload_len
    if available < _PREFIX:
        return 0
    if memcmp(p, b"KSW1", 4) != 0 or p[4] != _VERSION:
        magic = PyBytes_FromStringAndSize(<const char*>p, 4)
        _fail(self, WSClose.PROTOCOL_ERROR, f"not a KSW1 v1 frame (magic {magic!r}, version {p[4]})")
    if available < _HDR:
        return 0
    payload_len = _rd_u32(p + 12)
    if <unsigned long long>payload_len > <unsigned long long>self.max_payload:
        _fail(self, WSClose.MESSAGE_TOO_BIG,
              f"payload of {payload_len} bytes exceeds the limit of {self.max_payload}")
    return _HDR + <Py_ssize_t>payload_len


cdef int _carry(FrameParser self, Py_ssize_t n) except -1:
    """Moves the next `n` input bytes onto the unfinished frame in _partial."""
    cdef Py_ssize_t held = PyByteArray_GET_SIZE(self._partial)
    if n > 0:
        PyByteArray_Resize(self._partial, held + n)
        memcpy(PyByteArray_AS_STRING(self._partial) + held, self._in + self._in_pos, n)
        self._in_pos += n
    return 0


cdef int _continue_partial(FrameParser self, FrameView* out) except -1:
    """Extends the carried frame from the input; 1 and *out filled once it is complete."""
    cdef const unsigned char* frame
    if self._need == 0:  # header still incomplete
        _carry(self, min(_HDR - PyByteArray_GET_SIZE(self._partial), self._in_len - self._in_pos))
        self._need = _frame_size(self, <const unsigned char*>PyByteArray_AS_STRING(self._partial),
                                 PyByteArray_GET_SIZE(self._partial))
        if self._need == 0:
            return _input_done(self)
    _carry(self, min(self._need - PyByteArray_GET_SIZE(self._partial), self._in_len - self._in_pos))
    if PyByteArray_GET_SIZE(self._partial) < self._need:
        return _input_done(self)
    frame = <const unsigned char*>PyByteArray_AS_STRING(self._partial)
    self._done = PyBytes_FromStringAndSize(<const char*>frame + _HDR, self._need - _HDR)
    _fill(out, frame, PyBytes_AS_STRING(self._done), self._need - _HDR)
    PyByteArray_Resize(self._partial, 0)  # also frees the frame's memory
    self._need = 0
    return 1


cdef class FrameParser:
    """Splits the inbound byte stream of one connection into frames.

    Successive `feed` calls are one stream: a call may hold several frames and
    a frame may be cut anywhere, even inside its header.  Only the bytes of one
    unfinished frame are ever held, and a payload over `max_payload` is refused
    from its header alone, before any of it is buffered.
    """

    def __cinit__(self, max_payload=DEFAULT_MAX_PAYLOAD):
        self.max_payload = _uint(max_payload, 32, "max_payload")
        self._partial = bytearray()

    @property
    def buffered(self):
        """Bytes of an unfinished frame currently held."""
        return PyByteArray_GET_SIZE(self._partial)

    cdef int start(self, const char* data, Py_ssize_t size) except -1:
        """Sets the input for next_frame(); the caller keeps it alive until next_frame() returns 0."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        self._done = None
        self._in = data
        self._in_len = size
        self._in_pos = 0
        return 0

    cdef int next_frame(self, FrameView* out) except -1:
        """1 with *out filled for the next complete frame, or 0 once the input is used up."""
        cdef const unsigned char* p
        cdef Py_ssize_t available, need
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._done is not None:
            self._done = None  # the FrameView into it has been consumed
        if PyByteArray_GET_SIZE(self._partial):
            return _continue_partial(self, out)
        available = self._in_len - self._in_pos
        if available == 0:
            return _input_done(self)
        p = <const unsigned char*>self._in + self._in_pos
        need = _frame_size(self, p, available)
        if need == 0 or need > available:
            # an unfinished frame: carry it (and only it) to the next input
            _carry(self, available)
            self._need = need
            return _input_done(self)
        _fill(out, p, <const char*>p + _HDR, need - _HDR)
        self._in_pos += need
        return 1

    def feed(self, data):
        """Frames completed by `data` (any bytes-like object).

        A frame wholly inside `data` gets a memoryview slice of it as payload (no
        copy); a frame completed from carried-over bytes gets `bytes`.  Raises
        FrameError on a stream that is not KSW1, then again on every later call.
        """
        cdef Py_buffer buf
        cdef FrameView fv
        cdef Py_ssize_t offset
        cdef list frames = []
        view = _byte_view(data)
        PyObject_GetBuffer(view, &buf, PyBUF_SIMPLE)
        try:
            self.start(<const char*>buf.buf, buf.len)
            while self.next_frame(&fv):
                if self._done is not None:
                    payload = self._done
                else:
                    offset = fv.payload - self._in
                    payload = view[offset:offset + fv.payload_len]
                # tuple.__new__ skips the NamedTuple's Python-level __new__: about 2x faster
                frames.append(tuple.__new__(Frame, (fv.type, fv.flags, fv.stream_id, payload)))
        finally:
            PyBuffer_Release(&buf)
        return frames


def pack_header(buf, offset, type, flags, stream_id, payload_len):
    """Writes a 16-byte frame header into the writable buffer `buf` at `offset`."""
    cdef Py_buffer target
    cdef uint8_t t = _uint(type, 8, "type")
    cdef uint8_t f = _uint(flags, 8, "flags")
    cdef uint32_t sid = _uint(stream_id, 32, "stream_id")
    cdef uint32_t length = _uint(payload_len, 32, "payload_len")
    offset = PyNumber_Index(offset)
    view = _byte_view(buf)
    if view.readonly:
        raise TypeError("pack_header needs a writable buffer")
    PyObject_GetBuffer(view, &target, PyBUF_WRITABLE)
    try:
        if not 0 <= offset <= target.len - _HDR:
            raise ValueError(f"no room for a {_HDR}-byte header at offset {offset} of {target.len} bytes")
        write_header(<char*>target.buf + <Py_ssize_t>offset, t, f, sid, length)
    finally:
        PyBuffer_Release(&target)


def encode_frame(type, stream_id, payload=b"", flags=0):
    """One frame: header (reserved 0, version 1) then `payload`."""
    cdef unsigned char* p
    cdef _View body = _View(payload, "payload")
    cdef uint8_t t = _uint(type, 8, "type")
    cdef uint8_t f = _uint(flags, 8, "flags")
    cdef uint32_t sid = _uint(stream_id, 32, "stream_id")
    cdef uint32_t length = _uint(body.size, 32, "payload length")
    out = _new_bytes(_HDR + body.size, &p)
    write_header(<char*>p, t, f, sid, length)
    memcpy(p + _HDR, body.data, body.size)
    return out


# -- payload helpers --------------------------------------------------------------------

cdef class _View:
    """A flat byte view of a bytes-like object, held until this object dies.

    Decoders read it sequentially (a short read is MalformedPayload); encoders
    copy from it.
    """

    cdef Py_buffer _buf
    cdef const unsigned char* data
    cdef Py_ssize_t size
    cdef Py_ssize_t pos
    cdef str what

    def __cinit__(self, payload, str what):
        PyObject_GetBuffer(_byte_view(payload), &self._buf, PyBUF_SIMPLE)
        self.data = <const unsigned char*>self._buf.buf
        self.size = self._buf.len
        self.what = what

    def __dealloc__(self):
        PyBuffer_Release(&self._buf)  # a no-op when __cinit__ failed

    cdef inline Py_ssize_t remaining(self) noexcept:
        return self.size - self.pos

    cdef Py_ssize_t _advance(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t start = self.pos
        if n > self.size - start:
            raise MalformedPayload(f"{self.what} payload truncated: needs {start + n} bytes, has {self.size}")
        self.pos = start + n
        return start

    cdef int u8(self) except -1:
        return self.data[self._advance(1)]

    cdef int u16(self) except -1:
        return _rd_u16(self.data + self._advance(2))

    cdef long long u32(self) except -1:
        return _rd_u32(self.data + self._advance(4))

    cdef bytes take(self, Py_ssize_t n):
        cdef Py_ssize_t start = self._advance(n)
        return PyBytes_FromStringAndSize(<const char*>self.data + start, n)

    cdef bytes field(self):
        """A u16-length-prefixed byte string."""
        return self.take(self.u16())

    cdef bytes rest(self):
        return self.take(self.remaining())


cdef _View _field_view(value, str what):
    """A view of a variable-length field, or ValueError when it is too long for its u16 length."""
    cdef _View view = _View(value, what)
    if view.size > _U16_MAX:
        raise ValueError(f"{what} is {view.size} bytes, the limit is {_U16_MAX}")
    return view


cdef unsigned char* _put_field(unsigned char* p, _View field) noexcept:
    """Writes u16 length + bytes at `p`; returns the end."""
    _wr_u16(p, <uint16_t>field.size)
    memcpy(p + 2, field.data, field.size)
    return p + 2 + field.size


cdef bytes _utf8_prefix(text, Py_ssize_t limit):
    """`text` as UTF-8 cut to at most `limit` bytes, never inside a character."""
    cdef bytes data = text.encode("utf-8", "replace")
    cdef const unsigned char* p = data
    cdef Py_ssize_t cut = limit
    if len(data) <= limit:
        return data
    while (p[cut] & 0xC0) == 0x80:  # a continuation byte: the character at `cut` started earlier
        cut -= 1
    return data[:cut]


# -- Hello / HelloAck -----------------------------------------------------------------------

def encode_hello(features, max_streams, token=None):
    cdef unsigned char* p
    cdef uint32_t f = _uint(features, 32, "features")
    cdef uint32_t m = _uint(max_streams, 32, "max_streams")
    cdef _View t = None if token is None else _field_view(token, "token")
    out = _new_bytes(8 if t is None else 10 + t.size, &p)
    _wr_u32(p, f)
    _wr_u32(p + 4, m)
    if t is not None:
        _put_field(p + 8, t)
    return out


def decode_hello(payload):
    cdef _View r = _View(payload, "Hello")
    features = r.u32()
    max_streams = r.u32()
    return Hello(features, max_streams, r.field() if r.remaining() else None)


def encode_hello_ack(features, max_streams, max_payload=None, initial_credit=None):
    """HelloAck; the extension is sent when both `max_payload` and `initial_credit` are given."""
    cdef unsigned char* p
    cdef uint32_t f = _uint(features, 32, "features")
    cdef uint32_t m = _uint(max_streams, 32, "max_streams")
    cdef bint ext = max_payload is not None
    if ext != (initial_credit is not None):
        raise ValueError("HelloAck extension needs both max_payload and initial_credit")
    out = _new_bytes(16 if ext else 8, &p)
    _wr_u32(p, f)
    _wr_u32(p + 4, m)
    if ext:
        _wr_u32(p + 8, _uint(max_payload, 32, "max_payload"))
        _wr_u32(p + 12, _uint(initial_credit, 32, "initial_credit"))
    return out


def decode_hello_ack(payload):
    cdef _View r = _View(payload, "HelloAck")
    features = r.u32()
    max_streams = r.u32()
    if r.remaining() < 8:
        return HelloAck(features, max_streams, None, None)
    max_payload = r.u32()
    return HelloAck(features, max_streams, max_payload, r.u32())


# -- Open / OpenOk / OpenErr -------------------------------------------------------------------

def encode_open(proto, addr_kind, port, addr, token=b""):
    cdef unsigned char* p
    cdef uint8_t pr = _uint(proto, 8, "proto")
    cdef uint8_t kind = _uint(addr_kind, 8, "addr_kind")
    cdef uint16_t po = _uint(port, 16, "port")
    cdef _View a = _field_view(addr, "addr")
    cdef _View t = _field_view(token, "token")
    out = _new_bytes(8 + a.size + t.size, &p)
    p[0] = pr
    p[1] = kind
    _wr_u16(p + 2, po)
    _put_field(_put_field(p + 4, a), t)
    return out


def decode_open(payload):
    """Decodes without judging proto/addr_kind values: the server answers those itself."""
    cdef _View r = _View(payload, "Open")
    proto = r.u8()
    addr_kind = r.u8()
    port = r.u16()
    addr = r.field()
    return OpenRequest(proto, addr_kind, port, addr, r.field())


cdef bytes _pack_sockaddr(addr):
    cdef unsigned char* p
    cdef bytes raw = addr.packed_host()
    cdef uint16_t port = _uint(addr.port, 16, "port")
    out = _new_bytes(5 + len(raw), &p)
    p[0] = AddrKind.IPV4 if len(raw) == 4 else AddrKind.IPV6
    _wr_u16(p + 1, port)
    _wr_u16(p + 3, len(raw))
    memcpy(p + 5, <const char*>raw, len(raw))
    return out


cdef object _read_sockaddr(_View r):
    kind = r.u8()
    port = r.u16()
    size = r.u16()
    if _IP_LEN.get(kind) != size:
        raise MalformedPayload(f"OpenOk address of kind {kind} cannot be {size} bytes")
    return SockAddr(socket.inet_ntop(_IP_FAMILY[kind], r.take(size)), port)


def encode_open_ok(info=None):
    """Empty (what the reference sends), or the local and peer addresses (ksw1fast extension)."""
    if info is None:
        return b""
    return _pack_sockaddr(info.local) + _pack_sockaddr(info.peer)


def decode_open_ok(payload):
    cdef _View r = _View(payload, "OpenOk")
    if not r.remaining():
        return None
    local = _read_sockaddr(r)
    return OpenOkInfo(local, _read_sockaddr(r))


cdef bytes _encode_error_reply(code, message):
    cdef unsigned char* p
    cdef bytes msg = _utf8_prefix(message, _U16_MAX)
    cdef uint8_t c = _uint(code, 8, "code")
    out = _new_bytes(3 + len(msg), &p)
    p[0] = c
    _wr_u16(p + 1, len(msg))
    memcpy(p + 3, <const char*>msg, len(msg))
    return out


cdef object _decode_error_reply(payload, str what):
    cdef _View r = _View(payload, what)
    code = r.u8()
    return ErrorReply(code, r.field().decode("utf-8", "replace"))


def encode_open_err(code, message):
    """OpenErr; the message is cut to 65535 UTF-8 bytes at a character boundary."""
    return _encode_error_reply(code, message)


def decode_open_err(payload):
    return _decode_error_reply(payload, "OpenErr")


# -- Close / DataAck ---------------------------------------------------------------------------

cdef bytes _encode_u32(value, str what):
    cdef unsigned char* p
    cdef uint32_t v = _uint(value, 32, what)
    out = _new_bytes(4, &p)
    _wr_u32(p, v)
    return out


def encode_close(reason=0):
    return _encode_u32(reason, "reason")


def decode_close(payload):
    """Close or CloseAck reason; an empty payload means 0."""
    cdef _View r = _View(payload, "Close")
    return r.u32() if r.remaining() else 0


def encode_data_ack(credit):
    return _encode_u32(credit, "credit")


def decode_data_ack(payload):
    cdef _View r = _View(payload, "DataAck")
    return r.u32()


# -- DNS -------------------------------------------------------------------------------------------

def encode_dns_query(family, name):
    cdef unsigned char* p
    cdef uint8_t fam = _uint(family, 8, "family")
    cdef _View n = _field_view(name.encode("utf-8"), "name")
    out = _new_bytes(3 + n.size, &p)
    p[0] = fam
    _put_field(p + 1, n)
    return out


def decode_dns_query(payload):
    """Decodes without judging the family value."""
    cdef _View r = _View(payload, "DnsQuery")
    family = r.u8()
    name = r.field()
    try:
        return DnsQuery(family, name.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MalformedPayload(f"DnsQuery name is not UTF-8: {exc}") from None


def encode_dns_result(addresses):
    """u16 count, then each raw IPv4 (4 bytes) or IPv6 (16 bytes) address, length-prefixed."""
    cdef unsigned char* p
    cdef _View a
    cdef Py_ssize_t size = 2
    cdef list views = []
    for address in addresses:
        a = _View(address, "address")
        if a.size != 4 and a.size != 16:
            raise ValueError(f"an address is 4 or 16 bytes, not {a.size}")
        views.append(a)
        size += 2 + a.size
    cdef uint16_t count = _uint(len(views), 16, "address count")
    out = _new_bytes(size, &p)
    _wr_u16(p, count)
    p += 2
    for a in views:
        p = _put_field(p, a)
    return out


def decode_dns_result(payload):
    cdef _View r = _View(payload, "DnsResult")
    return [r.field() for _ in range(r.u16())]


def encode_dns_err(code, message):
    """DnsErr; same layout and truncation as OpenErr."""
    return _encode_error_reply(code, message)


def decode_dns_err(payload):
    return _decode_error_reply(payload, "DnsErr")


# -- PKCS#11 ---------------------------------------------------------------------------------------

def encode_pkcs11_request(fn_id, args=b""):
    cdef unsigned char* p
    cdef uint16_t fn = _uint(fn_id, 16, "fn_id")
    cdef _View a = _View(args, "args")
    out = _new_bytes(2 + a.size, &p)
    _wr_u16(p, fn)
    memcpy(p + 2, a.data, a.size)
    return out


def decode_pkcs11_request(payload):
    cdef _View r = _View(payload, "Pkcs11Request")
    fn_id = r.u16()
    return Pkcs11Request(fn_id, r.rest())


def encode_pkcs11_response(status, body=b""):
    cdef unsigned char* p
    cdef uint8_t s = _uint(status, 8, "status")
    cdef _View b = _View(body, "body")
    out = _new_bytes(1 + b.size, &p)
    p[0] = s
    memcpy(p + 1, b.data, b.size)
    return out


def decode_pkcs11_response(payload):
    cdef _View r = _View(payload, "Pkcs11Response")
    status = r.u8()
    return Pkcs11Response(status, r.rest())
