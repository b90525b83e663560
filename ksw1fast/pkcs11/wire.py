"""PKCS#11 RPC wire codec (docs/pkcs11.md): pure, I/O-free, little-endian.

`Reader` decodes request args (and, for clients and tests, response bodies);
`Writer` encodes them. A `Reader` is strict: truncation, an unknown tag and
trailing bytes after the last argument (`Reader.end`) are all `WireError`, so
a client that lays out an argument differently (a u64 slot id where docs/pkcs11.md §4
says u32, say) gets a ProtocolError instead of a silently misread call.

Also here, because clients and the CLI need them without loading a module:
the function table (`FUNCTIONS`), the info records and the response bodies
of each status.
"""
from __future__ import annotations

import builtins
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Iterable, TypeVar, Union

from ksw1fast.protocol.constants import Pkcs11Status
from ksw1fast.protocol.payloads import pkcs11_message
from ksw1fast.protocol.errors import KSW1Error

T = TypeVar("T")

CK_UNAVAILABLE_INFORMATION = (1 << 64) - 1  # ~0UL on LP64: "the token does not say"
U8, U16, U32, U64 = (struct.Struct(f"<{code}") for code in "BHIQ")

# fn id -> name, as in the tables of docs/pkcs11.md §4; names are what --pkcs11-allow and
# --pkcs11-deny take.
FUNCTIONS: dict[int, str] = {
    0x0000: "GetSlotList", 0x0001: "GetSlotInfo", 0x0002: "GetTokenInfo",
    0x0003: "InitToken", 0x0004: "OpenSession", 0x0005: "GetMechanismList",
    0x0006: "Initialize", 0x0007: "Finalize", 0x0008: "CloseAllSessions",
    0x0009: "GetInfo", 0x000A: "GetSlotInfo", 0x000B: "GetTokenInfo",
    0x000C: "WaitForSlotEvent", 0x000D: "GetMechanismInfo",
    0x0100: "Login", 0x0101: "Logout", 0x0102: "CloseSession", 0x0103: "InitPIN",
    0x0104: "FindObjectsInit", 0x0105: "FindObjects", 0x0106: "FindObjectsFinal",
    0x0107: "GenerateKeyPair", 0x0108: "Sign", 0x0109: "Verify", 0x010A: "Decrypt",
    0x010B: "Encrypt", 0x010C: "Digest", 0x010D: "SeedRandom", 0x010E: "GenerateRandom",
    0x010F: "CancelFunction", 0x0110: "SetPIN", 0x0111: "DigestKey",
    0x0112: "SignRecover", 0x0113: "VerifyRecover", 0x0114: "CreateObject",
    0x0116: "GenerateKey", 0x0117: "DeriveKey", 0x0118: "WrapKey", 0x0119: "UnwrapKey",
    0x011A: "CopyObject", 0x011B: "GetOperationState", 0x011C: "SetOperationState",
    0x011D: "GetSessionInfo",
    0x011E: "EncryptInit", 0x011F: "EncryptUpdate", 0x0120: "EncryptFinal", 0x0121: "EncryptAbort",
    0x0122: "DecryptInit", 0x0123: "DecryptUpdate", 0x0124: "DecryptFinal", 0x0125: "DecryptAbort",
    0x0126: "SignInit", 0x0127: "SignUpdate", 0x0128: "SignFinal", 0x0129: "SignAbort",
    0x012A: "VerifyInit", 0x012B: "VerifyUpdate", 0x012C: "VerifyFinal", 0x012D: "VerifyAbort",
    0x012E: "DigestInit", 0x012F: "DigestUpdate", 0x0130: "DigestFinal", 0x0131: "DigestAbort",
    0x0132: "LoginVendor",
    0x0200: "GetAttributeValue", 0x0201: "DestroyObject", 0x0202: "GetObjectSize",
    0x0203: "SetAttributeValue", 0x0204: "ObjectBind",
    0xFF00: "HandleDrop",
}
FUNCTION_IDS: dict[str, int] = {name: fn for fn, name in FUNCTIONS.items()}  # legacy ids lose


def check_function_names(names: Iterable[str]) -> frozenset[str]:
    """The names as a set; ValueError naming the first one that is not in the table."""
    result = frozenset(names)
    unknown = sorted(result - FUNCTION_IDS.keys())
    if unknown:
        raise ValueError(f"unknown PKCS#11 function name {unknown[0]!r}")
    return result


class HandleKind(IntEnum):
    """`kind` of HandleDrop."""

    SESSION = 1
    OBJECT = 2
    CURSOR = 3


class Tag(IntEnum):
    """Attribute value tags."""

    BOOLEAN = 1
    UINT32 = 2
    UINT64 = 3
    BYTE_STRING = 4
    STRING = 5
    KEY_KIND = 6
    OBJECT_CLASS = 7
    MECHANISM_TYPE = 8
    DATE_STRING = 9
    VENDOR_BYTES = 10


# how each tag's value is laid out: the Reader/Writer method name
_TAG_CODEC = {
    Tag.BOOLEAN: "bool", Tag.UINT32: "u32", Tag.UINT64: "u64", Tag.BYTE_STRING: "bytes",
    Tag.STRING: "string", Tag.KEY_KIND: "u32", Tag.OBJECT_CLASS: "u32",
    Tag.MECHANISM_TYPE: "u64", Tag.DATE_STRING: "string", Tag.VENDOR_BYTES: "bytes",
}

AttrValue = Union[bool, int, bytes, str]


@dataclass(frozen=True)
class Attribute:
    type: int  # CKA_*
    tag: Tag
    value: AttrValue


@dataclass(frozen=True)
class Mechanism:
    type: int  # CKM_*
    parameter: bytes | None = None


# Parameters whose C struct holds pointers cannot cross the wire as the module's
# bytes; for these mechanisms the parameter is a sequence of wire fields instead:
# "u" a u64 (a CK_ULONG), "b" a bytes (a pointer and its length). Every other
# parameter (an IV, a pointer-free struct in the module's own layout) is the
# module's bytes, passed verbatim.
POINTER_PARAMETERS: dict[int, tuple[str, ...]] = {
    0x1050: ("u", "b", "b"),       # CKM_ECDH1_DERIVE: kdf, shared data, public data
    0x1051: ("u", "b", "b"),       # CKM_ECDH1_COFACTOR_DERIVE: the same
    0x0009: ("u", "u", "u", "b"),  # CKM_RSA_PKCS_OAEP: hashAlg, mgf, source, source data
    0x1087: ("b", "u", "b", "u"),  # CKM_AES_GCM: iv, ivBits, AAD, tagBits
}


def encode_parameter(mechanism: int, *fields: int | bytes) -> bytes:
    """The wire form of a POINTER_PARAMETERS mechanism's parameter."""
    writer = Writer()
    for kind, value in zip(POINTER_PARAMETERS[mechanism], fields, strict=True):
        if kind == "u":
            writer.u64(value)  # type: ignore[arg-type]
        else:
            writer.bytes(value)  # type: ignore[arg-type]
    return writer.getvalue()


def decode_parameter(mechanism: int, data: bytes) -> list[int | bytes]:
    reader = Reader(data)
    fields: list[int | bytes] = [reader.u64() if kind == "u" else reader.bytes()
                                 for kind in POINTER_PARAMETERS[mechanism]]
    reader.end()
    return fields


Version = tuple[int, int]


@dataclass(frozen=True)
class ModuleInfo:
    cryptoki: Version
    manufacturer: str
    flags: int
    library_description: str
    library: Version


@dataclass(frozen=True)
class SlotInfo:
    description: str
    manufacturer: str
    flags: int
    hardware: Version
    firmware: Version


@dataclass(frozen=True)
class TokenInfo:
    """Memory sizes are None when the token reports CK_UNAVAILABLE_INFORMATION;
    utc_time is None when the token has no clock or the field is blank."""

    label: str
    manufacturer: str
    model: str
    serial: str
    flags: int
    max_sessions: int
    sessions: int
    max_rw_sessions: int
    rw_sessions: int
    max_pin_len: int
    min_pin_len: int
    total_public_mem: int | None
    free_public_mem: int | None
    total_private_mem: int | None
    free_private_mem: int | None
    hardware: Version
    firmware: Version
    utc_time: str | None


@dataclass(frozen=True)
class MechanismInfo:
    min_key_size: int
    max_key_size: int
    flags: int


@dataclass(frozen=True)
class SessionInfo:
    slot: int
    state: int
    flags: int
    device_error: int


class WireError(KSW1Error, ValueError):
    """Malformed or truncated wire data."""


def token_string(text: str) -> str:
    """A fixed-width token string without its padding (trailing spaces and NULs)."""
    return text.rstrip(" \0")


def _known(value: int | None) -> int | None:
    return None if value is None or value == CK_UNAVAILABLE_INFORMATION else value


class Reader:
    """Reads wire values from the front of a byte string."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self._pos = 0

    def _advance(self, n: int, what: str) -> int:
        """The offset of the next n bytes, which the reader then moves past."""
        start = self._pos
        if start + n > len(self._data):
            raise WireError(f"truncated {what}: need {n} bytes at offset {start}, "
                            f"have {len(self._data) - start}")
        self._pos = start + n
        return start

    def _take(self, n: int, what: str) -> memoryview:
        start = self._advance(n, what)
        return self._data[start:start + n]

    def _fixed(self, fixed: struct.Struct, what: str) -> int:
        return fixed.unpack_from(self._data, self._advance(fixed.size, what))[0]

    def u8(self) -> int:
        return self._fixed(U8, "u8")

    def u16(self) -> int:
        return self._fixed(U16, "u16")

    def u32(self) -> int:
        return self._fixed(U32, "u32")

    def u64(self) -> int:
        return self._fixed(U64, "u64")

    def bool(self) -> bool:
        return self.u8() != 0

    def bytes(self) -> builtins.bytes:
        return bytes(self._take(self.u32(), "bytes"))

    def string(self) -> str:
        raw = self.bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError(f"string is not UTF-8: {exc.reason}") from None

    def option(self, read: Callable[["Reader"], T]) -> T | None:
        """`read` takes the reader: Reader.u64, say."""
        flag = self.u8()
        if flag == 0:
            return None
        if flag != 1:
            raise WireError(f"bad option flag {flag}")
        return read(self)

    def list(self, read: Callable[["Reader"], T]) -> builtins.list[T]:
        """`read` takes the reader: Reader.u32, say."""
        count = self.u32()
        # every element takes at least one byte: a count beyond the rest is a lie
        if count > self.remaining:
            raise WireError(f"truncated list: {count} elements, {self.remaining} bytes left")
        return [read(self) for _ in range(count)]

    handle = u32

    def version(self) -> Version:
        return self.u8(), self.u8()

    def mechanism(self) -> Mechanism:
        return Mechanism(self.u64(), self.option(Reader.bytes))

    def attribute(self) -> Attribute:
        cka = self.u32()
        raw_tag = self.u8()
        try:
            tag = Tag(raw_tag)
        except ValueError:
            raise WireError(f"unknown attribute tag {raw_tag}") from None
        return Attribute(cka, tag, getattr(self, _TAG_CODEC[tag])())

    def attributes(self) -> builtins.list[Attribute]:
        return self.list(Reader.attribute)

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def rest(self) -> builtins.bytes:
        """Everything left (the message of a CkError body)."""
        return bytes(self._take(self.remaining, "rest"))

    def end(self) -> None:
        """Trailing bytes after the last argument make the request malformed."""
        if self.remaining:
            raise WireError(f"{self.remaining} trailing bytes")

    # info records, as the dispatcher writes them
    def module_info(self) -> ModuleInfo:
        return ModuleInfo(self.version(), self.string(), self.u64(), self.string(), self.version())

    def slot_info(self) -> SlotInfo:
        return SlotInfo(self.string(), self.string(), self.u32(), self.version(), self.version())

    def token_info(self) -> TokenInfo:
        label, manufacturer, model, serial = (self.string() for _ in range(4))
        flags = self.u32()
        max_sessions, sessions, max_rw, rw, max_pin, min_pin = (self.u64() for _ in range(6))
        total_public, free_public, total_private, free_private = (
            self.option(Reader.u64) for _ in range(4))
        return TokenInfo(label, manufacturer, model, serial, flags, max_sessions, sessions,
                         max_rw, rw, max_pin, min_pin, total_public, free_public, total_private,
                         free_private, hardware=self.version(), firmware=self.version(),
                         utc_time=self.option(Reader.string))

    def mechanism_info(self) -> MechanismInfo:
        return MechanismInfo(self.u64(), self.u64(), self.u32())

    def session_info(self) -> SessionInfo:
        return SessionInfo(self.u32(), self.u8(), self.u32(), self.u64())


class Writer:
    """Appends wire values; every method returns the writer so calls chain."""

    def __init__(self) -> None:
        self._parts: builtins.list[builtins.bytes] = []

    def getvalue(self) -> builtins.bytes:
        return b"".join(self._parts)

    def _fixed(self, fixed: struct.Struct, value: int, what: str) -> "Writer":
        try:
            self._parts.append(fixed.pack(value))
        except struct.error:
            raise WireError(f"{what} out of range: {value}") from None
        return self

    def u8(self, value: int) -> "Writer":
        return self._fixed(U8, value, "u8")

    def u16(self, value: int) -> "Writer":
        return self._fixed(U16, value, "u16")

    def u32(self, value: int) -> "Writer":
        return self._fixed(U32, value, "u32")

    def u64(self, value: int) -> "Writer":
        return self._fixed(U64, value, "u64")

    def bool(self, value: bool) -> "Writer":
        return self.u8(1 if value else 0)

    def bytes(self, value: builtins.bytes | bytearray | memoryview) -> "Writer":
        self.u32(len(value))
        self._parts.append(bytes(value))
        return self

    def string(self, value: str) -> "Writer":
        return self.bytes(value.encode("utf-8"))

    def option(self, value: T | None, write: Callable[["Writer", T], object]) -> "Writer":
        """`write` takes the writer and the value: Writer.u64, say."""
        if value is None:
            return self.u8(0)
        self.u8(1)
        write(self, value)
        return self

    def list(self, items: Iterable[T], write: Callable[["Writer", T], object]) -> "Writer":
        """`write` takes the writer and an item: Writer.u32, say."""
        items = list(items)
        self.u32(len(items))
        for item in items:
            write(self, item)
        return self

    handle = u32

    def version(self, value: Version) -> "Writer":
        return self.u8(value[0]).u8(value[1])

    def mechanism(self, value: Mechanism) -> "Writer":
        return self.u64(value.type).option(value.parameter, Writer.bytes)

    def attribute(self, value: Attribute) -> "Writer":
        self.u32(value.type).u8(value.tag)
        getattr(self, _TAG_CODEC[value.tag])(value.value)
        return self

    def attributes(self, values: Iterable[Attribute]) -> "Writer":
        return self.list(values, Writer.attribute)

    # info records: token strings lose their padding, unknown sizes become none
    def module_info(self, info: ModuleInfo) -> "Writer":
        return (self.version(info.cryptoki).string(token_string(info.manufacturer))
                .u64(info.flags).string(token_string(info.library_description))
                .version(info.library))

    def slot_info(self, info: SlotInfo) -> "Writer":
        return (self.string(token_string(info.description))
                .string(token_string(info.manufacturer)).u32(info.flags)
                .version(info.hardware).version(info.firmware))

    def token_info(self, info: TokenInfo) -> "Writer":
        for text in (info.label, info.manufacturer, info.model, info.serial):
            self.string(token_string(text))
        self.u32(info.flags)
        for count in (info.max_sessions, info.sessions, info.max_rw_sessions,
                      info.rw_sessions, info.max_pin_len, info.min_pin_len):
            self.u64(count)
        for size in (info.total_public_mem, info.free_public_mem,
                     info.total_private_mem, info.free_private_mem):
            self.option(_known(size), Writer.u64)
        utc = token_string(info.utc_time) if info.utc_time is not None else ""
        return (self.version(info.hardware).version(info.firmware)
                .option(utc or None, Writer.string))

    def mechanism_info(self, info: MechanismInfo) -> "Writer":
        return self.u64(info.min_key_size).u64(info.max_key_size).u32(info.flags)

    def session_info(self, info: SessionInfo) -> "Writer":
        return self.u32(info.slot).u8(info.state).u32(info.flags).u64(info.device_error)


# Responses: (status, body) pairs, as Dispatcher.call returns them.
Response = tuple[Pkcs11Status, bytes]


def ok(body: bytes = b"") -> Response:
    return Pkcs11Status.OK, body


def protocol_error(message: str) -> Response:
    return Pkcs11Status.PROTOCOL_ERROR, pkcs11_message(message)


def ck_error(ckr: int, message: str) -> Response:
    """u32 CKR, then the message as raw UTF-8 to the end (no length prefix)."""
    return Pkcs11Status.CK_ERROR, struct.pack("<I", ckr) + message.encode("utf-8")


def internal(message: str) -> Response:
    return Pkcs11Status.INTERNAL, pkcs11_message(message)


def auth_denied(message: str) -> Response:
    return Pkcs11Status.AUTH_DENIED, pkcs11_message(message)


def error_of(status: int, body: bytes) -> tuple[int | None, str]:
    """(CKR or None, message) of a non-Ok response body."""
    reader = Reader(body)
    if status == Pkcs11Status.CK_ERROR:
        ckr = reader.u32()
        return ckr, reader.rest().decode("utf-8", "replace")
    if status == Pkcs11Status.OK:
        raise WireError("an Ok response has no error")
    message = reader.string()
    reader.end()
    return None, message
