"""The WebSocket close handshake (RFC 6455 §5.5.1, §7.4; docs/protocol.md §11), no I/O.

Both relays and the client hand `reply_to_close` the payload of a Close frame they
received and send back what it says; every Close they start goes through
`close_reason`, so no code a peer must reject and no oversized control frame ever
reaches the wire.  Node's `ws` fails the connection on either (WS_ERR_INVALID_CLOSE_CODE)
and Chromium hands a bogus code to the page.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from ksw1fast.protocol.constants import WSClose

MAX_REASON = 123        # a control frame carries 125 bytes: the code, then this much text
CLOSE_TIMEOUT = 5.0     # seconds to wait for the peer's Close after sending ours


class CloseReply(NamedTuple):
    """The Close to answer with; `code` None is a Close without a status code."""

    code: Optional[int]
    reason: bytes = b""


def may_send(code: int) -> bool:
    """Whether a Close may carry `code`: the registered codes 1000-1014 less the three
    that only describe a close (1004, 1005, 1006), and the application range 3000-4999."""
    return (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999


def close_reason(reason: str) -> bytes:
    """`reason` as UTF-8 cut to fit a Close frame, never inside a character."""
    return reason.encode()[:MAX_REASON].decode(errors="ignore").encode()


def reply_to_close(payload: bytes) -> CloseReply:
    """The answer to a received Close: its code echoed, none when it had none; 1002 for a
    code no endpoint may send (or a 1-byte payload), 1007 for a reason that is not UTF-8."""
    if not payload:
        return CloseReply(None)
    if len(payload) == 1:
        return CloseReply(WSClose.PROTOCOL_ERROR, b"Received CLOSE with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not may_send(code):
        # the wording of picows, which answers most such codes before we see them
        return CloseReply(WSClose.PROTOCOL_ERROR,
                          b"Received CLOSE with invalid close code: %d" % code)
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        return CloseReply(WSClose.INVALID_DATA, b"Received CLOSE with invalid UTF-8 reason")
    return CloseReply(code)


def closed_code(sent: Optional[int], received: Optional[int]) -> int:
    """The code a finished connection is reported with (logs, metrics): the one we sent,
    else the peer's; 1005 for a Close without code (picows reads it as 0, and a Close
    really carrying 0 is always answered, so `sent` is set then), 1006 for no Close."""
    if sent is not None:
        return sent
    if received is not None:
        return received or 1005
    return 1006
