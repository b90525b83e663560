# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""KSW1 framing, compiled (docs/protocol.md §1-§2): the frame parser and the header.

Same API and behaviour as its readable twin ``ksw1fast.protocol.frames``, byte for byte
and error for error.  The compiled relay also uses the C-level API declared in
_codec.pxd: ``FrameParser.start``/``next_frame`` (no Python objects for frames wholly
in the input) and ``write_header``.  Payloads are not framing: they have one codec,
ksw1fast.protocol.payloads, in plain Python.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.number cimport PyNumber_Index
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcmp, memcpy

from ksw1fast._constants cimport KSW1_HEADER, KSW1_VERSION

from ksw1fast.protocol.constants import DEFAULT_MAX_PAYLOAD, WSClose
from ksw1fast.protocol.errors import FrameError
from ksw1fast.protocol.messages import Frame

__all__ = ["FrameParser", "encode_frame", "pack_header"]

cdef enum:
    _HDR = KSW1_HEADER
    _PREFIX = 5      # magic + version: enough to tell a stream is not KSW1
    _VERSION = KSW1_VERSION


# -- little-endian access, byte by byte: right on any host, at any alignment ---------

cdef inline uint32_t _rd_u32(const unsigned char* p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


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
    cdef Py_buffer body
    cdef uint8_t t = _uint(type, 8, "type")
    cdef uint8_t f = _uint(flags, 8, "flags")
    cdef uint32_t sid = _uint(stream_id, 32, "stream_id")
    PyObject_GetBuffer(_byte_view(payload), &body, PyBUF_SIMPLE)
    try:
        length = _uint(body.len, 32, "payload length")
        out = _new_bytes(_HDR + body.len, &p)
        write_header(<char*>p, t, f, sid, length)
        memcpy(p + _HDR, body.buf, body.len)
    finally:
        PyBuffer_Release(&body)
    return out
