"""Bytes-like inputs of the codecs: flat byte views and checked unsigned fields."""
from __future__ import annotations

import operator
from typing import Union

Buffer = Union[bytes, bytearray, memoryview]


def byte_view(data: Buffer) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous bytes-like object."""
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def uint(value: int, bits: int, what: str) -> int:
    """`value` as an int, or ValueError when it does not fit an unsigned `bits`-bit field."""
    value = operator.index(value)
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} must fit in u{bits}, got {value}")
    return value
