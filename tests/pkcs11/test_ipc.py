"""The gateway <-> agent framing (ksw1fast.pkcs11.ipc)."""
from __future__ import annotations

import pytest

from ksw1fast.pkcs11 import ipc


@pytest.mark.parametrize("body", [b"", b"\x00\x04\x00\x00\x00sig!"])
def test_pack_result_is_pack_with_the_status_in_front(body: bytes) -> None:
    frame = ipc.pack_result(7, 0xFFFFFFFF, 2, body)
    assert frame == ipc.pack(ipc.OP_RESULT, 7, 0xFFFFFFFF, b"\x02" + body)
    assert ipc.Unpacker().feed(frame) == [ipc.Message(ipc.OP_RESULT, 7, 0xFFFFFFFF,
                                                      b"\x02" + body)]


def test_split_call() -> None:
    assert ipc.split_call(b"\x08\x01args") == (0x0108, b"args")
    assert ipc.split_call(b"\x00\xff") == (0xFF00, b"")
