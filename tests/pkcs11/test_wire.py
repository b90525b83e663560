"""The PKCS#11 RPC codec (ksw1fast.pkcs11.wire) and the C forms of its values (ckapi)."""
from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ksw1fast.protocol.constants import Pkcs11Status
from ksw1fast.pkcs11 import ckapi, wire
from ksw1fast.pkcs11.wire import (Attribute, Mechanism, ModuleInfo, Reader, SessionInfo, SlotInfo,
                                  Tag, TokenInfo, WireError, Writer)

CKA_CLASS, CKA_TOKEN, CKA_LABEL, CKA_ID = 0x0, 0x1, 0x3, 0x102
CKA_START_DATE, CKA_VALUE_LEN = 0x110, 0x161
CKA_KEY_GEN_MECHANISM = 0x166
UNAVAILABLE = (1 << 64) - 1

_VALUES = {
    Tag.BOOLEAN: st.booleans(), Tag.UINT32: st.integers(0, 2**32 - 1),
    Tag.UINT64: st.integers(0, 2**64 - 1), Tag.BYTE_STRING: st.binary(max_size=40),
    Tag.STRING: st.text(max_size=20), Tag.KEY_KIND: st.integers(0, 2**32 - 1),
    Tag.OBJECT_CLASS: st.integers(0, 2**32 - 1), Tag.MECHANISM_TYPE: st.integers(0, 2**64 - 1),
    Tag.DATE_STRING: st.text(max_size=8), Tag.VENDOR_BYTES: st.binary(max_size=40),
}
attributes = st.sampled_from(list(Tag)).flatmap(
    lambda tag: st.builds(Attribute, st.integers(0, 2**32 - 1), st.just(tag), _VALUES[tag]))
mechanisms = st.builds(Mechanism, st.integers(0, 2**64 - 1), st.none() | st.binary(max_size=40))


def test_scalars_are_little_endian() -> None:
    body = Writer().u8(1).u16(0x0203).u32(0x04050607).u64(8).bool(True).bool(False).getvalue()
    assert body == b"\x01\x03\x02\x07\x06\x05\x04" + struct.pack("<Q", 8) + b"\x01\x00"
    r = Reader(body)
    assert (r.u8(), r.u16(), r.u32(), r.u64(), r.bool(), r.bool()) == (1, 0x0203, 0x04050607, 8,
                                                                       True, False)
    r.end()
    assert Reader(b"\x07").bool() is True  # any non-zero byte is true


def test_composites() -> None:
    body = (Writer().bytes(b"ab").string("é").option(None, Writer.u32).option(5, Writer.u32)
            .list([1, 2], Writer.u64).version((2, 40)).getvalue())
    assert body[:6] == b"\x02\x00\x00\x00ab" and body[6:12] == b"\x02\x00\x00\x00\xc3\xa9"
    r = Reader(body)
    assert r.bytes() == b"ab" and r.string() == "é"
    assert r.option(Reader.u32) is None and r.option(Reader.u32) == 5
    assert r.list(Reader.u64) == [1, 2] and r.version() == (2, 40)
    r.end()


def test_attribute_layout() -> None:
    body = Writer().attribute(Attribute(CKA_LABEL, Tag.STRING, "ab")).getvalue()
    assert body == struct.pack("<IB", CKA_LABEL, 5) + b"\x02\x00\x00\x00ab"
    assert Writer().attribute(Attribute(CKA_TOKEN, Tag.BOOLEAN, True)).getvalue() \
        == struct.pack("<IBB", CKA_TOKEN, 1, 1)
    assert Writer().mechanism(Mechanism(0x1082, b"iv")).getvalue() \
        == struct.pack("<QB", 0x1082, 1) + b"\x02\x00\x00\x00iv"


@given(st.lists(attributes, max_size=5), mechanisms)
def test_round_trip(attrs: list[Attribute], mech: Mechanism) -> None:
    r = Reader(Writer().attributes(attrs).mechanism(mech).getvalue())
    assert r.attributes() == attrs and r.mechanism() == mech
    r.end()


@given(st.lists(attributes, min_size=1, max_size=3))
def test_every_truncation_is_a_wire_error(attrs: list[Attribute]) -> None:
    body = Writer().attributes(attrs).getvalue()
    for cut in range(len(body)):
        with pytest.raises(WireError):
            r = Reader(body[:cut])
            r.attributes()
            r.end()


@pytest.mark.parametrize("body, message", [
    (struct.pack("<IIB", 1, CKA_LABEL, 11), "unknown attribute tag 11"),
    (struct.pack("<IIB", 1, CKA_LABEL, 0), "unknown attribute tag 0"),
    (struct.pack("<I", 1000) + b"\x00" * 8, "truncated list"),  # no allocation for a lie
    (b"\x02\x00\x00\x00\xff\xfe", None),
])
def test_malformed(body: bytes, message: str | None) -> None:
    with pytest.raises(WireError, match=message):
        r = Reader(body)
        if message:
            r.attributes()
        else:
            r.string()  # not UTF-8


def test_option_flag_and_trailing_bytes() -> None:
    with pytest.raises(WireError, match="option"):
        Reader(b"\x02").option(Reader.u8)
    r = Reader(b"\x01\x00\x00\x00\x09")
    r.u32()
    with pytest.raises(WireError, match="1 trailing"):
        r.end()
    assert issubclass(WireError, ValueError)
    with pytest.raises(WireError, match="u8"):
        Writer().u8(256)


def test_info_records_trim_and_hide_unknowns() -> None:
    token = TokenInfo("label" + " " * 27, "maker\0\0", "model ", "serial", 0x40D, 10, 1, 10, 0,
                      255, 4, UNAVAILABLE, 7, None, UNAVAILABLE, (2, 6), (2, 7), " " * 16)
    decoded = Reader(Writer().token_info(token).getvalue()).token_info()
    assert decoded == TokenInfo("label", "maker", "model", "serial", 0x40D, 10, 1, 10, 0, 255, 4,
                                None, 7, None, None, (2, 6), (2, 7), None)
    clock = Reader(Writer().token_info(
        TokenInfo("t", "t", "t", "t", 0x40, 0, 0, 0, 0, 0, 0, None, None, None, None, (0, 0),
                  (0, 0), "2026112422414200")).getvalue()).token_info()
    assert clock.utc_time == "2026112422414200"
    module = ModuleInfo((2, 40), "SoftHSM" + " " * 25, 0, "Implementation ", (2, 6))
    body = Writer().module_info(module).getvalue()
    assert body == (b"\x02\x28" + b"\x07\x00\x00\x00SoftHSM" + struct.pack("<Q", 0)
                    + b"\x0e\x00\x00\x00Implementation" + b"\x02\x06")
    slot = SlotInfo("desc  ", "maker", 7, (1, 2), (3, 4))
    assert Reader(Writer().slot_info(slot).getvalue()).slot_info() \
        == SlotInfo("desc", "maker", 7, (1, 2), (3, 4))
    session = SessionInfo(0x5116243F, 3, 6, 0)
    body = Writer().session_info(session).getvalue()
    assert len(body) == 4 + 1 + 4 + 8 and Reader(body).session_info() == session
    assert Writer().mechanism_info(wire.MechanismInfo(512, 16384, 0x62B00)).getvalue() \
        == struct.pack("<QQI", 512, 16384, 0x62B00)


def test_response_bodies() -> None:
    assert wire.ok(b"x") == (Pkcs11Status.OK, b"x")
    status, body = wire.ck_error(0xA0, "C_Login: CKR_PIN_INCORRECT")
    assert status == Pkcs11Status.CK_ERROR
    assert body == b"\xa0\x00\x00\x00C_Login: CKR_PIN_INCORRECT"  # no length prefix
    assert wire.error_of(status, body) == (0xA0, "C_Login: CKR_PIN_INCORRECT")
    for make, expected in ((wire.protocol_error, Pkcs11Status.PROTOCOL_ERROR),
                           (wire.internal, Pkcs11Status.INTERNAL),
                           (wire.auth_denied, Pkcs11Status.AUTH_DENIED)):
        status, body = make("why")
        assert status == expected and body == b"\x03\x00\x00\x00why"
        assert wire.error_of(status, body) == (None, "why")


def test_function_table() -> None:
    assert len(wire.FUNCTIONS) == 70  # every row of the tables of docs/pkcs11.md §4
    assert wire.FUNCTIONS[0x0001] == wire.FUNCTIONS[0x000A] == "GetSlotInfo"
    assert wire.FUNCTION_IDS["GetSlotInfo"] == 0x000A  # the current id, not the legacy one
    assert wire.FUNCTIONS[0xFF00] == "HandleDrop" and wire.FUNCTIONS[0x0132] == "LoginVendor"
    assert wire.check_function_names(["Sign", "Sign"]) == {"Sign"}
    with pytest.raises(ValueError, match="'Sing'"):
        wire.check_function_names(["Sign", "Sing"])


def test_pointer_parameters() -> None:
    param = wire.encode_parameter(0x1050, 1, b"", b"\x04point")
    assert param == struct.pack("<Q", 1) + b"\x00" * 4 + b"\x06\x00\x00\x00\x04point"
    assert wire.decode_parameter(0x1050, param) == [1, b"", b"\x04point"]
    with pytest.raises(ValueError):
        wire.encode_parameter(0x1050, 1, b"")
    with pytest.raises(WireError):
        wire.decode_parameter(0x1050, param + b"\x00")


# --- the C side: ckapi ----------------------------------------------------------------

def test_native_values() -> None:
    ulong = struct.calcsize("@L")
    assert ckapi.native_value(Attribute(CKA_TOKEN, Tag.BOOLEAN, True)) == b"\x01"
    assert ckapi.native_value(Attribute(CKA_TOKEN, Tag.UINT64, 0)) == b"\x00"  # a CK_BBOOL
    assert ckapi.native_value(Attribute(CKA_CLASS, Tag.OBJECT_CLASS, 4)) \
        == struct.pack("@L", 4) and ulong == 8
    assert ckapi.native_value(Attribute(CKA_VALUE_LEN, Tag.UINT32, 16)) == struct.pack("@L", 16)
    assert ckapi.native_value(Attribute(CKA_LABEL, Tag.STRING, "é")) == "é".encode()
    assert ckapi.native_value(Attribute(CKA_ID, Tag.VENDOR_BYTES, b"\x00\x01")) == b"\x00\x01"
    assert ckapi.native_value(Attribute(CKA_START_DATE, Tag.DATE_STRING, "20260101")) \
        == b"20260101"


def test_wire_attributes_are_tagged_by_type() -> None:
    def tagged(cka: int, raw: bytes) -> tuple[Tag, object]:
        attr = ckapi.wire_attribute(cka, raw)
        return attr.tag, attr.value

    ulong = lambda n: struct.pack("@L", n)  # noqa: E731
    assert tagged(CKA_CLASS, ulong(3)) == (Tag.OBJECT_CLASS, 3)
    assert tagged(CKA_CLASS, ulong(1 << 40)) == (Tag.UINT64, 1 << 40)  # beyond a u32
    assert tagged(CKA_TOKEN, b"\x01") == (Tag.BOOLEAN, True)
    assert tagged(CKA_VALUE_LEN, ulong(32)) == (Tag.UINT64, 32)
    assert tagged(CKA_KEY_GEN_MECHANISM, ulong(0x1080)) == (Tag.MECHANISM_TYPE, 0x1080)
    assert tagged(CKA_LABEL, b"key") == (Tag.STRING, "key")
    assert tagged(CKA_LABEL, b"\xff") == (Tag.BYTE_STRING, b"\xff")  # not UTF-8
    assert tagged(CKA_START_DATE, b"") == (Tag.DATE_STRING, "")
    assert tagged(CKA_ID, b"\x01") == (Tag.BYTE_STRING, b"\x01")
    assert tagged(CKA_TOKEN, b"\x01\x00") == (Tag.BYTE_STRING, b"\x01\x00")  # odd size
    assert tagged(0x7FFF0000, b"v") == (Tag.BYTE_STRING, b"v")


def test_native_pointer_parameter() -> None:
    public = b"\x04" + b"\x11" * 64
    native = ckapi.NativeParameter(Mechanism(0x1050, wire.encode_parameter(0x1050, 1, b"",
                                                                           public)))
    kdf, shared_len, shared, public_len, pointer = struct.unpack("@LLPLP", native.blob)
    assert (kdf, shared_len, shared, public_len) == (1, 0, 0, len(public))
    assert ctypes.string_at(pointer, public_len) == public
    verbatim = ckapi.NativeParameter(Mechanism(0x1082, b"0123456789abcdef"))
    assert verbatim.blob == b"0123456789abcdef"
    with pytest.raises(WireError):
        ckapi.NativeParameter(Mechanism(0x1050, b"\x01"))


# --- the args layout table (args.py) -------------------------------------------------

def test_every_fn_has_a_layout_and_check_agrees_with_an_agent() -> None:
    from ksw1fast.pkcs11 import args

    assert args.ARGS.keys() == wire.FUNCTIONS.keys()
    assert args.check(0x0000, b"\x01") is None                 # GetSlotList(true)
    assert args.check(0x0000, b"") == "malformed GetSlotList args: " + str(
        _wire_error(lambda: Reader(b"").bool()))
    assert args.check(0x0009, b"x").startswith("malformed GetInfo args: ")  # trailing byte
    assert args.check(0x4242, b"") == "unknown fn id 0x4242"
    # a pointer-parameter mechanism (OAEP) whose parameter is not its wire fields
    encrypt = Writer().u32(1).mechanism(Mechanism(0x0009, b"\x00")).u32(2).bytes(b"x").u32(16)
    assert args.check(0x010B, encrypt.getvalue()).startswith("malformed Encrypt args")


def _wire_error(read) -> WireError:
    try:
        read()
    except WireError as exc:
        return exc
    raise AssertionError("no WireError")
