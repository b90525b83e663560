"""Sending a WebSocket Close on a picows transport, as ksw1fast.protocol.close decides
it: the pure-Python relay and the client both answer and start Closes through this."""
from __future__ import annotations

from typing import Optional, cast

from picows import WSCloseCode, WSMsgType, WSTransport

from ksw1fast.protocol.close import CloseReply, reply_to_close


def send_close(ws: WSTransport, code: Optional[int], reason: bytes = b"") -> None:
    """A Close with `code` (any valid code: picows types only the ones it names), or
    without a code when `code` is None (picows' send_close always writes one)."""
    if code is None:
        ws.send(WSMsgType.CLOSE, b"")
    else:
        ws.send_close(cast(WSCloseCode, code), reason)


def answer_close(ws: WSTransport, payload: bytes) -> CloseReply:
    """Answer the peer's Close (its payload given) by the rules; the answer sent."""
    reply = reply_to_close(payload)
    send_close(ws, reply.code, reply.reason)
    return reply
