"""Framing between the gateway and its PKCS#11 agent processes (over the agent's stdin/stdout).

Every message: u32 length of what follows, u8 op, u32 client, u32 query, then a body.
Little-endian like KSW1.  The agent runs calls for several `client`s (one per browser
connection in worker mode); `query` is the gateway's own id for matching the answer.
"""
from __future__ import annotations

import struct
from typing import BinaryIO, NamedTuple, Optional

_HEADER = struct.Struct("<IBII")
_FIXED = _HEADER.size - 4  # op, client, query: the part of the header the length counts

# gateway -> agent
OP_OPEN = 1      # body empty; answered by OPENED with the new client id
OP_CALL = 2      # body: u16 fn_id + args; answered by RESULT
OP_CLOSE = 3     # body empty; forget the client and close its sessions; no answer
# agent -> gateway
OP_READY = 10    # the module is loaded and initialised
OP_FAILED = 11   # body: UTF-8 reason; the agent exits
OP_OPENED = 12
OP_RESULT = 13   # body: u8 status + response body


class Message(NamedTuple):
    op: int
    client: int
    query: int
    body: bytes


def pack(op: int, client: int, query: int, body: bytes = b"") -> bytes:
    return _HEADER.pack(_FIXED + len(body), op, client, query) + body


def read_message(stream: BinaryIO) -> Optional[Message]:
    """Blocking read of one message (the agent's side); None at end of stream."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    length, op, client, query = _HEADER.unpack(head)
    body = stream.read(length - _FIXED)
    if len(body) < length - _FIXED:
        return None
    return Message(op, client, query, body)


class Unpacker:
    """Incremental parser for the gateway's side, fed whatever the pipe delivers."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        messages = []
        while len(self._buf) >= _HEADER.size:
            length, op, client, query = _HEADER.unpack_from(self._buf)
            end = 4 + length
            if len(self._buf) < end:
                break
            messages.append(Message(op, client, query, bytes(self._buf[_HEADER.size:end])))
            del self._buf[:end]
        return messages
