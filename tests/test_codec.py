"""The KSW1 codec: framing (the pure-Python twin and the compiled module must behave
identically) and the one payload codec."""
from __future__ import annotations

import ipaddress
import socket
from types import ModuleType
from typing import Any, Callable, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ksw1fast import _codec as ccodec
from ksw1fast.protocol import frames as pycodec
from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import (DEFAULT_MAX_PAYLOAD, HEADER_SIZE, AddrKind, FrameType,
                                         Pkcs11Status)
from ksw1fast.protocol.errors import FrameError, MalformedPayload
from ksw1fast.protocol.messages import (
    DnsQuery,
    ErrorReply,
    Frame,
    Hello,
    HelloAck,
    OpenOkInfo,
    OpenRequest,
    Pkcs11Request,
    Pkcs11Response,
    SockAddr,
)

MODULES = [pycodec, ccodec]
SMALL_MAX = 1024
IPV6_LOOPBACK = socket.inet_pton(socket.AF_INET6, "::1")


@pytest.fixture(params=MODULES, ids=["python", "compiled"])
def framing(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def header(type_: int, stream_id: int, payload_len: int, flags: int = 0) -> bytes:
    """A header built by hand, independent of the code under test."""
    return (b"KSW1\x01" + bytes([type_, flags, 0]) + stream_id.to_bytes(4, "little")
            + payload_len.to_bytes(4, "little"))


def as_tuples(frames: list[Frame]) -> list[tuple[int, int, int, bytes]]:
    return [(f.type, f.flags, f.stream_id, bytes(f.payload)) for f in frames]


def test_compiled_module_is_an_extension() -> None:
    assert ccodec.__file__ is not None and ccodec.__file__.endswith(".so")


def test_constants() -> None:
    assert (HEADER_SIZE, DEFAULT_MAX_PAYLOAD) == (16, 16 * 1024 * 1024)


# -- exact bytes ------------------------------------------------------------------------

EXACT = [
    ("hello", (0x2E, 64), "2e000000" "40000000"),
    ("hello", (0x2E, 64, b"abc"), "2e000000" "40000000" "0300" "616263"),
    ("hello_ack", (0x2E, 64), "2e000000" "40000000"),
    ("hello_ack", (0x2F, 64, DEFAULT_MAX_PAYLOAD, 1 << 20), "2f000000" "40000000" "00000001" "00001000"),
    # what the polyfill sends: TCP, hostname as text, no token
    ("open", (1, 1, 8080, b"localhost"), "01" "01" "901f" "0900" + b"localhost".hex() + "0000"),
    ("open", (2, 2, 53, b"\x7f\x00\x00\x01", b"tk"), "02" "02" "3500" "0400" "7f000001" "0200" "746b"),
    ("open_ok", (), ""),
    ("open_ok", (OpenOkInfo(SockAddr("127.0.0.1", 5), SockAddr("::1", 443)),),
     "02" "0500" "0400" "7f000001" "03" "bb01" "1000" + IPV6_LOOPBACK.hex()),
    ("open_err", (1, "blocked"), "01" "0700" + b"blocked".hex()),
    ("dns_err", (3, "no such host"), "03" "0c00" + b"no such host".hex()),
    ("close", (), "00000000"),
    ("close", (1,), "01000000"),
    ("data_ack", (65536,), "00000100"),
    ("dns_query", (0, "example.com"), "00" "0b00" + b"example.com".hex()),
    ("dns_result", ([b"\x7f\x00\x00\x01", IPV6_LOOPBACK],), "0200" "0400" "7f000001" "1000" + IPV6_LOOPBACK.hex()),
    ("dns_result", ([],), "0000"),
    ("pkcs11_request", (0x0102, b"ab"), "0201" "6162"),
    ("pkcs11_response", (0, b"\x01\x02"), "00" "0102"),
    ("pkcs11_response", (4,), "04"),
]


@pytest.mark.parametrize("name, args, expected", EXACT)
def test_encode_exact_bytes(name: str, args: tuple[Any, ...], expected: str) -> None:
    assert getattr(payloads, f"encode_{name}")(*args) == bytes.fromhex(expected)


def test_encode_frame_exact_bytes(framing: ModuleType) -> None:
    frame = framing.encode_frame(FrameType.DATA, 0x01020304, b"hi", 0x01)
    assert frame == bytes.fromhex("4b535731" "01" "20" "01" "00" "04030201" "02000000" "6869")


def test_close_ack_is_an_empty_frame(framing: ModuleType) -> None:
    frame = framing.encode_frame(FrameType.CLOSE_ACK, 3)
    assert frame == b"KSW1\x01\x31\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00"
    assert payloads.decode_close(b"") == 0
    assert payloads.decode_close(b"\x00\x00\x00\x00") == 0  # what the reference sends


def test_pack_header(framing: ModuleType) -> None:
    buf = bytearray(b"\xee" * 20)
    framing.pack_header(buf, 2, FrameType.DATA, 0x01, 7, 5)
    assert buf == b"\xee\xee" + header(0x20, 7, 5, flags=1) + b"\xee\xee"
    view = memoryview(buf)[4:]
    framing.pack_header(view, 0, FrameType.PING, 0, 0, 0)
    assert buf[4:] == header(0xF0, 0, 0)


@pytest.mark.parametrize("buf, offset, exc", [
    (b"\x00" * 16, 0, TypeError),  # read-only
    (bytearray(16), 1, ValueError),
    (bytearray(16), -1, ValueError),
    (bytearray(15), 0, ValueError),
])
def test_pack_header_rejects(framing: ModuleType, buf: Any, offset: int, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        framing.pack_header(buf, offset, 1, 0, 0, 0)


# -- round trips --------------------------------------------------------------------------

ROUND_TRIPS = [
    ("hello", (0x2F, 64), Hello(0x2F, 64, None)),
    ("hello", (1, 2, b""), Hello(1, 2, b"")),
    ("hello", (0xFFFFFFFF, 0xFFFFFFFF, b"t" * 300), Hello(0xFFFFFFFF, 0xFFFFFFFF, b"t" * 300)),
    ("hello_ack", (0x2E, 64), HelloAck(0x2E, 64, None, None)),
    ("hello_ack", (0x2F, 64, 1024, 2048), HelloAck(0x2F, 64, 1024, 2048)),
    ("open", (1, 1, 8080, b"localhost"), OpenRequest(1, 1, 8080, b"localhost", b"")),
    ("open", (2, 3, 65535, IPV6_LOOPBACK, b"token"), OpenRequest(2, 3, 65535, IPV6_LOOPBACK, b"token")),
    ("open", (9, 9, 0, b""), OpenRequest(9, 9, 0, b"", b"")),  # values are the server's business
    ("open_ok", (), None),
    ("open_ok", (OpenOkInfo(SockAddr("10.0.0.1", 40000), SockAddr("2001:db8::5", 443)),),
     OpenOkInfo(SockAddr("10.0.0.1", 40000), SockAddr("2001:db8::5", 443))),
    ("open_ok", (OpenOkInfo(SockAddr("fe80::1%eth0", 1), SockAddr("::ffff:1.2.3.4", 2)),),
     OpenOkInfo(SockAddr("fe80::1", 1), SockAddr("::ffff:1.2.3.4", 2))),
    ("open_err", (9, "id in use"), ErrorReply(9, "id in use")),
    ("open_err", (2, ""), ErrorReply(2, "")),
    ("open_err", (4, "délai dépassé ⏱"), ErrorReply(4, "délai dépassé ⏱")),
    ("dns_err", (3, "nxdomain"), ErrorReply(3, "nxdomain")),
    ("close", (), 0),
    ("close", (0xFFFFFFFF,), 0xFFFFFFFF),
    ("data_ack", (1 << 20,), 1 << 20),
    ("dns_query", (6, "exämple.org"), DnsQuery(6, "exämple.org")),
    ("dns_query", (4, ""), DnsQuery(4, "")),
    ("dns_result", ([b"\x01\x02\x03\x04"] * 3,), [b"\x01\x02\x03\x04"] * 3),
    ("pkcs11_request", (7,), Pkcs11Request(7, b"")),
    ("pkcs11_request", (0xFFFF, b"\x00" * 100), Pkcs11Request(0xFFFF, b"\x00" * 100)),
    ("pkcs11_response", (2, b"\x05\x00\x00\x00oops"), Pkcs11Response(2, b"\x05\x00\x00\x00oops")),
]

BUFFER_TYPES: list[Callable[[bytes], Union[bytes, bytearray, memoryview]]] = [
    bytes, bytearray, memoryview, lambda b: memoryview(b"xx" + b + b"yy")[2:-2]]


@pytest.mark.parametrize("name, args, decoded", ROUND_TRIPS)
@pytest.mark.parametrize("wrap", BUFFER_TYPES, ids=["bytes", "bytearray", "memoryview", "slice"])
def test_round_trip(name: str, args: tuple[Any, ...], decoded: Any,
                    wrap: Callable[[bytes], Any]) -> None:
    payload = getattr(payloads, f"encode_{name}")(*args)
    assert type(payload) is bytes
    result = getattr(payloads, f"decode_{name}")(wrap(payload))
    assert result == decoded
    fields = result if isinstance(result, (tuple, list)) else [result]
    assert not any(isinstance(field, (memoryview, bytearray)) for field in fields)


def test_encoders_accept_bytes_like(framing: ModuleType) -> None:
    assert payloads.encode_open(1, 1, 80, bytearray(b"a"), memoryview(b"t")) == payloads.encode_open(1, 1, 80, b"a", b"t")
    assert framing.encode_frame(1, 1, bytearray(b"xy")) == framing.encode_frame(1, 1, b"xy")
    assert payloads.encode_pkcs11_request(1, memoryview(b"ab")) == payloads.encode_pkcs11_request(1, b"ab")
    assert payloads.encode_dns_result([bytearray(4)]) == payloads.encode_dns_result([bytes(4)])


@pytest.mark.parametrize("name, payload, decoded", [
    ("hello", b"\x01\x00\x00\x00\x02\x00\x00\x00\x01\x00Xjunk", Hello(1, 2, b"X")),
    ("hello_ack", b"\x01\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00", HelloAck(1, 2, None, None)),
    ("hello_ack", bytes(16) + b"junk", HelloAck(0, 0, 0, 0)),
    ("open", b"\x01\x01\x50\x00\x01\x00a\x00\x00junk", OpenRequest(1, 1, 80, b"a", b"")),
    ("open_ok", bytes.fromhex("02000004007f000001" "02000004007f000001") + b"junk",
     OpenOkInfo(SockAddr("127.0.0.1", 0), SockAddr("127.0.0.1", 0))),
    ("open_err", b"\x01\x01\x00ajunk", ErrorReply(1, "a")),
    ("close", b"\x02\x00\x00\x00junk", 2),
    ("data_ack", b"\x02\x00\x00\x00junk", 2),
    ("dns_query", b"\x04\x01\x00ajunk", DnsQuery(4, "a")),
    ("dns_result", b"\x01\x00\x04\x00abcdjunk", [b"abcd"]),
])
def test_decoders_ignore_trailing_bytes(name: str, payload: bytes, decoded: Any) -> None:
    assert getattr(payloads, f"decode_{name}")(payload) == decoded


def test_error_reply_message_is_cut_on_a_character_boundary() -> None:
    payload = payloads.encode_open_err(9, "é" * 40000)  # 80000 UTF-8 bytes
    assert int.from_bytes(payload[1:3], "little") == 65534 == len(payload) - 3
    assert payloads.decode_open_err(payload) == ErrorReply(9, "é" * 32767)
    exact = "a" * 65535
    assert payloads.decode_dns_err(payloads.encode_dns_err(1, exact)) == ErrorReply(1, exact)


def test_error_reply_replaces_invalid_utf8() -> None:
    assert payloads.decode_open_err(b"\x09\x02\x00\xff\xfe") == ErrorReply(9, "\ufffd\ufffd")


# -- malformed payloads ------------------------------------------------------------------------

MALFORMED = [
    ("hello", b""),
    ("hello", bytes(7)),
    ("hello", bytes(9)),  # extension without its full token_len
    ("hello", bytes(8) + b"\x05\x00ab"),  # token shorter than token_len
    ("hello_ack", bytes(7)),
    ("open", b""),
    ("open", b"\x01\x01\x50\x00\x01"),  # no addr_len
    ("open", b"\x01\x01\x50\x00\x09\x00abcd"),  # addr shorter than addr_len
    ("open", b"\x01\x01\x50\x00\x01\x00a"),  # shorter than 8+N: no token_len
    ("open", b"\x01\x01\x50\x00\x01\x00a\x00"),  # 7+N bytes
    ("open", b"\x01\x01\x50\x00\x01\x00a\x03\x00t"),  # token shorter than token_len
    ("open_ok", b"\x02"),
    ("open_ok", bytes.fromhex("02000004007f00")),  # address bytes cut
    ("open_ok", bytes.fromhex("02000004007f000001")),  # no peer address
    ("open_ok", bytes.fromhex("01000004007f000001" "02000004007f000001")),  # kind 1 is not an IP
    ("open_ok", bytes.fromhex("0200001000") + bytes(16) + bytes.fromhex("02000004007f000001")),  # v4 with 16
    ("open_ok", bytes.fromhex("03000004007f000001" "02000004007f000001")),  # v6 with 4
    ("open_err", b""),
    ("open_err", b"\x01\x05"),
    ("open_err", b"\x01\x05\x00ab"),
    ("dns_err", b"\x01"),
    ("dns_err", b"\x01\x02\x00a"),
    ("close", b"\x00"),
    ("close", b"\x00\x00"),
    ("close", b"\x00\x00\x00"),
    ("data_ack", b""),
    ("data_ack", b"\x00\x00\x00"),
    ("dns_query", b""),
    ("dns_query", b"\x00\x01"),
    ("dns_query", b"\x00\x05\x00ab"),
    ("dns_query", b"\x00\x02\x00\xff\xfe"),  # not UTF-8
    ("dns_result", b""),
    ("dns_result", b"\x01"),
    ("dns_result", b"\x02\x00\x04\x00abcd"),  # count says 2
    ("dns_result", b"\x01\x00\x10\x00abcd"),  # address cut
    ("pkcs11_request", b""),
    ("pkcs11_request", b"\x01"),
    ("pkcs11_response", b""),
]


@pytest.mark.parametrize("name, payload", MALFORMED)
def test_malformed_payload(name: str, payload: bytes) -> None:
    with pytest.raises(MalformedPayload):
        getattr(payloads, f"decode_{name}")(payload)


def test_malformed_message_says_what() -> None:
    with pytest.raises(MalformedPayload, match=r"Open payload truncated: needs 9 bytes, has 7"):
        payloads.decode_open(b"\x01\x01\x50\x00\x01\x00a")



def _open_read_field_by_field(payload: bytes) -> payloads.OpenRequest:
    """decode_open as a _Reader reads it, one field at a time (what its struct calls skip)."""
    with payloads._Reader(payload, "Open") as r:
        proto, addr_kind, port = r.u8(), r.u8(), r.u16()
        addr = r.field()
        return payloads.OpenRequest(proto, addr_kind, port, addr, r.field())


@given(st.one_of(
    st.binary(max_size=40),
    st.builds(lambda p, k, port, addr, token, cut: payloads.encode_open(p, k, port, addr,
                                                                        token)[:cut],
              st.integers(0, 255), st.integers(0, 255), st.integers(0, 65535),
              st.binary(max_size=20), st.binary(max_size=20), st.integers(0, 60))))
def test_decode_open_reads_as_the_field_reader_does(payload: bytes) -> None:
    """The same request, or MalformedPayload for the same payloads (its message names the
    fixed head's 6 bytes as needed where the reader names the first missing field)."""
    try:
        expected: object = _open_read_field_by_field(payload)
    except MalformedPayload:
        expected = MalformedPayload
    forms: list = [payload, bytearray(payload), memoryview(payload)]
    if len(payload) % 2 == 0:  # a view of 16-bit items: still read byte by byte
        forms.append(memoryview(payload).cast("H"))
    for form in forms:
        if expected is MalformedPayload:
            with pytest.raises(MalformedPayload, match="^Open payload truncated: needs"):
                payloads.decode_open(form)
        else:
            assert payloads.decode_open(form) == expected

ENCODER_ERRORS = [
    ("hello", (-1, 0)),
    ("hello", (1 << 32, 0)),
    ("hello", (0, 0, b"t" * 65536)),
    ("hello_ack", (0, 0, 1024)),  # the extension needs both fields
    ("hello_ack", (0, 0, None, 1024)),
    ("hello_ack", (0, 0, 1 << 32, 0)),
    ("open", (256, 1, 80, b"a")),
    ("open", (1, -1, 80, b"a")),
    ("open", (1, 1, 65536, b"a")),
    ("open", (1, 1, 80, b"a" * 65536)),
    ("open", (1, 1, 80, b"a", b"t" * 65536)),
    ("open_ok", (OpenOkInfo(SockAddr("1.2.3.4", 65536), SockAddr("1.2.3.4", 1)),)),
    ("open_ok", (OpenOkInfo(SockAddr("localhost", 1), SockAddr("1.2.3.4", 1)),)),
    ("open_err", (256, "x")),
    ("dns_err", (-1, "x")),
    ("close", (1 << 32,)),
    ("data_ack", (-1,)),
    ("dns_query", (256, "a")),
    ("dns_query", (0, "a" * 65536)),
    ("dns_result", ([b"\x01\x02\x03"],)),
    ("dns_result", ([bytes(4)] * 65536,)),
    ("pkcs11_request", (1 << 16,)),
    ("pkcs11_response", (256,)),
]


@pytest.mark.parametrize("name, args", ENCODER_ERRORS)
def test_encoder_rejects_out_of_range(name: str, args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        getattr(payloads, f"encode_{name}")(*args)


@pytest.mark.parametrize("bad", [{"type": 256}, {"flags": 256}, {"stream_id": 1 << 32}, {"type": -1}])
def test_frame_header_rejects_out_of_range(framing: ModuleType, bad: dict[str, int]) -> None:
    fields = {"type": 1, "flags": 0, "stream_id": 0, **bad}
    with pytest.raises(ValueError):
        framing.encode_frame(**fields)
    with pytest.raises(ValueError):
        framing.pack_header(bytearray(16), 0, payload_len=0, **fields)
    with pytest.raises(ValueError):
        framing.pack_header(bytearray(16), 0, 1, 0, 0, 1 << 32)


# -- frame parser ----------------------------------------------------------------------------------

FRAMES = [(0x20, 0x01, 1, b"first payload"), (0x10, 0, 0xFFFFFFFF, b""), (0xF0, 0x06, 0, bytes(range(200)))]


def stream(frames: list[tuple[int, int, int, bytes]] = FRAMES) -> bytes:
    return b"".join(header(t, sid, len(p), flags) + p for t, flags, sid, p in frames)


def test_parser_properties(framing: ModuleType) -> None:
    assert framing.FrameParser().max_payload == DEFAULT_MAX_PAYLOAD
    parser = framing.FrameParser(SMALL_MAX)
    assert (parser.max_payload, parser.buffered) == (SMALL_MAX, 0)
    with pytest.raises(ValueError):
        framing.FrameParser(-1)


@pytest.mark.parametrize("wrap", BUFFER_TYPES, ids=["bytes", "bytearray", "memoryview", "slice"])
def test_coalesced_frames_in_one_feed(framing: ModuleType, wrap: Callable[[bytes], Any]) -> None:
    parser = framing.FrameParser(SMALL_MAX)
    frames = parser.feed(wrap(stream()))
    assert as_tuples(frames) == FRAMES
    assert all(isinstance(f, Frame) and isinstance(f.payload, memoryview) for f in frames)
    assert parser.buffered == 0


def test_one_frame_split_at_every_offset(framing: ModuleType) -> None:
    data = stream(FRAMES[:1])
    for cut in range(len(data) + 1):
        parser = framing.FrameParser(SMALL_MAX)
        head = parser.feed(data[:cut])
        assert parser.buffered == (cut if cut < len(data) else 0)
        tail = parser.feed(data[cut:])
        assert as_tuples(head + tail) == FRAMES[:1]
        assert parser.buffered == 0


def test_frames_split_across_many_feeds(framing: ModuleType) -> None:
    data = stream()
    for size in (1, 3, 7, 17):
        parser = framing.FrameParser(SMALL_MAX)
        frames: list[Frame] = []
        for start in range(0, len(data), size):
            frames += parser.feed(data[start:start + size])
            assert parser.buffered <= HEADER_SIZE + SMALL_MAX
        assert as_tuples(frames) == FRAMES
        assert parser.buffered == 0


def test_whole_frame_payload_is_a_view_of_the_input(framing: ModuleType) -> None:
    data = bytearray(stream(FRAMES[:1]))
    [frame] = framing.FrameParser().feed(data)
    assert isinstance(frame.payload, memoryview) and frame.payload.obj is data
    data[HEADER_SIZE] = ord("F")
    assert bytes(frame.payload) == b"First payload"


def test_carried_over_payload_is_bytes(framing: ModuleType) -> None:
    data = stream()
    first = len(header(0, 0, 0)) + len(FRAMES[0][3])
    parser = framing.FrameParser()
    [frame0] = parser.feed(data[:first + 5])
    assert isinstance(frame0.payload, memoryview)
    assert parser.buffered == 5
    frame1, frame2 = parser.feed(bytearray(data[first + 5:]))
    assert type(frame1.payload) is bytes and frame1.payload == b""
    assert isinstance(frame2.payload, memoryview)
    assert as_tuples([frame0, frame1, frame2]) == FRAMES


def test_zero_length_payloads(framing: ModuleType) -> None:
    data = framing.encode_frame(FrameType.PING, 0) * 3
    assert as_tuples(framing.FrameParser().feed(data)) == [(0xF0, 0, 0, b"")] * 3


def test_reserved_byte_is_ignored(framing: ModuleType) -> None:
    data = bytearray(stream(FRAMES[:1]))
    data[7] = 0xFF
    assert as_tuples(framing.FrameParser().feed(data)) == FRAMES[:1]


@pytest.mark.parametrize("prefix", [b"XSW1\x01", b"KSW2\x01", b"KSW1\x00", b"KSW1\x02"])
def test_bad_magic_or_version_after_five_bytes(framing: ModuleType, prefix: bytes) -> None:
    parser = framing.FrameParser()
    assert parser.feed(prefix[:4]) == []
    assert parser.buffered == 4
    with pytest.raises(FrameError) as caught:
        parser.feed(prefix[4:])
    assert caught.value.close_code == 1002


def test_bad_frame_after_good_ones_in_one_feed(framing: ModuleType) -> None:
    with pytest.raises(FrameError) as caught:
        framing.FrameParser().feed(stream() + b"HTTP/1.1")
    assert caught.value.close_code == 1002


def test_oversize_payload_refused_from_the_header(framing: ModuleType) -> None:
    data = header(0x20, 1, SMALL_MAX + 1) + bytes(100)
    parser = framing.FrameParser(SMALL_MAX)
    for i in range(HEADER_SIZE - 1):
        assert parser.feed(data[i:i + 1]) == []
        assert parser.buffered == i + 1
    with pytest.raises(FrameError) as caught:
        parser.feed(data[HEADER_SIZE - 1:])  # the last header byte, and payload that must not be kept
    assert caught.value.close_code == 1009
    assert parser.buffered <= HEADER_SIZE


def test_oversize_payload_refused_when_whole_in_one_feed(framing: ModuleType) -> None:
    parser = framing.FrameParser(SMALL_MAX)
    with pytest.raises(FrameError) as caught:
        parser.feed(header(0x20, 1, SMALL_MAX + 1) + bytes(SMALL_MAX + 1))
    assert caught.value.close_code == 1009
    assert parser.buffered <= HEADER_SIZE


def test_default_limit_is_16_mib(framing: ModuleType) -> None:
    parser = framing.FrameParser()
    with pytest.raises(FrameError) as caught:
        parser.feed(header(0x20, 1, DEFAULT_MAX_PAYLOAD + 1))
    assert caught.value.close_code == 1009
    at_limit = framing.FrameParser()
    assert at_limit.feed(header(0x20, 1, DEFAULT_MAX_PAYLOAD) + b"abc") == []
    assert at_limit.buffered == HEADER_SIZE + 3


def test_payload_of_exactly_max_payload_is_accepted(framing: ModuleType) -> None:
    payload = bytes(range(256)) * (SMALL_MAX // 256)
    data = header(0x20, 9, SMALL_MAX) + payload
    assert as_tuples(framing.FrameParser(SMALL_MAX).feed(data)) == [(0x20, 0, 9, payload)]
    parser = framing.FrameParser(SMALL_MAX)
    assert parser.feed(data[:100]) == []
    assert as_tuples(parser.feed(data[100:])) == [(0x20, 0, 9, payload)]


def test_dead_parser_raises_again(framing: ModuleType) -> None:
    parser = framing.FrameParser()
    with pytest.raises(FrameError) as first:
        parser.feed(b"GET / HTTP/1.1\r\n")
    for data in (stream(), b""):
        with pytest.raises(FrameError) as again:
            parser.feed(data)
        assert again.value is first.value
        assert again.value.close_code == 1002


# -- both implementations, random streams -------------------------------------------------------

HYPO_MAX = 512

frame_tuples = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFFFFFF),
                         st.binary(max_size=300))


@st.composite
def cut_streams(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, bytes]], str, list[Any]]:
    """Valid frames, maybe with one corrupted byte or one oversize length, cut into chunks."""
    frames = draw(st.lists(frame_tuples, max_size=8))
    data = bytearray(stream(frames))
    damage = draw(st.sampled_from(["none", "byte", "oversize"])) if frames else "none"
    if damage == "byte":
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif damage == "oversize":
        index = draw(st.integers(0, len(frames) - 1))
        offset = sum(HEADER_SIZE + len(p) for *_, p in frames[:index]) + 12
        data[offset:offset + 4] = draw(st.integers(HYPO_MAX + 1, 0xFFFFFFFF)).to_bytes(4, "little")
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    wrap = draw(st.sampled_from(BUFFER_TYPES))
    chunks = [wrap(bytes(data[a:b])) for a, b in zip([0, *cuts], [*cuts, len(data)])]
    return frames, damage, chunks


def run(module: ModuleType, chunks: list[Any]) -> list[tuple[Any, ...]]:
    """What each feed did: its frames and `buffered`, or its error's close code."""
    parser = module.FrameParser(HYPO_MAX)
    events: list[tuple[Any, ...]] = []
    for chunk in chunks:
        try:
            events.append(("frames", as_tuples(parser.feed(chunk)), parser.buffered))
        except FrameError as exc:
            events.append(("error", exc.close_code, parser.buffered))
        assert parser.buffered <= HEADER_SIZE + HYPO_MAX
    return events


@settings(max_examples=200)
@given(cut_streams())
def test_both_codecs_agree_on_random_streams(case: tuple[list[tuple[int, int, int, bytes]], str, list[Any]]) -> None:
    frames, damage, chunks = case
    events = run(pycodec, chunks)
    assert run(ccodec, chunks) == events
    if damage == "none":
        assert [f for e in events for f in e[1]] == frames
        assert all(e[0] == "frames" for e in events) and events[-1][2] == 0
    elif damage == "oversize":
        assert [e[1] for e in events if e[0] == "error"][:1] == [1009]


def _packed_by_ipaddress(host: str) -> Union[bytes, None]:
    """How OpenOk addresses were packed before inet_pton: through the ipaddress module."""
    try:
        return ipaddress.ip_address(host.partition("%")[0]).packed
    except ValueError:
        return None


_addresses = st.ip_addresses().map(str) | st.ip_addresses().map(lambda ip: ip.exploded)
_address_like = st.text(alphabet="0123456789abcdefABCDEF.:%xyz ", max_size=45)


@settings(max_examples=500)
@given(st.one_of(_addresses, _addresses.map(lambda a: a + "%eth0"), _address_like,
                 st.sampled_from(["0.0.0.0", "::", "::ffff:169.254.169.254", "01.2.3.4",
                                  "1.2.3", "::1.2.3.4", "1:2:3:4:5:6:1.2.3.4", "١.2.3.4"])))
def test_open_ok_packs_what_ipaddress_reads(host: str) -> None:
    expected = _packed_by_ipaddress(host)
    info = OpenOkInfo(SockAddr(host, 1), SockAddr("127.0.0.1", 2))
    if expected is None:
        with pytest.raises(ValueError):
            payloads.encode_open_ok(info)
    else:
        payload = payloads.encode_open_ok(info)  # kind u8, port u16, length u16, address
        assert payload[0] == (AddrKind.IPV4 if len(expected) == 4 else AddrKind.IPV6)
        assert payload[5:5 + len(expected)] == expected


@pytest.mark.parametrize("status", [Pkcs11Status.PROTOCOL_ERROR, Pkcs11Status.INTERNAL,
                                    Pkcs11Status.AUTH_DENIED])
def test_a_refusal_reads_back_as_the_rpc_error_it_is(status) -> None:
    """The session's own answers (no module asked) decode as the RPC's error bodies."""
    from ksw1fast.pkcs11 import wire
    answer = payloads.decode_pkcs11_response(payloads.encode_pkcs11_refusal(status, "nö"))
    assert answer.status == status
    assert wire.error_of(answer.status, answer.body) == (None, "nö")
