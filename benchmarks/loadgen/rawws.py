"""websockify's protocol: a WebSocket of raw binary messages is one TCP stream (one lane)."""
from __future__ import annotations

from picows import WSFrame, WSMsgType, WSTransport

from benchmarks.loadgen.lanes import Lane
from benchmarks.loadgen.wspeer import WsPeer


class RawLane(Lane):
    def __init__(self, peer: "RawWsConnection") -> None:
        super().__init__()
        self.peer = peer

    def send(self, data: bytes) -> None:
        assert self.peer.ws is not None
        self.peer.ws.send(WSMsgType.BINARY, data)

    def send_bulk(self, nbytes: int) -> None:
        self.peer.send_bulk(self, nbytes)


class RawWsConnection(WsPeer):
    """The bridge connects the WebSocket to its one target; closing one closes the other."""

    def __init__(self) -> None:
        super().__init__()
        self.lane = RawLane(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            self.lane.job.on_data(self.lane, frame.get_payload_as_memoryview())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.lane.job.on_eof(self.lane)  # websockify closes the WebSocket at the target's EOF
        super().on_ws_disconnected(transport)
