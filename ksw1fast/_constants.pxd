# The constants the compiled codec and relay share with Python, as Cython sees them.
# Their Python values live in ksw1fast/protocol/constants.py (wire) and
# ksw1fast/server/tuning.py (relay); tests/test_constants.py checks that both agree.

cdef enum:
    # wire (docs/protocol.md §1-§2)
    KSW1_HEADER = 16
    KSW1_VERSION = 1
    FRAME_DATA = 0x20
    FRAME_DATA_ACK = 0x21
    FLAG_EOF = 0x01

    # relay tuning
    MIN_READ = 16 * 1024
    MAX_READ = 256 * 1024
    HIGH_WATER = 1024 * 1024
    LOW_WATER = 256 * 1024
    MAX_PENDING = 1024 * 1024
    INITIAL_CREDIT = 1024 * 1024
    ACK_STEP = 64 * 1024
    FC_HIGH_WATER = 256 * 1024
    MAX_DATAGRAM = 65507
    WS_HEADROOM = 16
    PAUSE_CONNECTING = 1
    PAUSE_WEBSOCKET = 2
    PAUSE_CREDIT = 4
