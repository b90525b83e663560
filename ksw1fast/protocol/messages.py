"""Decoded KSW1 frames and payloads: plain tuples both codecs return, so they compare equal."""
from __future__ import annotations

import socket
from typing import NamedTuple, Optional, Union

Payload = Union[bytes, memoryview]


class Frame(NamedTuple):
    type: int
    flags: int
    stream_id: int
    payload: Payload  # a view of the fed buffer when the frame was whole in it, else bytes


class Hello(NamedTuple):
    features: int
    max_streams: int
    token: Optional[bytes]  # the optional extension


class HelloAck(NamedTuple):
    features: int
    max_streams: int
    max_payload: Optional[int]  # the optional extension
    initial_credit: Optional[int]


class OpenRequest(NamedTuple):
    proto: int
    addr_kind: int
    port: int
    addr: bytes
    token: bytes


class SockAddr(NamedTuple):
    host: str  # textual IPv4 or IPv6 address
    port: int

    def packed_host(self) -> bytes:
        """The 4 or 16 bytes of `host`, a %scope dropped; ValueError if it is no address.

        inet_pton rather than the ipaddress module (a few times slower): every OpenOk
        packs two."""
        text = self.host.partition("%")[0]
        try:
            return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
        except OSError:
            raise ValueError(f"{self.host!r} is not an IPv4 or IPv6 address") from None


class OpenOkInfo(NamedTuple):
    local: SockAddr
    peer: SockAddr


class ErrorReply(NamedTuple):
    """OpenErr and DnsErr payloads."""

    code: int
    message: str


class DnsQuery(NamedTuple):
    family: int
    name: str


class Pkcs11Request(NamedTuple):
    fn_id: int
    args: bytes


class Pkcs11Response(NamedTuple):
    status: int
    body: bytes
