"""The base of every ksw1fast error, and the errors of the wire protocol: a stream that is
not KSW1, a payload that does not decode, and a request answered with an error frame."""
from __future__ import annotations


class KSW1Error(Exception):
    """Base class of every ksw1fast error."""


class FrameError(KSW1Error):
    """The inbound byte stream is not KSW1; the WebSocket must close with `close_code`."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(close_code, reason)
        self.close_code = close_code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (close {self.close_code})"


class MalformedPayload(KSW1Error, ValueError):
    """A frame's payload does not decode; answered on the wire, the connection stays up."""


class RefusedError(KSW1Error):
    """The gateway answered a request with an error frame carrying a code and a message."""

    frame_name = "error"

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.frame_name} {self.code}: {self.message}"


class OpenError(RefusedError):
    """The gateway answered an Open with OpenErr."""

    frame_name = "OpenErr"


class DnsError(RefusedError):
    """The gateway answered a DnsQuery with DnsErr."""

    frame_name = "DnsErr"
