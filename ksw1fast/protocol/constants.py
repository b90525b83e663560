"""KSW1 wire constants (docs/protocol.md §1-§10), shared by both codecs and the server."""
from __future__ import annotations

from enum import IntEnum, IntFlag

MAGIC = b"KSW1"
VERSION = 1
HEADER_SIZE = 16
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
DEFAULT_INITIAL_CREDIT = 1024 * 1024
DEFAULT_CLIENT_MAX_STREAMS = 256  # used when a Hello asks for 0


class FrameType(IntEnum):
    HELLO = 0x01
    HELLO_ACK = 0x02
    OPEN = 0x10
    OPEN_OK = 0x11
    OPEN_ERR = 0x12
    DATA = 0x20
    DATA_ACK = 0x21
    CLOSE = 0x30
    CLOSE_ACK = 0x31
    DNS_QUERY = 0x40
    DNS_RESULT = 0x41
    DNS_ERR = 0x42
    PKCS11_REQUEST = 0x50
    PKCS11_RESPONSE = 0x51
    PING = 0xF0
    PONG = 0xF1


class Flag(IntFlag):
    EOF = 0x01
    MORE = 0x02
    URGENT = 0x04


class Feature(IntFlag):
    FLOW_CONTROL = 0x01
    HALF_CLOSE = 0x02
    DNS = 0x04
    UDP = 0x08
    OPEN_TOKEN = 0x10
    PKCS11 = 0x20


class Proto(IntEnum):
    TCP = 1
    UDP = 2


class AddrKind(IntEnum):
    HOSTNAME = 1
    IPV4 = 2
    IPV6 = 3


class OpenErrCode(IntEnum):
    BLOCKED = 1
    RESOLVE_FAIL = 2
    CONN_REFUSED = 3
    TIMEOUT = 4
    UNREACHABLE = 5
    AUTH_REQUIRED = 6
    AUTH_FAILED = 7
    TOO_MANY_STREAMS = 8
    INTERNAL = 9


class DnsErrCode(IntEnum):
    FORMAT_ERROR = 1
    SERVER_FAILURE = 2
    NX_DOMAIN = 3
    NOT_IMPLEMENTED = 4
    REFUSED = 5
    TIMEOUT = 6


class Pkcs11Status(IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    CK_ERROR = 2
    INTERNAL = 3
    AUTH_DENIED = 4


class CloseReason(IntEnum):
    NORMAL = 0
    ERROR = 1


class WSClose(IntEnum):
    """WebSocket close codes the gateway sends (docs/protocol.md §10, §11; RFC 6455 §7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001          # shutdown, drain, a peer that stopped answering pings
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003    # a text message
    INVALID_DATA = 1007        # a close reason that is not UTF-8
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013     # overloaded
