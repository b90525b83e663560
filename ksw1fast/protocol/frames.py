"""KSW1 framing in pure Python (docs/protocol.md §1-§2): the frame parser and the header.

The readable reference: ``ksw1fast._codec`` is its compiled twin with the same API and
behaviour, byte for byte and error for error, and the tests feed both the same inputs.
Payloads are not framing: ksw1fast.protocol.payloads has their one codec.
"""
from __future__ import annotations

import operator
import struct
from typing import Optional

from ksw1fast.protocol.buffers import Buffer, byte_view, uint
from ksw1fast.protocol.constants import (DEFAULT_MAX_PAYLOAD, HEADER_SIZE, MAGIC, VERSION,
                                         WSClose)
from ksw1fast.protocol.errors import FrameError
from ksw1fast.protocol.messages import Frame

__all__ = ["FrameParser", "encode_frame", "pack_header"]

# magic, version, type, flags, (reserved), stream_id, payload_len
_HEADER = struct.Struct("<4sBBBxII")
_PREFIX = struct.Struct("<4sB")  # magic, version: the first 5 bytes of a header



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
        self._max_payload = uint(max_payload, 32, "max_payload")
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
            return self._parse(byte_view(data))
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
    header = _HEADER.pack(MAGIC, VERSION, uint(type, 8, "type"), uint(flags, 8, "flags"),
                          uint(stream_id, 32, "stream_id"), uint(payload_len, 32, "payload_len"))
    offset = operator.index(offset)
    with byte_view(buf) as view:
        if view.readonly:
            raise TypeError("pack_header needs a writable buffer")
        if not 0 <= offset <= len(view) - HEADER_SIZE:
            raise ValueError(f"no room for a {HEADER_SIZE}-byte header at offset {offset} of {len(view)} bytes")
        view[offset:offset + HEADER_SIZE] = header


def encode_frame(type: int, stream_id: int, payload: Buffer = b"", flags: int = 0) -> bytes:
    """One frame: header (reserved 0, version 1) then `payload`."""
    with byte_view(payload) as body:
        header = _HEADER.pack(MAGIC, VERSION, uint(type, 8, "type"), uint(flags, 8, "flags"),
                              uint(stream_id, 32, "stream_id"), uint(len(body), 32, "payload length"))
        return header + body
