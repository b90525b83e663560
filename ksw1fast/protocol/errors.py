"""The base of every ksw1fast error, and the errors of the wire protocol: a stream that is
not KSW1, a payload that does not decode, a token that does not authorize a request (and
how each answer says so), and a request answered with an error frame."""
from __future__ import annotations

from ksw1fast.protocol.constants import DnsErrCode, OpenErrCode, Pkcs11Status


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


_AUTH_MESSAGES = {"missing": "no token presented", "invalid": "token not recognised",
                  "expired": "token expired"}


class AuthError(KSW1Error):
    """Authentication failed; `kind` is "missing", "invalid" or "expired".

    `http_status` answers a handshake (401 missing, 403 otherwise) and `open_err` an Open
    (AuthRequired / AuthFailed); a DnsQuery gets `dns_err`, a Pkcs11Request `pkcs11_status`.
    """

    dns_err = DnsErrCode.REFUSED
    pkcs11_status = Pkcs11Status.AUTH_DENIED

    def __init__(self, kind: str) -> None:
        super().__init__(_AUTH_MESSAGES[kind])
        self.kind = kind

    @property
    def http_status(self) -> int:
        return 401 if self.kind == "missing" else 403

    @property
    def open_err(self) -> OpenErrCode:
        return OpenErrCode.AUTH_REQUIRED if self.kind == "missing" else OpenErrCode.AUTH_FAILED
