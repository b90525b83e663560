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

Small frames (short reads, control frames) are not sent one by one: a connection
collects the frames of one loop iteration into one WebSocket message, sent when
the iteration's I/O callbacks are done (one send(2) instead of one per frame).
Every frame of a connection goes through that batch, so order is kept.

`ksw1fast/server/relay.py` is the pure-Python twin of this module.
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport errno, EAGAIN, EINTR, ENOBUFS
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

from picows.picows cimport WSListener, WSTransport, WSFrame, WSMsgType, WSCloseCode
from ksw1fast._codec cimport FrameParser, FrameView, write_header
from ksw1fast._constants cimport *

from ksw1fast.protocol.constants import WSClose
from ksw1fast.protocol.errors import FrameError
from ksw1fast.protocol.close import CLOSE_TIMEOUT, close_reason, reply_to_close

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_NOSIGNAL

cdef class GatewayListener

cdef enum:
    HEADROOM = WS_HEADROOM + KSW1_HEADER
    BATCH_SIZE = 32 * 1024      # the most frame bytes one batched message carries
    BATCH_FRAME = 2 * 1024      # frames up to this size are batched, bigger ones go alone;
                                # also a new batch's size, grown by doubling as needed
    SPARE_BATCHES = 32          # batch buffers kept for reuse across connections

cdef bytearray _read_buf = bytearray(HEADROOM + MAX_READ)
cdef char* _read_ptr = _read_buf
# One read-only-sized view per read size (powers of two), made once: no allocation per read.
cdef list _views = []
cdef Py_ssize_t _size = MIN_READ
while _size <= MAX_READ:
    _views.append(memoryview(_read_buf)[HEADROOM:HEADROOM + _size])
    _size *= 2
cdef Py_ssize_t _MAX_VIEW = len(_views) - 1
# Frames too big for a batch are assembled here (with the same headroom) before they are sent.
cdef bytearray _scratch = bytearray(HEADROOM + 64 * 1024)
# Batch buffers not in use: a connection holds one only while it has frames waiting.
cdef list _spare_batches = []


cdef class Stream:
    """One entry of a connection's stream table: state shared by TCP and UDP.

    Client Data waits in `pending` until OpenOk is out (`start()`).  With FlowControl,
    `send_credit` is what we may still send the client and `recv_credit` what the client
    may still send us; we return client credit with DataAck as bytes leave for the target.
    """
    cdef:
        readonly uint32_t stream_id
        readonly GatewayListener conn   # the connection owning this stream
        readonly object transport
        WSTransport ws
        int fd
        int paused
        readonly bint forgotten
        readonly bint client_eof
        readonly bint flow_control
        long long send_credit
        long long recv_credit
        unsigned long long received  # client bytes handed to the target side
        unsigned long long acked     # of those, returned to the client as credit
        list pending
        Py_ssize_t pending_size
        readonly unsigned long long bytes_in
        readonly unsigned long long bytes_out
        readonly unsigned long long dropped  # datagrams dropped (UDP)

    def __cinit__(self, conn, uint32_t stream_id, bint flow_control=False,
                  long long credit=INITIAL_CREDIT):
        self.conn = conn
        self.stream_id = stream_id
        self.ws = conn.ws
        self.fd = -1
        self.paused = PAUSE_CONNECTING | (PAUSE_WEBSOCKET if conn.targets_paused else 0)
        self.flow_control = flow_control
        self.send_credit = credit
        self.recv_credit = credit
        self.pending = None  # made when needed: most streams never need it

    cdef int client_data(self, const char* data, Py_ssize_t size, uint8_t flags) except -1:
        if self.forgotten or self.client_eof:
            return 0  # nothing may follow EOF; late frames of a closed stream are dropped
        if self.flow_control:
            self.recv_credit -= size
            if self.recv_credit < 0:
                self.conn.stream_failed(self, "client overran its credit")
                return 0
        if self.paused & PAUSE_CONNECTING:
            if size:
                self.pending_size += size
                if self.pending_size > MAX_PENDING:
                    self.conn.stream_failed(self, "client sent too much before OpenOk")
                    return 0
                if self.pending is None:
                    self.pending = []
                self.pending.append(PyBytes_FromStringAndSize(<char*>data, size))
            if flags & FLAG_EOF:
                self.client_eof = True
            return 0
        if size:
            self.received += size
            self._deliver(data, size)
        if flags & FLAG_EOF:
            self._client_eof()
        if self.flow_control:
            self._return_credit(False)
        return 0

    cdef int _deliver(self, const char* data, Py_ssize_t size) except -1:
        """Hand client bytes to the target; `data` dies with the caller's callback."""
        return 0

    cdef _client_eof(self):
        self.client_eof = True

    cdef _reading(self, bint on):
        """Start or stop reading the target."""

    cdef int _socket_fd(self) except -1:
        """The target socket's fd for sends past the transport, looked up on the first
        one: uvloop's lookup costs a getsockname, and many streams never send."""
        if self.fd < 0:
            self.fd = self.transport.get_extra_info("socket").fileno()
        return self.fd

    cdef _return_credit(self, bint everything):
        """DataAck what has left our buffers: in steps, or all of it once drained."""
        cdef long long ready = <long long>(self.received - self.acked)
        if self.transport is not None:
            ready -= self.transport.get_write_buffer_size()
        if ready > 0 and (everything or ready >= ACK_STEP):
            self.acked += ready
            self.recv_credit += ready
            self.conn.send_frame(FRAME_DATA_ACK, self.stream_id, _u32(ready))

    cdef _sent(self, Py_ssize_t n):
        self.bytes_out += n
        if self.flow_control:
            self.send_credit -= n
            if self.send_credit <= 0:
                self.set_paused(PAUSE_CREDIT, True)

    def set_paused(self, int reason, bint on):
        """Add or remove a reason not to read the target; read while there is none."""
        cdef int before = self.paused
        self.paused = (self.paused | reason) if on else (self.paused & ~reason)
        if self.transport is not None and not self.forgotten and (before == 0) != (self.paused == 0):
            self._reading(self.paused == 0)

    def add_credit(self, long long n):
        """A DataAck from the client: it consumed n more bytes."""
        if self.flow_control:
            self.send_credit += n
            if self.send_credit > 0:
                self.set_paused(PAUSE_CREDIT, False)

    def start(self):
        """OpenOk is out: deliver Data the client sent early and start reading the target."""
        pending, self.pending, self.pending_size = self.pending or (), None, 0
        self.set_paused(PAUSE_CONNECTING, False)
        for chunk in pending:
            self.received += len(chunk)
            self._deliver(chunk, len(chunk))
        if self.client_eof:
            self._client_eof()
        if self.flow_control:
            self._return_credit(False)

    def forget(self):
        """Drop the target without telling the client (it closed the stream or the WebSocket)."""
        self.forgotten = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc):
        if not self.forgotten:
            self.forgotten = True
            self.conn.stream_ended(self, exc)


cdef class TcpStream(Stream):
    """asyncio BufferedProtocol of one target TCP connection."""
    cdef:
        Py_ssize_t view_index
        readonly bint target_eof
        bint congested

    # -- asyncio protocol -------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        if self.flow_control:
            # credits bound what the client sends; a drained buffer returns all of them
            transport.set_write_buffer_limits(FC_HIGH_WATER, 0)
        else:
            transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        transport.pause_reading()

    def get_buffer(self, Py_ssize_t sizehint):
        cdef Py_ssize_t index = self.view_index
        if self.flow_control and self.send_credit < (MIN_READ << index):
            if self.send_credit < MIN_READ:  # rare: a nearly spent window, read exactly it
                return memoryview(_read_buf)[HEADROOM:HEADROOM + self.send_credit]
            while (MIN_READ << index) > self.send_credit:
                index -= 1
        return _views[index]

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef char* msg
        if not self.conn.batch_frame(FRAME_DATA, 0, self.stream_id, _read_ptr + HEADROOM,
                                     nbytes):
            self.conn.flush()  # frames queued before this one leave first
            msg = _read_ptr + WS_HEADROOM
            write_header(msg, FRAME_DATA, 0, self.stream_id, <uint32_t>nbytes)
            self.ws.send_reuse_external_buffer(WSMsgType.BINARY, msg, KSW1_HEADER + nbytes)
        # A read that filled the buffer means more is waiting: read bigger next time.
        if nbytes == (MIN_READ << self.view_index) and self.view_index < _MAX_VIEW:
            self.view_index += 1
        self._sent(nbytes)

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
        self.conn.send_frame(FRAME_DATA, self.stream_id, b"", FLAG_EOF)
        if self.client_eof:
            self.transport.close()
        return True  # keep our write side open: the client may still send

    def connection_lost(self, exc):
        if self.congested:
            self.congested = False
            self.conn.congest(-1)
        Stream.connection_lost(self, exc)

    def pause_writing(self):
        if not self.flow_control:  # with credits, the client is already bounded per stream
            self.congested = True
            self.conn.congest(1)

    def resume_writing(self):
        if self.congested:
            self.congested = False
            self.conn.congest(-1)
        if self.flow_control and not self.forgotten:
            self._return_credit(True)

    # -- Stream hooks -------------------------------------------------------------

    cdef _reading(self, bint on):
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    cdef int _deliver(self, const char* data, Py_ssize_t size) except -1:
        cdef ssize_t sent = 0
        transport = self.transport
        if transport.is_closing():
            return 0  # its fd may already be reused; connection_lost will end the stream
        self.bytes_in += size
        if not transport.get_write_buffer_size():
            # Nothing queued: hand the bytes to the kernel straight from picows' buffer.
            sent = _send(self._socket_fd(), data, size)
            if sent == size:
                return 0
            if sent < 0:
                # EAGAIN: queue it all; anything else: let the transport see and report it.
                sent = 0
        # The view into picows' buffer dies with this callback, so the rest is copied.
        transport.write(PyBytes_FromStringAndSize(<char*>data + sent, size - sent))
        return 0

    cdef _client_eof(self):
        self.client_eof = True
        if self.transport.is_closing():
            return
        self.transport.write_eof()  # flushes what is queued, then shutdown(SHUT_WR)
        if self.target_eof:
            self.transport.close()


cdef class UdpStream(Stream):
    """asyncio DatagramProtocol of one connected UDP socket: one Data frame = one datagram.

    Datagrams are dropped (and counted), never queued without bound: when the client may
    not receive (WebSocket congested, OpenOk not out) and when a client datagram is too
    big or the socket cannot take it.
    """

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        cdef Py_ssize_t n = len(data)
        if self.forgotten:
            return
        if self.paused:
            self.dropped += 1
            return
        self.conn.send_frame(FRAME_DATA, self.stream_id, data)
        # No send credit: the polyfill acknowledges no UDP data, so a window would stop
        # the flow after 1 MiB; datagrams are dropped under pressure instead.
        self.bytes_out += n

    def error_received(self, exc):
        pass  # ICMP errors (port unreachable...) are normal for UDP; the flow stays open

    def pause_writing(self):
        pass  # _deliver drops datagrams while the socket's buffer is full

    def resume_writing(self):
        pass

    cdef int _deliver(self, const char* data, Py_ssize_t size) except -1:
        cdef ssize_t sent
        transport = self.transport
        if size > MAX_DATAGRAM or transport.is_closing() or \
                transport.get_write_buffer_size() > HIGH_WATER:
            self.dropped += 1
            return 0
        self.bytes_in += size
        if not transport.get_write_buffer_size():
            sent = _send(self._socket_fd(), data, size)
            if sent == size or (sent < 0 and errno != EAGAIN and errno != ENOBUFS):
                return 0  # sent, or refused by the network (ICMP): a datagram may be lost
        transport.sendto(PyBytes_FromStringAndSize(<char*>data, size))
        return 0


cdef inline ssize_t _send(int fd, const char* data, Py_ssize_t size) noexcept nogil:
    """send(2) without SIGPIPE, retried on EINTR; -1 with errno set on failure."""
    cdef ssize_t sent
    while True:
        sent = send(fd, data, size, MSG_NOSIGNAL)
        if sent >= 0 or errno != EINTR:
            return sent


cdef bytes _u32(long long n):
    cdef char out[4]
    out[0] = <char>(n & 0xFF)
    out[1] = <char>((n >> 8) & 0xFF)
    out[2] = <char>((n >> 16) & 0xFF)
    out[3] = <char>((n >> 24) & 0xFF)
    return PyBytes_FromStringAndSize(out, 4)


cdef class GatewayListener(WSListener):
    """picows listener base: runs the per-frame path; subclasses handle control frames.

    A subclass provides `on_control(type, flags, stream_id, payload: bytes)` for every
    frame that is not Data of a known stream, `stream_ended(stream, exc)` /
    `stream_failed(stream, reason)` for streams ending on the target's side, and
    `end_session()`, called once when the KSW1 session is over: a Close either way, or
    the socket gone without one.
    """
    cdef:
        readonly WSTransport ws
        readonly dict streams
        readonly bint targets_paused
        readonly bint closing       # a Close was sent: nothing else may follow it
        readonly unsigned long long frames_in  # WebSocket frames received (keepalive)
        FrameParser parser
        int congested               # targets whose write buffer is full
        readonly bint over_budget   # our queued output to the client passed send_limit
        bint reading_paused         # the client is not being read: congested or over budget
        Py_ssize_t send_limit
        double send_timeout
        bytearray batch             # frames waiting for the end of this loop iteration
        Py_ssize_t batch_len
        bint flush_scheduled
        object close_timer
        object budget_timer

    def __init__(self, Py_ssize_t max_payload, Py_ssize_t send_limit, double send_timeout):
        self.streams = {}
        self.parser = FrameParser(max_payload)
        self.send_limit = send_limit
        self.send_timeout = send_timeout

    cpdef on_ws_connected(self, WSTransport transport):
        self.ws = transport
        transport.underlying_transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        # picows keeps the upgrade request and response, headers and all, for the life of
        # the connection, and nothing reads them after the handshake: an idle connection
        # is cheaper without them
        transport.request = None
        transport.response = None

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef FrameView fv
        cdef object stream
        self.frames_in += 1
        if frame.msg_type == WSMsgType.CLOSE:
            self._on_close_frame(frame.get_payload_as_bytes())
        elif self.closing:
            return  # after our Close only the peer's answer matters
        elif frame.msg_type == WSMsgType.BINARY or frame.msg_type == WSMsgType.CONTINUATION:
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
                    if self.closing:
                        return  # that frame ended the session: the rest is not read
            except FrameError as exc:
                self.fail(exc.close_code, exc.reason)
        elif frame.msg_type == WSMsgType.TEXT:
            self.fail(WSClose.UNSUPPORTED_DATA, "KSW1 is carried in binary messages only")

    cdef _on_close_frame(self, bytes payload):
        """The peer's Close: answer it (unless it answers ours) and close the socket."""
        if not self.closing:
            self.flush()
            self.closing = True
            reply = reply_to_close(payload)
            if reply.code is None:  # picows' send_close always writes a code
                self.ws.send(WSMsgType.CLOSE, b"")
            else:
                self.ws.send_close(<WSCloseCode>reply.code, reply.reason)
            self.end_session()
        self.ws.disconnect()

    cpdef on_ws_disconnected(self, WSTransport transport):
        for timer in (self.close_timer, self.budget_timer):
            if timer is not None:
                timer.cancel()
        if not self.closing:  # the socket went without a Close
            self.closing = True
            self.end_session()

    def end_session(self):
        """The KSW1 session is over; subclasses release what it holds."""

    cpdef send_frame(self, uint8_t type, uint32_t stream_id, payload=b"", uint8_t flags=0):
        """Queue one KSW1 frame for the client: batched when small, else sent at once.

        Never picows' send() for this: for messages over 8 KiB it hands uvloop memoryviews
        of buffers that are reused, and uvloop queues them uncopied when the socket is busy.
        The external-buffer send copies whatever the kernel did not take.
        """
        cdef const unsigned char[::1] view = payload
        cdef Py_ssize_t n = view.shape[0]
        cdef const char* data = <const char*>&view[0] if n else NULL
        cdef bytearray buf
        cdef char* msg
        if self.closing:
            return
        if self.batch_frame(type, flags, stream_id, data, n):
            return
        self.flush()
        buf = _scratch if n <= len(_scratch) - HEADROOM else bytearray(HEADROOM + n)
        msg = PyByteArray_AS_STRING(buf) + WS_HEADROOM
        write_header(msg, type, flags, stream_id, <uint32_t>n)
        memcpy(msg + KSW1_HEADER, data, n)
        self.ws.send_reuse_external_buffer(WSMsgType.BINARY, msg, KSW1_HEADER + n)
        if self.targets_paused:
            self._check_budget()

    cdef bint batch_frame(self, uint8_t type, uint8_t flags, uint32_t stream_id,
                          const char* data, Py_ssize_t n) except -1:
        """Append a frame to the batch; False, doing nothing, if it is too big to batch.

        A batch starts at BATCH_FRAME bytes and doubles up to BATCH_SIZE, so thousands
        of connections each with one small reply in the same iteration stay cheap.
        """
        cdef Py_ssize_t size = KSW1_HEADER + n, capacity
        cdef char* at
        if size > BATCH_FRAME:
            return False
        if self.batch is not None and self.batch_len + size > BATCH_SIZE:
            self.flush()
        if self.batch is None:
            if not self.flush_scheduled:
                # call_soon callbacks run once this iteration's I/O callbacks are done
                self.ws._loop.call_soon(self._scheduled_flush)
                self.flush_scheduled = True
            self.batch = _spare_batches.pop() if _spare_batches else \
                bytearray(WS_HEADROOM + BATCH_FRAME)
        capacity = len(self.batch) - WS_HEADROOM
        if self.batch_len + size > capacity:
            PyByteArray_Resize(self.batch, WS_HEADROOM + min(2 * capacity, BATCH_SIZE))
        at = PyByteArray_AS_STRING(self.batch) + WS_HEADROOM + self.batch_len
        self.batch_len += size
        write_header(at, type, flags, stream_id, <uint32_t>n)
        if n:
            memcpy(at + KSW1_HEADER, data, n)
        return True

    def _scheduled_flush(self):
        self.flush_scheduled = False
        self.flush()

    cpdef flush(self):
        """Send the batched frames now, as one WebSocket message."""
        cdef bytearray batch = self.batch
        cdef Py_ssize_t size = self.batch_len
        if batch is None:
            return
        self.batch, self.batch_len = None, 0  # before sending: a failed send leaves no batch
        if not self.ws.is_disconnected:
            self.ws.send_reuse_external_buffer(WSMsgType.BINARY,
                                               PyByteArray_AS_STRING(batch) + WS_HEADROOM, size)
        if len(_spare_batches) < SPARE_BATCHES:
            _spare_batches.append(batch)  # picows copied what the kernel did not take
        if self.targets_paused:
            self._check_budget()

    def fail(self, int code, str reason):
        """Close this WebSocket (and only it) with `code`: the session ends now, the socket
        when the peer answers our Close (a client still sending would otherwise get a
        reset and lose the code), or after CLOSE_TIMEOUT."""
        if self.closing:
            return
        self.flush()
        self.closing = True
        self.ws.send_close(<WSCloseCode>code, close_reason(reason))
        self.end_session()
        self.close_timer = self.ws._loop.call_later(CLOSE_TIMEOUT, (<object>self.ws).disconnect)

    cpdef pause_writing(self):
        self._pause_targets(True)

    cpdef resume_writing(self):
        self._pause_targets(False)
        if self.over_budget:
            self.over_budget = False
            self.budget_timer.cancel()
            self._update_reading()

    cdef _pause_targets(self, bint on):
        self.targets_paused = on
        for stream in self.streams.values():
            stream.set_paused(PAUSE_WEBSOCKET, on)

    cdef _check_budget(self):
        """Targets are paused, so what still grows our queue to the client is what we
        generate in answer to it (Pongs, DNS and PKCS#11 replies...): past send_limit,
        stop reading the client until the queue drains, and close it with 1008 if it
        does not drain within send_timeout."""
        if self.over_budget or self.closing:
            return
        if self.ws.underlying_transport.get_write_buffer_size() + self.batch_len > self.send_limit:
            self.over_budget = True
            self._update_reading()
            self.budget_timer = self.ws._loop.call_later(self.send_timeout, self._budget_timed_out)

    def _budget_timed_out(self):
        if self.over_budget:
            self.fail(WSClose.POLICY_VIOLATION, "client does not read what it asked for")

    def congest(self, int delta):
        """Count targets whose write buffer is full; stop reading the WebSocket while any is."""
        self.congested += delta
        self._update_reading()

    cdef _update_reading(self):
        """Read the client unless a target is congested or our output is over budget."""
        cdef bint pause = self.congested > 0 or self.over_budget
        if pause == self.reading_paused or self.ws is None or self.ws.is_disconnected:
            return
        self.reading_paused = pause
        if pause:
            self.ws.underlying_transport.pause_reading()
        else:
            self.ws.underlying_transport.resume_reading()


def compiled_constants():
    """The values this module was compiled with (ksw1fast/_constants.pxd), for the test
    that they agree with the Python ones."""
    return {
        "KSW1_HEADER": KSW1_HEADER, "KSW1_VERSION": KSW1_VERSION, "FRAME_DATA": FRAME_DATA,
        "FRAME_DATA_ACK": FRAME_DATA_ACK, "FLAG_EOF": FLAG_EOF, "MIN_READ": MIN_READ,
        "MAX_READ": MAX_READ, "HIGH_WATER": HIGH_WATER, "LOW_WATER": LOW_WATER,
        "MAX_PENDING": MAX_PENDING, "INITIAL_CREDIT": INITIAL_CREDIT, "ACK_STEP": ACK_STEP,
        "FC_HIGH_WATER": FC_HIGH_WATER, "MAX_DATAGRAM": MAX_DATAGRAM,
        "WS_HEADROOM": WS_HEADROOM, "PAUSE_CONNECTING": PAUSE_CONNECTING,
        "PAUSE_WEBSOCKET": PAUSE_WEBSOCKET, "PAUSE_CREDIT": PAUSE_CREDIT,
    }
