"""The struct-only decoders of the hot calls (hotargs) against the generic wire.Reader, and
the one-copy ckbytelist conversions (ckbytes) against PyKCS11's element-wise ones."""
from __future__ import annotations

from typing import Any, Callable

import PyKCS11.LowLevel as LL
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ksw1fast.pkcs11 import ckbytes, hotargs
from ksw1fast.pkcs11.wire import Mechanism, Reader, WireError, Writer

TAILS = (hotargs.NO_TAIL, hotargs.SIZE_TAIL, hotargs.BYTES_TAIL)
u32s = st.integers(0, 2**32 - 1)
mechanisms = st.builds(Mechanism, st.integers(0, 2**64 - 1), st.none() | st.binary(max_size=40))


def generic_mechanism_call(args: bytes, keyed: bool, data: bool, tail: str) -> tuple[Any, ...]:
    """What the Dispatcher's generic parse reads for the same shape (handles unresolved)."""
    r = Reader(args)
    session, mechanism = r.u32(), r.mechanism()
    key = r.u32() if keyed else None
    payload = r.bytes() if data else None
    end = {hotargs.NO_TAIL: lambda: None, hotargs.SIZE_TAIL: r.u32,
           hotargs.BYTES_TAIL: r.bytes}[tail]()
    r.end()
    return session, mechanism.type, mechanism.parameter, key, payload, end


def encode(session: int, mechanism: Mechanism, key: int, payload: bytes, end: int | bytes,
           keyed: bool, data: bool, tail: str) -> bytes:
    w = Writer().u32(session).mechanism(mechanism)
    if keyed:
        w.u32(key)
    if data:
        w.bytes(payload)
    if tail == hotargs.SIZE_TAIL:
        w.u32(end)  # type: ignore[arg-type]
    elif tail == hotargs.BYTES_TAIL:
        w.bytes(end)  # type: ignore[arg-type]
    return w.getvalue()


def agrees(decode: Callable[[bytes], Any], generic: Callable[[bytes], Any], args: bytes) -> None:
    """The decoder gives the generic values, or None exactly where the generic one fails."""
    try:
        expected = generic(args)
    except WireError:
        assert decode(args) is None, args
    else:
        assert decode(args) == expected, args


@given(session=u32s, mechanism=mechanisms, key=u32s, payload=st.binary(max_size=40),
       size=u32s, signature=st.binary(max_size=20), keyed=st.booleans(), data=st.booleans(),
       tail=st.sampled_from(TAILS))
def test_mechanism_call_matches_the_reader(session: int, mechanism: Mechanism, key: int,
                                           payload: bytes, size: int, signature: bytes,
                                           keyed: bool, data: bool, tail: str) -> None:
    end = signature if tail == hotargs.BYTES_TAIL else size
    args = encode(session, mechanism, key, payload, end, keyed, data, tail)

    def decode(raw: bytes) -> Any:
        return hotargs.mechanism_call(raw, keyed, data, tail)

    def generic(raw: bytes) -> Any:
        return generic_mechanism_call(raw, keyed, data, tail)

    assert decode(args) is not None
    for cut in range(len(args)):  # every truncation
        agrees(decode, generic, args[:cut])
    agrees(decode, generic, args + b"\x00")  # a trailing byte


@pytest.mark.parametrize("flag", [2, 0xFF])
def test_a_bad_option_flag_is_left_to_the_generic_path(flag: int) -> None:
    args = Writer().u32(1).u64(0x1041).u8(flag).u32(0).u32(2).bytes(b"data").getvalue()
    with pytest.raises(WireError, match="option flag"):
        generic_mechanism_call(args, True, True, hotargs.NO_TAIL)
    assert hotargs.mechanism_call(args, True, True, hotargs.NO_TAIL) is None


def test_a_length_beyond_the_args_is_left_to_the_generic_path() -> None:
    args = Writer().u32(1).u64(0x1041).u8(0).u32(2).u32(1 << 31).getvalue() + b"data"
    assert hotargs.mechanism_call(args, True, True, hotargs.NO_TAIL) is None


@given(session=u32s, length=u32s)
def test_session_u32_matches_the_reader(session: int, length: int) -> None:
    args = Writer().u32(session).u32(length).getvalue()

    def generic(raw: bytes) -> tuple[int, int]:
        r = Reader(raw)
        values = r.u32(), r.u32()
        r.end()
        return values

    assert hotargs.session_u32(args) == (session, length)
    for cut in range(len(args)):
        agrees(hotargs.session_u32, generic, args[:cut])
    agrees(hotargs.session_u32, generic, args + b"\x01")


@pytest.mark.parametrize("size", [0, 1, 32, 33, 4096])
def test_ckbytes_round_trip(size: int) -> None:
    assert ckbytes._ONE_COPY  # the one-copy conversion is what runs here, not the fallback
    data = bytes(i * 7 % 256 for i in range(size))
    vector = ckbytes.from_bytes(data)
    assert isinstance(vector, LL.ckbytelist)
    assert list(vector) == list(data)  # as PyKCS11 sees it, element by element
    assert ckbytes.to_bytes(LL.ckbytelist(data)) == data
    assert ckbytes.to_bytes(vector) == data
    assert ckbytes.from_bytes(bytearray(data)).size() == size
