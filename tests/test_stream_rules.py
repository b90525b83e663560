"""A stream's credits and pause reasons (protocol.md §6), driven without sockets: the pure
relay's TcpStream with a fake connection and a fake target transport. (The compiled
relay implements the same rules; the end-to-end tests run both.)"""
from __future__ import annotations

from typing import Any

from ksw1fast.protocol import payloads
from ksw1fast.protocol.constants import Flag, FrameType
from ksw1fast.server.relay import TcpStream
from ksw1fast.server.tuning import (ACK_STEP, INITIAL_CREDIT, MAX_PENDING, PAUSE_CONNECTING,
                                    PAUSE_CREDIT, PAUSE_WEBSOCKET)


class FakeTarget:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0
        self.reading = True
        self.eof = False
        self.aborted = False
        self.closed = False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.aborted

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class FakeConnection:
    ws: Any = object()  # the relay only passes it on

    def __init__(self, targets_paused: bool = False) -> None:
        self.targets_paused = targets_paused
        self.sent: list[tuple[int, int, bytes, int]] = []
        self.failed: list[str] = []

    def send_frame(self, type: int, stream_id: int, payload: Any = b"", flags: int = 0) -> None:
        self.sent.append((type, stream_id, bytes(payload), flags))

    def stream_failed(self, stream: TcpStream, reason: str) -> None:
        self.failed.append(reason)


def started(flow_control: bool = True) -> tuple[TcpStream, FakeConnection, FakeTarget]:
    conn, target = FakeConnection(), FakeTarget()
    stream = TcpStream(conn, 1, flow_control, INITIAL_CREDIT)
    stream.connection_made(target)
    stream.start()
    return stream, conn, target


def test_data_before_openok_waits_and_is_bounded() -> None:
    conn, target = FakeConnection(), FakeTarget()
    stream = TcpStream(conn, 1, False, INITIAL_CREDIT)
    stream.connection_made(target)
    assert stream.paused & PAUSE_CONNECTING and not target.reading
    stream.client_data(memoryview(b"early"), 0)
    assert target.written == []
    stream.start()
    assert target.written == [b"early"] and target.reading
    late = TcpStream(conn, 2, False, INITIAL_CREDIT)
    late.client_data(memoryview(bytes(MAX_PENDING)), 0)
    late.client_data(memoryview(b"x"), 0)
    assert conn.failed == ["client sent too much before OpenOk"]


def test_client_credit_is_returned_in_steps_as_bytes_leave() -> None:
    stream, conn, target = started()
    stream.client_data(memoryview(bytes(ACK_STEP - 1)), 0)
    assert conn.sent == []  # not a whole step yet
    stream.client_data(memoryview(b"x"), 0)
    assert conn.sent == [(FrameType.DATA_ACK, 1, payloads.encode_data_ack(ACK_STEP), 0)]


def test_bytes_still_buffered_for_the_target_are_not_returned() -> None:
    stream, conn, target = started()
    target.buffered = ACK_STEP
    stream.client_data(memoryview(bytes(ACK_STEP)), 0)
    assert conn.sent == []
    target.buffered = 0
    stream.resume_writing()  # drained: everything goes back
    assert conn.sent == [(FrameType.DATA_ACK, 1, payloads.encode_data_ack(ACK_STEP), 0)]


def test_a_client_that_overruns_its_window_fails_the_stream() -> None:
    stream, conn, target = started()
    target.buffered = INITIAL_CREDIT  # nothing leaves, nothing is returned
    stream.client_data(memoryview(bytes(INITIAL_CREDIT)), 0)
    assert conn.failed == []
    stream.client_data(memoryview(b"x"), 0)
    assert conn.failed == ["client overran its credit"]


def test_spent_send_credit_pauses_the_target_and_acks_resume_it() -> None:
    stream, conn, target = started()
    stream._sent(INITIAL_CREDIT)  # what the relay counts for each read it sends
    assert stream.paused == PAUSE_CREDIT and not target.reading
    stream.add_credit(1)
    assert stream.paused == 0 and target.reading


def test_pause_reasons_add_up() -> None:
    stream, conn, target = started()
    stream.set_paused(PAUSE_WEBSOCKET, True)
    stream._sent(INITIAL_CREDIT)
    stream.set_paused(PAUSE_WEBSOCKET, False)
    assert not target.reading  # still out of credit
    stream.add_credit(1 << 20)
    assert target.reading


def test_without_flow_control_no_credit_is_counted() -> None:
    stream, conn, target = started(flow_control=False)
    stream.client_data(memoryview(bytes(2 * INITIAL_CREDIT)), 0)
    stream._sent(2 * INITIAL_CREDIT)
    assert conn.sent == [] and conn.failed == [] and target.reading


def test_half_close_both_ways() -> None:
    stream, conn, target = started(flow_control=False)
    stream.client_data(memoryview(b"last"), Flag.EOF)
    assert target.written == [b"last"] and target.eof
    stream.client_data(memoryview(b"after eof"), 0)  # nothing may follow EOF
    assert target.written == [b"last"]
    stream.eof_received()
    assert conn.sent[-1] == (FrameType.DATA, 1, b"", Flag.EOF)
    assert target.closed  # both halves done: the target is closed
