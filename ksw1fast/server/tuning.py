"""The relay's sizes and limits, for its pure-Python twin and every Python reader.

The compiled relay and codec take the same values from ksw1fast/_constants.pxd (Cython
cannot import a Python module at compile time); a test checks both agree.
"""
from ksw1fast.protocol.constants import DEFAULT_INITIAL_CREDIT

MIN_READ = 16 * 1024           # a target's first read; doubled while reads fill it
MAX_READ = 256 * 1024
HIGH_WATER = 1024 * 1024       # per target write buffer and per WebSocket write buffer
LOW_WATER = 256 * 1024
MAX_PENDING = 1024 * 1024      # client Data accepted for a stream that is still connecting
INITIAL_CREDIT = DEFAULT_INITIAL_CREDIT  # FlowControl window per stream and direction
ACK_STEP = 64 * 1024           # return client credit in steps of at least this
FC_HIGH_WATER = 256 * 1024     # with credits: above this, ack only after a full drain
MAX_DATAGRAM = 65507           # docs/protocol.md §7: larger client datagrams are dropped
WS_HEADROOM = 16               # room in front of a message for picows' WebSocket header

# Why a stream's target is not being read (bits; reading resumes when none is left).
PAUSE_CONNECTING = 1           # OpenOk not sent yet: no Data may precede it
PAUSE_WEBSOCKET = 2            # the WebSocket's write buffer is above its high-water mark
PAUSE_CREDIT = 4               # FlowControl: the client's window for us is spent
