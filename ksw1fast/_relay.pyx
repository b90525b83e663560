# cython: language_level=3
"""Compiled hot path: KSW1 frames out of picows' read buffer, target bytes into picows' sends.

Client -> target: the compiled parser walks the WebSocket frame in place; a Data
payload goes to the target socket with send(2) straight from picows' buffer, and
only what the kernel does not take is copied (once) into the target transport.

Target -> client: every target of this process reads into one shared buffer that
keeps HEADROOM bytes free in front, where the KSW1 and WebSocket headers are
written; picows sends it as is (external-buffer send) and copies only a remainder
the socket did not accept.  The event loop is single-threaded and each read is
sent before the next one starts, so one buffer serves all streams.

`ksw1fast/relay.py` is the pure-Python twin of this module.
"""
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport errno, EINTR
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

from picows.picows cimport WSListener, WSTransport, WSFrame, WSMsgType, WSCloseCode
from ksw1fast._codec cimport FrameParser, FrameView, write_header

from ksw1fast.constants import HEADER_SIZE as _HEADER_SIZE
from ksw1fast.errors import FrameError

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_NOSIGNAL

cdef enum:
    KSW1_HEADER = 16
    WS_HEADROOM = 16            # picows writes up to 14 bytes of WebSocket header here
    HEADROOM = WS_HEADROOM + KSW1_HEADER
    FRAME_DATA = 0x20
    FLAG_EOF = 0x01

MIN_READ = 16 * 1024
MAX_READ = 256 * 1024
HIGH_WATER = 1024 * 1024         # per target write buffer and per WebSocket write buffer
LOW_WATER = 256 * 1024
MAX_PENDING = 1024 * 1024        # client Data accepted for a stream that is still connecting

# Why a stream's target is not being read (bits; reading resumes when none is left).
PAUSE_CONNECTING = 1             # OpenOk not sent yet: no Data may precede it
PAUSE_WEBSOCKET = 2              # the WebSocket's write buffer is above its high-water mark
PAUSE_CREDIT = 4                 # reserved for FlowControl credits

cdef bytearray _read_buf = bytearray(HEADROOM + MAX_READ)
cdef char* _read_ptr = _read_buf
# One read-only-sized view per read size (powers of two), made once: no allocation per read.
cdef list _views = []
cdef Py_ssize_t _size = MIN_READ
while _size <= MAX_READ:
    _views.append(memoryview(_read_buf)[HEADROOM:HEADROOM + _size])
    _size *= 2
cdef Py_ssize_t _MAX_VIEW = len(_views) - 1
# Control frames are assembled here (with the same headroom) before they are sent.
cdef bytearray _scratch = bytearray(HEADROOM + 64 * 1024)


def send_frame(WSTransport ws, uint8_t type, uint32_t stream_id, payload=b"", uint8_t flags=0):
    """Send one KSW1 frame as one WebSocket message.

    Never picows' send() for this: for messages over 8 KiB it hands uvloop memoryviews
    of buffers that are reused, and uvloop queues them uncopied when the socket is busy.
    The external-buffer send copies whatever the kernel did not take.
    """
    cdef const unsigned char[:] view = payload
    cdef Py_ssize_t n = view.shape[0]
    cdef bytearray buf = _scratch if n <= len(_scratch) - HEADROOM else bytearray(HEADROOM + n)
    cdef char* msg = PyByteArray_AS_STRING(buf) + WS_HEADROOM
    write_header(msg, type, flags, stream_id, <uint32_t>n)
    if n:
        memcpy(msg + KSW1_HEADER, &view[0], n)
    ws.send_reuse_external_buffer(WSMsgType.BINARY, msg, KSW1_HEADER + n)


cdef class Stream:
    """One entry of a connection's stream table; subclasses relay one protocol."""
    cdef:
        readonly uint32_t stream_id
        readonly object conn        # the GatewayListener owning this stream
        int paused

    cdef int client_data(self, const char* data, Py_ssize_t size, uint8_t flags) except -1:
        return 0


cdef class TcpStream(Stream):
    """asyncio BufferedProtocol of one target TCP connection."""
    cdef:
        readonly object transport
        WSTransport ws
        int fd
        Py_ssize_t view_index
        readonly bint client_eof
        readonly bint target_eof
        readonly bint forgotten
        bint congested
        list pending
        Py_ssize_t pending_size
        readonly unsigned long long bytes_in
        readonly unsigned long long bytes_out

    def __cinit__(self, conn, uint32_t stream_id):
        self.conn = conn
        self.stream_id = stream_id
        self.ws = conn.ws
        self.fd = -1
        self.paused = PAUSE_CONNECTING | (PAUSE_WEBSOCKET if conn.targets_paused else 0)
        self.pending = []

    # -- asyncio protocol -------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        transport.pause_reading()

    def get_buffer(self, Py_ssize_t sizehint):
        return _views[self.view_index]

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef char* msg = _read_ptr + WS_HEADROOM
        write_header(msg, FRAME_DATA, 0, self.stream_id, <uint32_t>nbytes)
        self.ws.send_reuse_external_buffer(WSMsgType.BINARY, msg, KSW1_HEADER + nbytes)
        self.bytes_out += nbytes
        # A read that filled the buffer means more is waiting: read bigger next time.
        if nbytes == (MIN_READ << self.view_index) and self.view_index < _MAX_VIEW:
            self.view_index += 1

    def data_received(self, data):
        """Plain asyncio loops (not uvloop) deliver bytes; route them through the shared buffer."""
        cdef const unsigned char[:] view = data
        cdef Py_ssize_t off = 0, n
        while off < len(view):
            n = min(len(view) - off, MAX_READ)
            memcpy(_read_ptr + HEADROOM, &view[off], n)
            self.buffer_updated(n)
            off += n

    def eof_received(self):
        self.target_eof = True
        send_frame(self.ws, FRAME_DATA, self.stream_id, b"", FLAG_EOF)
        if self.client_eof:
            self.transport.close()
        return True  # keep our write side open: the client may still send

    def connection_lost(self, exc):
        if self.congested:
            self.congested = False
            self.conn.congest(-1)
        if not self.forgotten:
            self.forgotten = True
            self.conn.stream_ended(self, exc)

    def pause_writing(self):
        self.congested = True
        self.conn.congest(1)

    def resume_writing(self):
        if self.congested:
            self.congested = False
            self.conn.congest(-1)

    # -- called by the connection -----------------------------------------------

    cdef int client_data(self, const char* data, Py_ssize_t size, uint8_t flags) except -1:
        if self.client_eof or self.forgotten:
            return 0  # nothing may follow EOF; late frames of a closed stream are dropped
        if self.paused & PAUSE_CONNECTING:
            if size:
                self.pending_size += size
                if self.pending_size > MAX_PENDING:
                    self.conn.stream_failed(self, "client sent too much before OpenOk")
                    return 0
                self.pending.append(PyBytes_FromStringAndSize(<char*>data, size))
            if flags & FLAG_EOF:
                self.client_eof = True
            return 0
        if size:
            self._write(data, size)
        if flags & FLAG_EOF:
            self._shutdown_write()
        return 0

    cdef int _write(self, const char* data, Py_ssize_t size) except -1:
        cdef ssize_t sent = 0
        transport = self.transport
        if transport.is_closing():
            return 0  # its fd may already be reused; connection_lost will end the stream
        self.bytes_in += size
        if not transport.get_write_buffer_size():
            # Nothing queued: hand the bytes to the kernel straight from picows' buffer.
            while True:
                sent = send(self.fd, data, size, MSG_NOSIGNAL)
                if sent >= 0 or errno != EINTR:
                    break
            if sent == size:
                return 0
            if sent < 0:
                # EAGAIN: queue it all; anything else: let the transport see and report it.
                sent = 0
        # The view into picows' buffer dies with this callback, so the rest is copied.
        transport.write(PyBytes_FromStringAndSize(<char*>data + sent, size - sent))
        return 0

    cdef _shutdown_write(self):
        self.client_eof = True
        if self.transport.is_closing():
            return
        self.transport.write_eof()  # flushes what is queued, then shutdown(SHUT_WR)
        if self.target_eof:
            self.transport.close()

    def set_paused(self, int reason, bint on):
        """Add or remove a reason not to read the target; read while there is none."""
        cdef int before = self.paused
        self.paused = (self.paused | reason) if on else (self.paused & ~reason)
        if self.transport is None or self.forgotten or (before == 0) == (self.paused == 0):
            return
        if self.paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def start(self):
        """OpenOk is out: flush Data the client sent early and start reading the target."""
        pending, self.pending, self.pending_size = self.pending, [], 0
        self.set_paused(PAUSE_CONNECTING, False)
        for chunk in pending:
            self._write(chunk, len(chunk))
        if self.client_eof:
            self._shutdown_write()

    def forget(self):
        """Drop the target without telling the client (it closed the stream or the WebSocket)."""
        self.forgotten = True
        if self.transport is not None:
            self.transport.abort()


cdef class GatewayListener(WSListener):
    """picows listener base: runs the per-frame path; subclasses handle control frames.

    A subclass provides `on_control(type, flags, stream_id, payload: bytes)` for every
    frame that is not Data of a known stream, and `stream_ended(stream, exc)` /
    `stream_failed(stream, reason)` for streams ending on the target's side.
    """
    cdef:
        readonly WSTransport ws
        readonly dict streams
        readonly bint targets_paused
        FrameParser parser
        int congested

    def __init__(self, Py_ssize_t max_payload):
        self.streams = {}
        self.parser = FrameParser(max_payload)

    cpdef on_ws_connected(self, WSTransport transport):
        self.ws = transport
        transport.underlying_transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef FrameView fv
        cdef object stream
        if frame.msg_type == WSMsgType.BINARY or frame.msg_type == WSMsgType.CONTINUATION:
            try:
                self.parser.start(frame.payload_ptr, frame.payload_size)
                while self.parser.next_frame(&fv):
                    if fv.type == FRAME_DATA:
                        stream = self.streams.get(fv.stream_id)
                        if stream is not None:
                            (<Stream>stream).client_data(fv.payload, fv.payload_len, fv.flags)
                            continue
                    self.on_control(fv.type, fv.flags, fv.stream_id,
                                    PyBytes_FromStringAndSize(<char*>fv.payload, fv.payload_len))
            except FrameError as exc:
                self.fail(exc.close_code, exc.reason)
        elif frame.msg_type == WSMsgType.TEXT:
            self.fail(WSCloseCode.UNSUPPORTED_DATA, "KSW1 is carried in binary messages only")
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def fail(self, int code, str reason):
        """Close this WebSocket (and only it) with `code`."""
        self.ws.send_close(<WSCloseCode>code, reason.encode())
        self.ws.disconnect()

    cpdef pause_writing(self):
        self._pause_targets(True)

    cpdef resume_writing(self):
        self._pause_targets(False)

    cdef _pause_targets(self, bint on):
        self.targets_paused = on
        for stream in self.streams.values():
            stream.set_paused(PAUSE_WEBSOCKET, on)

    def congest(self, int delta):
        """Count targets whose write buffer is full; stop reading the WebSocket while any is."""
        cdef int before = self.congested
        self.congested += delta
        if self.ws is None or self.ws.is_disconnected:
            return
        if before == 0 and self.congested > 0:
            self.ws.underlying_transport.pause_reading()
        elif before > 0 and self.congested == 0:
            self.ws.underlying_transport.resume_reading()


assert _HEADER_SIZE == KSW1_HEADER
