"""docs/protocol.md §10, row by row: bad input gets the right answer and harms nobody else."""
from __future__ import annotations

import struct

import pytest

from ksw1fast import framing
from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import (AddrKind, DnsErrCode, FrameType, OpenErrCode, Pkcs11Status,
                                Proto)

from helpers import RawClient

pytestmark = pytest.mark.timeout(60)


def _header(type: int, stream_id: int, payload_len: int, magic: bytes = b"KSW1",
            version: int = 1) -> bytes:
    return magic + struct.pack("<BBBBII", version, type, 0, 0, stream_id, payload_len)


def _open(stream_id: int, port: int, host: bytes = b"127.0.0.1") -> bytes:
    return framing.encode_frame(FrameType.OPEN, stream_id,
                              payloads.encode_open(Proto.TCP, AddrKind.HOSTNAME, port, host))


@pytest.mark.parametrize("wire", [
    _header(FrameType.PING, 0, 0, magic=b"KSW2"),
    _header(FrameType.PING, 0, 0, version=2),
    b"KSW",  # a truncated header is fine until the magic is visibly wrong...
], ids=["bad-magic", "bad-version", "partial-then-bad"])
async def test_bad_magic_or_version_closes_1002(gateway, wire) -> None:
    async with RawClient(gateway) as raw:
        await raw.hello()
        await raw.send(wire)
        if wire == b"KSW":
            await raw.send(b"2" + bytes(12))  # ...and is then completed wrongly
        assert await raw.close_code() == 1002


async def test_payload_over_limit_closes_1009_before_buffering(gateway) -> None:
    async with RawClient(gateway) as raw:
        await raw.hello()
        # only the header: a server that waited to buffer 16 MiB + 1 would never answer
        await raw.send(_header(FrameType.DATA, 1, 16 * 1024 * 1024 + 1))
        assert await raw.close_code(timeout=5) == 1009


async def test_largest_payload_is_accepted(gateway, echo_port) -> None:
    async with RawClient(gateway) as raw:
        await raw.hello()
        await raw.send(_open(1, echo_port))
        (ok,) = await raw.frames(1)
        assert ok.type == FrameType.OPEN_OK
        payload = bytes(range(256)) * (16 * 1024 * 1024 // 256)
        await raw.send(framing.encode_frame(FrameType.DATA, 1, payload))
        echoed = bytearray()
        while len(echoed) < len(payload):
            (frame,) = await raw.frames(1, timeout=30)
            echoed += frame.payload
        assert echoed == payload


async def test_text_message_closes_1003(gateway) -> None:
    async with RawClient(gateway) as raw:
        await raw.hello()
        await raw.send("KSW1 as text")
        assert await raw.close_code() == 1003


@pytest.mark.parametrize("type", [FrameType.OPEN, FrameType.DNS_QUERY, FrameType.DATA,
                                  FrameType.PKCS11_REQUEST])
async def test_frames_before_hello_close_1002(gateway, echo_port, type) -> None:
    payload = {FrameType.OPEN: payloads.encode_open(Proto.TCP, AddrKind.HOSTNAME, echo_port,
                                                 b"127.0.0.1"),
               FrameType.DNS_QUERY: payloads.encode_dns_query(0, "localhost")}.get(type, b"xx")
    async with RawClient(gateway) as raw:
        await raw.send(framing.encode_frame(type, 1, payload))
        assert await raw.close_code() == 1002


async def test_ping_before_hello_is_answered(gateway) -> None:
    async with RawClient(gateway) as raw:
        await raw.send(framing.encode_frame(FrameType.PING, 0, b"early"))
        (pong,) = await raw.frames(1)
        assert (pong.type, pong.payload) == (FrameType.PONG, b"early")


async def test_malformed_hello_closes_1002(gateway) -> None:
    async with RawClient(gateway) as raw:
        await raw.send(framing.encode_frame(FrameType.HELLO, 0, b"\x2e\x00"))
        assert await raw.close_code() == 1002


async def test_malformed_payloads_are_answered_on_the_wire(gateway) -> None:
    async with RawClient(gateway) as raw:
        await raw.hello()
        await raw.send(framing.encode_frame(FrameType.OPEN, 3, b"\x01\x01\x50\x00\x09\x00abc"))
        await raw.send(framing.encode_frame(FrameType.DNS_QUERY, 3, b"\x00\x10\x00loc"))
        await raw.send(framing.encode_frame(FrameType.PKCS11_REQUEST, 3, b"\x01"))
        answers = {f.type: f for f in await raw.frames(3)}
        open_err = payloads.decode_open_err(answers[FrameType.OPEN_ERR].payload)
        dns_err = payloads.decode_dns_err(answers[FrameType.DNS_ERR].payload)
        p11 = payloads.decode_pkcs11_response(answers[FrameType.PKCS11_RESPONSE].payload)
        assert open_err.code == OpenErrCode.INTERNAL
        assert dns_err.code == DnsErrCode.FORMAT_ERROR
        assert p11.status == Pkcs11Status.PROTOCOL_ERROR
        assert all(f.stream_id == 3 for f in answers.values())
        await raw.send(framing.encode_frame(FrameType.PING, 0, b"still here"))
        (pong,) = await raw.frames(1)
        assert pong.payload == b"still here"


async def test_open_on_stream_id_in_use_leaves_stream_untouched(gateway, echo_port) -> None:
    async with RawClient(gateway) as raw:
        await raw.hello()
        await raw.send(_open(5, echo_port))
        (ok,) = await raw.frames(1)
        assert ok.type == FrameType.OPEN_OK
        await raw.send(_open(5, echo_port))
        (err,) = await raw.frames(1)
        assert (err.type, err.stream_id) == (FrameType.OPEN_ERR, 5)
        assert payloads.decode_open_err(err.payload).code == OpenErrCode.INTERNAL
        await raw.send(framing.encode_frame(FrameType.DATA, 5, b"alive"))
        (data,) = await raw.frames(1)
        assert (data.type, data.stream_id, data.payload) == (FrameType.DATA, 5, b"alive")


async def test_unknown_stream_ids_and_types_are_ignored(gateway) -> None:
    async with RawClient(gateway) as raw:
        await raw.hello()
        await raw.send(framing.encode_frame(FrameType.DATA, 99, b"nobody"))
        await raw.send(framing.encode_frame(FrameType.DATA_ACK, 99, payloads.encode_data_ack(10)))
        await raw.send(framing.encode_frame(FrameType.CLOSE, 99, payloads.encode_close(0)))
        await raw.send(framing.encode_frame(0x7E, 1, b"from the future"))
        await raw.send(framing.encode_frame(FrameType.PING, 0, b"ok"))
        (pong,) = await raw.frames(1)
        assert (pong.type, pong.payload) == (FrameType.PONG, b"ok")


async def test_garbage_from_one_client_spares_the_others(gateway, echo_port) -> None:
    async with RawClient(gateway) as good, RawClient(gateway) as bad:
        await good.hello()
        await good.send(_open(1, echo_port))
        (ok,) = await good.frames(1)
        assert ok.type == FrameType.OPEN_OK
        await bad.hello()
        await bad.send(_open(1, echo_port))
        await bad.frames(1)
        await bad.send(b"\xff" * 64)
        assert await bad.close_code() == 1002
        for i in range(20):
            await good.send(framing.encode_frame(FrameType.DATA, 1, b"%d;" % i))
        echoed = b""
        while echoed.count(b";") < 20:
            (frame,) = await good.frames(1)
            echoed += frame.payload
        assert echoed == b"".join(b"%d;" % i for i in range(20))
        # and new connections are still accepted
        async with RawClient(gateway) as late:
            await late.hello()


async def test_wrong_path_is_404(gateway) -> None:
    import websockets

    with pytest.raises(websockets.InvalidStatus) as info:
        async with RawClient(gateway.rsplit("/", 1)[0] + "/elsewhere"):
            pass
    assert info.value.response.status_code == 404
