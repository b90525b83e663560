# C-level interface of the compiled codec, cimported by the compiled relay.
from libc.stdint cimport uint8_t, uint32_t


cdef struct FrameView:
    uint8_t type
    uint8_t flags
    uint32_t stream_id
    const char* payload        # valid until the next start()/next_frame() call
    Py_ssize_t payload_len


cdef class FrameParser:
    cdef:
        readonly Py_ssize_t max_payload
        bytearray _partial     # bytes of an unfinished frame carried across feeds
        Py_ssize_t _need       # total size of the unfinished frame once its header is known, else 0
        bytes _done            # keeps a frame assembled from _partial alive for its FrameView
        const char* _in        # current input (not owned), set by start()
        Py_ssize_t _in_len
        Py_ssize_t _in_pos
        object _error          # the FrameError that killed this parser, if any

    cdef int start(self, const char* data, Py_ssize_t size) except -1
    cdef int next_frame(self, FrameView* out) except -1


cdef void write_header(char* dst, uint8_t type, uint8_t flags, uint32_t stream_id,
                       uint32_t payload_len) noexcept nogil
