"""Struct-only decoders for the args of the calls a busy client repeats (docs/pkcs11.md §4).

The generic `wire.Reader` costs a few µs per call (an object, a method per field); these
split the same bytes with precompiled Structs. They only split: a decoder answers None
for anything but well-formed args of its shape (truncated, trailing bytes, a bad option
flag), and the caller then parses with the generic reader, which says what is wrong.
Resolving handles and checking sizes is the caller's job, on the raw values returned.
"""
from __future__ import annotations

import struct

from ksw1fast.pkcs11.wire import U32

# a tail after the data: none (Sign, Digest), a u32 output size (Encrypt, Decrypt,
# SignRecover, VerifyRecover) or a bytes signature (Verify)
NO_TAIL, SIZE_TAIL, BYTES_TAIL = "-", "size", "bytes"

_HEAD = struct.Struct("<IQB")     # session, mechanism type, parameter option flag
_SIZED = struct.Struct("<II")     # session, u32 (GenerateRandom's length)

MechanismArgs = tuple[int, int, bytes | None, int | None, bytes | None, int | bytes | None]


def mechanism_call(args: bytes, keyed: bool, data: bool, tail: str) -> MechanismArgs | None:
    """`session Mechanism [key] [bytes data] [tail]`, the Init and one-shot calls:
    (session, mechanism type, parameter or None, key or None, data or None, tail or None)."""
    size = len(args)
    if size < _HEAD.size:
        return None
    session, mechanism, flag = _HEAD.unpack_from(args)
    pos = _HEAD.size
    parameter = None
    if flag:
        parameter, pos = _bytes(args, pos, size)
        if flag != 1 or parameter is None:
            return None
    key = None
    if keyed:
        if pos + 4 > size:
            return None
        key = U32.unpack_from(args, pos)[0]
        pos += 4
    payload = None
    if data:
        payload, pos = _bytes(args, pos, size)
        if payload is None:
            return None
    end: int | bytes | None = None
    if tail == SIZE_TAIL:
        if pos + 4 > size:
            return None
        end = U32.unpack_from(args, pos)[0]
        pos += 4
    elif tail == BYTES_TAIL:
        end, pos = _bytes(args, pos, size)
        if end is None:
            return None
    if pos != size:
        return None
    return session, mechanism, parameter, key, payload, end


def session_u32(args: bytes) -> tuple[int, int] | None:
    """`session u32`: GenerateRandom's (session, length)."""
    return _SIZED.unpack(args) if len(args) == _SIZED.size else None


def _bytes(args: bytes, pos: int, size: int) -> tuple[bytes | None, int]:
    """A u32-prefixed byte string at pos and the offset after it; None when truncated."""
    if pos + 4 > size:
        return None, pos
    end = pos + 4 + U32.unpack_from(args, pos)[0]
    if end > size:
        return None, pos
    return args[pos + 4:end], end
