"""bytes <-> PyKCS11's `ckbytelist` (a SWIG-wrapped `std::vector<unsigned char>`) in one copy.

SWIG converts a ckbytelist element by element, a Python-level iterator step per byte:
`bytes()` of a 64-byte signature costs ~25 µs, more than the agent's whole overhead per
call. The vector's storage is contiguous and its first member is the pointer to it (in
libstdc++, libc++ and MSVC alike), so one `string_at` / `memmove` does the same job.
That layout is checked once at import; should a platform differ, the element-wise
conversion is used instead.
"""
from __future__ import annotations

import ctypes
from typing import Any

import PyKCS11.LowLevel as LL


def _storage(vector: Any) -> int:
    """The address of a non-empty ckbytelist's elements (SWIG's `.this` is the vector)."""
    return ctypes.c_void_p.from_address(int(vector.this)).value or 0


def to_bytes(vector: Any) -> bytes:
    """The contents of a ckbytelist."""
    size = len(vector)
    if not _ONE_COPY:
        return bytes(vector)
    return ctypes.string_at(_storage(vector), size) if size else b""


def from_bytes(data: bytes | bytearray | memoryview) -> Any:
    """A ckbytelist holding data."""
    if not _ONE_COPY:
        return LL.ckbytelist(bytes(data))
    size = len(data)
    vector = LL.ckbytelist(size)  # zero-filled storage of the right size, one SWIG call
    if size:
        ctypes.memmove(_storage(vector), bytes(data), size)
    return vector


def _layout_holds() -> bool:
    """Whether the first word of a vector points at its elements: the vector's words
    must look like (begin, end, capacity) before begin is read; a known vector is read
    before one is written."""
    probe = bytes(range(7, 40))
    try:
        known = LL.ckbytelist(probe)
        begin, end, capacity = (ctypes.c_void_p * 3).from_address(int(known.this))
        if not begin or end is None or capacity is None or \
                end - begin != len(probe) or capacity < end:
            return False  # another layout (a debug standard library...): do not dereference
        if ctypes.string_at(begin, len(probe)) != probe:
            return False
        filled = LL.ckbytelist(len(probe))
        ctypes.memmove(_storage(filled), probe, len(probe))
        return bytes(filled) == probe
    except (TypeError, ValueError, OSError):
        return False


_ONE_COPY = _layout_holds()
