"""Framing between the gateway and its PKCS#11 agent processes (over the agent's stdin/stdout).

Every message: u32 length of what follows, u8 op, u32 client, u32 query, then a body.
Little-endian like KSW1.  The agent runs calls for several `client`s (one per browser
connection in worker mode); `query` is the gateway's own id for matching the answer.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

_HEADER = struct.Struct("<IBII")
_FIXED = _HEADER.size - 4  # op, client, query: the part of the header the length counts

# gateway -> agent
OP_OPEN = 1      # body: the client's PKCS#11 scope (scope.Pkcs11Scope.to_wire), empty
                 # for none; answered by OPENED with the new client id
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


_RESULT = struct.Struct("<IBIIB")  # a RESULT's header and the status that starts its body
_FN_ID = struct.Struct("<H")


def pack(op: int, client: int, query: int, body: bytes = b"") -> bytes:
    return _HEADER.pack(_FIXED + len(body), op, client, query) + body


def pack_result(client: int, query: int, status: int, body: bytes) -> bytes:
    """pack(OP_RESULT, client, query, bytes([status]) + body), with one copy of body."""
    return _RESULT.pack(_FIXED + 1 + len(body), OP_RESULT, client, query, status) + body


def split_call(body: bytes) -> tuple[int, bytes]:
    """A CALL body's fn_id and args."""
    return _FN_ID.unpack_from(body)[0], body[_FN_ID.size:]


class Unpacker:
    """Incremental parser for both sides, fed whatever the pipe delivers."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        buf = self._buf
        buf += data
        messages, offset, size = [], 0, len(buf)
        while size - offset >= _HEADER.size:
            length, op, client, query = _HEADER.unpack_from(buf, offset)
            end = offset + 4 + length
            if end > size:
                break
            messages.append(Message(op, client, query, bytes(buf[offset + _HEADER.size:end])))
            offset = end
        del buf[:offset]  # once per feed, not once per message
        return messages
