"""ctypes binding to a PKCS#11 module, and the native (C) form of wire values.

`Module` reaches the module through `C_GetFunctionList`. `ctypes.CDLL` on the
path PyKCS11 loaded returns the same dlopen handle, so both bindings drive
one module state (sessions, login, operations). It serves the calls
PyKCS11's low-level API lacks (C_CopyObject, C_Get/SetOperationState,
C_SignRecover(Init), C_VerifyRecover(Init), C_CancelFunction) and those it
gets wrong:

- every data-processing call (C_Encrypt/C_Decrypt/C_Sign/C_Verify/C_Digest,
  their Update/Final): PyKCS11 answers CKR_ARGUMENTS_BAD for an empty input
  without calling the module, so an empty message could not be digested or
  an empty part fed;
- C_GetAttributeValue: PyKCS11 gives a sensitive or invalid attribute the
  same empty value as a genuinely empty one;
- C_GetObjectSize: PyKCS11 has no way to pass the CK_ULONG* it fills.

Types follow the PKCS#11 v2.40 header: CK_ULONG is C `unsigned long` (8
bytes on LP64), CK_FUNCTION_LIST is the version then 68 function pointers in
the standard order.
"""
from __future__ import annotations

import ctypes
import struct
from ctypes import POINTER, byref, c_ubyte, c_ulong, c_void_p
from enum import Enum
from typing import Any, Sequence

from PyKCS11 import CKA, CKM, CKR

from ksw1fast.pkcs11 import wire
from ksw1fast.protocol.errors import KSW1Error

CK_ULONG = c_ulong
CK_ULONG_MAX = (1 << (8 * ctypes.sizeof(CK_ULONG))) - 1
CK_UNAVAILABLE_INFORMATION = CK_ULONG_MAX

CKR_OK = CKR["CKR_OK"]
CKR_FUNCTION_NOT_SUPPORTED = CKR["CKR_FUNCTION_NOT_SUPPORTED"]


def _not_supported(*args: Any) -> int:
    """What the function table entry of a function the module lacks answers."""
    return CKR_FUNCTION_NOT_SUPPORTED


class CK_VERSION(ctypes.Structure):
    _fields_ = [("major", c_ubyte), ("minor", c_ubyte)]


class CK_MECHANISM(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", c_void_p), ("ulParameterLen", CK_ULONG)]


class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", c_void_p), ("ulValueLen", CK_ULONG)]


_FUNCTION_NAMES = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
    "C_InitToken", "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession",
    "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState", "C_SetOperationState",
    "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject", "C_DestroyObject",
    "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit",
    "C_FindObjects", "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate",
    "C_EncryptFinal", "C_DecryptInit", "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal",
    "C_DigestInit", "C_Digest", "C_DigestUpdate", "C_DigestKey", "C_DigestFinal",
    "C_SignInit", "C_Sign", "C_SignUpdate", "C_SignFinal", "C_SignRecoverInit",
    "C_SignRecover", "C_VerifyInit", "C_Verify", "C_VerifyUpdate", "C_VerifyFinal",
    "C_VerifyRecoverInit", "C_VerifyRecover", "C_DigestEncryptUpdate",
    "C_DecryptDigestUpdate", "C_SignEncryptUpdate", "C_DecryptVerifyUpdate",
    "C_GenerateKey", "C_GenerateKeyPair", "C_WrapKey", "C_UnwrapKey", "C_DeriveKey",
    "C_SeedRandom", "C_GenerateRandom", "C_GetFunctionStatus", "C_CancelFunction",
    "C_WaitForSlotEvent",
)
assert len(_FUNCTION_NAMES) == 68


class CK_FUNCTION_LIST(ctypes.Structure):
    _fields_ = [("version", CK_VERSION)] + [(name, c_void_p) for name in _FUNCTION_NAMES]


# Prototypes of the functions this binding calls, grouped by argument shape.
# H: a handle or other CK_ULONG, P: a pointer, N: a CK_ULONG length, LP: CK_ULONG*.
_H = _N = CK_ULONG
_P = c_void_p
_LP = POINTER(CK_ULONG)
_SHAPES: tuple[tuple[tuple[Any, ...], tuple[str, ...]], ...] = (
    ((_H, _P, _N, _P, _LP), ("C_Encrypt", "C_Decrypt", "C_Digest", "C_Sign", "C_SignRecover",
                             "C_VerifyRecover", "C_EncryptUpdate", "C_DecryptUpdate")),
    ((_H, _P, _LP), ("C_EncryptFinal", "C_DecryptFinal", "C_DigestFinal", "C_SignFinal",
                     "C_GetOperationState")),
    ((_H, _P, _N), ("C_DigestUpdate", "C_SignUpdate", "C_VerifyUpdate", "C_VerifyFinal")),
    ((_H, _P, _N, _P, _N), ("C_Verify",)),
    ((_H, _P, _H), ("C_SignRecoverInit", "C_VerifyRecoverInit")),
    ((_H, _P, _N, _H, _H), ("C_SetOperationState",)),
    ((_H, _H, _P, _N, _LP), ("C_CopyObject",)),
    ((_H, _H, _P, _N), ("C_GetAttributeValue",)),
    ((_H, _H, _LP), ("C_GetObjectSize",)),
    ((_H,), ("C_CancelFunction",)),
)


def ckr_name(rv: int) -> str:
    name = CKR.get(rv)
    return name if isinstance(name, str) else f"CKR 0x{rv:08X}"


class CkrError(KSW1Error):
    """A PKCS#11 call answered something other than CKR_OK."""

    def __init__(self, rv: int, function: str) -> None:
        super().__init__(f"{function}: {ckr_name(rv)}")
        self.rv = rv


def check(rv: int, function: str) -> None:
    if rv != CKR_OK:
        raise CkrError(rv, function)


Buffer = bytes | bytearray


class OutputTooLarge(KSW1Error):
    """The module wants to return more than the Module's max_output bytes."""


class Module:
    """The module's function list, called with Python bytes in and out.

    max_output bounds what a length the module reports may make it allocate:
    such answers are not always sane (SoftHSM's C_DecryptFinal after no data
    reports a wrapped-around length).
    """

    def __init__(self, path: str, max_output: int) -> None:
        self.max_output = max_output
        self._dll = ctypes.CDLL(path)  # same handle as the module PyKCS11 loaded
        get_list = self._dll.C_GetFunctionList
        get_list.restype = CK_ULONG
        get_list.argtypes = [POINTER(POINTER(CK_FUNCTION_LIST))]
        table = POINTER(CK_FUNCTION_LIST)()
        check(get_list(byref(table)), "C_GetFunctionList")
        self._functions: dict[str, Any] = {}
        for argtypes, names in _SHAPES:
            prototype = ctypes.CFUNCTYPE(CK_ULONG, *argtypes)
            for name in names:
                address = getattr(table.contents, name)
                # a NULL entry is a function the module does not offer: it answers so
                self._functions[name] = prototype(address) if address else _not_supported

    def rv(self, name: str, *args: Any) -> int:
        return self._functions[name](*args)

    def call(self, name: str, *args: Any) -> None:
        check(self.rv(name, *args), name)

    def feed(self, name: str, session: int, *buffers: Buffer) -> None:
        """A call taking byte strings as (pointer, length) pairs and returning nothing."""
        self.call(name, session, *_spread(buffers))

    def output(self, name: str, session: int, *buffers: Buffer, size: int | None = None) -> bytes:
        """A call whose last two arguments return bytes (pOut, pulOutLen).

        With no `size` the buffer is sized by the PKCS#11 length query (NULL
        buffer first); with one, that many bytes are offered and a module that
        needs more answers CKR_BUFFER_TOO_SMALL.
        """
        function = self._functions[name]  # called directly: this is the hot path
        args = _spread(buffers)
        length = CK_ULONG(0)
        pointer = byref(length)
        if size is None:
            check(function(session, *args, None, pointer), name)
            size = length.value
            if size > self.max_output:
                raise OutputTooLarge(f"{name} wants {size} bytes of output, "
                                     f"more than the cap of {self.max_output}")
        out = ctypes.create_string_buffer(size)
        length.value = size
        check(function(session, *args, out, pointer), name)
        return out.raw[:length.value]

    def get_attribute_value(self, session: int, obj: int,
                            types: Sequence[int]) -> list[tuple[int, bytes]]:
        """The attributes the module returns; sensitive and invalid ones are left out."""
        tolerated = (CKR_OK, CKR["CKR_ATTRIBUTE_SENSITIVE"], CKR["CKR_ATTRIBUTE_TYPE_INVALID"])
        template = (CK_ATTRIBUTE * len(types))(*(CK_ATTRIBUTE(t, None, 0) for t in types))
        rv = self.rv("C_GetAttributeValue", session, obj, template, len(types))
        if rv not in tolerated:
            check(rv, "C_GetAttributeValue")
        buffers: list[Any] = []
        for attr in template:
            available = attr.ulValueLen != CK_UNAVAILABLE_INFORMATION
            if available and attr.ulValueLen > self.max_output:
                raise OutputTooLarge(f"attribute 0x{attr.type:X} has {attr.ulValueLen} bytes, "
                                     f"more than the cap of {self.max_output}")
            buffers.append(ctypes.create_string_buffer(attr.ulValueLen) if available else None)
            attr.pValue = ctypes.cast(buffers[-1], c_void_p) if available else None
            attr.ulValueLen = attr.ulValueLen if available else 0
        rv = self.rv("C_GetAttributeValue", session, obj, template, len(types))
        if rv not in tolerated:
            check(rv, "C_GetAttributeValue")
        return [(attr.type, buf.raw[:attr.ulValueLen])
                for attr, buf in zip(template, buffers, strict=True)
                if buf is not None and attr.ulValueLen != CK_UNAVAILABLE_INFORMATION]

    def copy_object(self, session: int, obj: int, template: Sequence[tuple[int, bytes]]) -> int:
        array, _values = c_template(template)  # _values: what the array points into
        new = CK_ULONG(0)
        self.call("C_CopyObject", session, obj, array, len(template), byref(new))
        return new.value

    def object_size(self, session: int, obj: int) -> int:
        size = CK_ULONG(0)
        self.call("C_GetObjectSize", session, obj, byref(size))
        return size.value

    def recover_init(self, name: str, session: int, mechanism: "NativeParameter",
                     key: int) -> None:
        """C_SignRecoverInit / C_VerifyRecoverInit."""
        self.call(name, session, byref(mechanism.c_mechanism()), key)


def _spread(buffers: Sequence[Buffer]) -> list[Any]:
    """(pointer, length) pairs; b"" still gives a non-NULL pointer, as modules expect."""
    args: list[Any] = []
    for data in buffers:
        args += [bytes(data), len(data)]  # ctypes passes a pointer into the bytes object
    return args


def c_template(template: Sequence[tuple[int, bytes]]) -> tuple[Any, list[Any]]:
    """A CK_ATTRIBUTE array and the value buffers it points into (keep them alive)."""
    keep = [ctypes.create_string_buffer(value, len(value)) for _, value in template]
    array = (CK_ATTRIBUTE * len(template))(*(
        CK_ATTRIBUTE(cka, ctypes.cast(buf, c_void_p), len(value))
        for (cka, value), buf in zip(template, keep, strict=True)))
    return array, keep


# --- mechanism parameters -------------------------------------------------------------

# The C layout of wire.POINTER_PARAMETERS: a CK_ULONG per "u" field; a "b" field is
# (length, pointer) in these structs and (pointer, length) in the others.
_LENGTH_FIRST = frozenset({CKM["CKM_ECDH1_DERIVE"], CKM["CKM_ECDH1_COFACTOR_DERIVE"]})


class NativeParameter:
    """A mechanism's parameter in the module's C layout; keeps what it points to alive."""

    def __init__(self, mechanism: wire.Mechanism) -> None:
        self.type = mechanism.type
        self._keep: list[Any] = []
        if mechanism.parameter is None or mechanism.type not in wire.POINTER_PARAMETERS:
            self.blob = mechanism.parameter or b""
            return
        fmt, values = "@", []
        for value in wire.decode_parameter(mechanism.type, mechanism.parameter):
            if isinstance(value, int):
                fmt += "L"
                values.append(value)
                continue
            buf = ctypes.create_string_buffer(value, len(value))
            self._keep.append(buf)
            pointer = ctypes.addressof(buf) if value else 0
            length_first = mechanism.type in _LENGTH_FIRST
            fmt += "LP" if length_first else "PL"
            values += [len(value), pointer] if length_first else [pointer, len(value)]
        try:
            self.blob = struct.pack(fmt, *values)
        except struct.error as exc:
            raise wire.WireError(f"mechanism parameter: {exc}") from None

    def c_mechanism(self) -> CK_MECHANISM:
        buf = ctypes.create_string_buffer(self.blob, len(self.blob))
        self._keep.append(buf)
        pointer = ctypes.cast(buf, c_void_p) if self.blob else None
        return CK_MECHANISM(self.type, pointer, len(self.blob))


# --- attribute values -----------------------------------------------------------------

class AttrKind(Enum):
    """The C type of an attribute's value, for the kinds that are not a byte array."""

    BOOL = "CK_BBOOL"
    ULONG = "CK_ULONG"
    CLASS = "CK_OBJECT_CLASS"
    KEY_TYPE = "CK_KEY_TYPE"
    MECHANISM = "CK_MECHANISM_TYPE"
    DATE = "CK_DATE"
    STRING = "UTF-8"
    BYTES = "bytes"


def _kinds(kind: AttrKind, names: str) -> dict[int, AttrKind]:
    return {CKA[name]: kind for name in names.split()}


_ATTR_KINDS: dict[int, AttrKind] = {
    **_kinds(AttrKind.BOOL, """
        CKA_TOKEN CKA_PRIVATE CKA_MODIFIABLE CKA_COPYABLE CKA_DESTROYABLE CKA_TRUSTED
        CKA_SENSITIVE CKA_ENCRYPT CKA_DECRYPT CKA_WRAP CKA_UNWRAP CKA_SIGN CKA_SIGN_RECOVER
        CKA_VERIFY CKA_VERIFY_RECOVER CKA_DERIVE CKA_EXTRACTABLE CKA_LOCAL
        CKA_NEVER_EXTRACTABLE CKA_ALWAYS_SENSITIVE CKA_ALWAYS_AUTHENTICATE
        CKA_WRAP_WITH_TRUSTED CKA_RESET_ON_INIT CKA_HAS_RESET CKA_COLOR
        CKA_OTP_USER_FRIENDLY_MODE"""),
    **_kinds(AttrKind.ULONG, """
        CKA_CERTIFICATE_TYPE CKA_CERTIFICATE_CATEGORY CKA_JAVA_MIDP_SECURITY_DOMAIN
        CKA_MODULUS_BITS CKA_PRIME_BITS CKA_SUBPRIME_BITS CKA_VALUE_BITS CKA_VALUE_LEN
        CKA_OTP_FORMAT CKA_OTP_LENGTH CKA_OTP_TIME_INTERVAL CKA_OTP_CHALLENGE_REQUIREMENT
        CKA_OTP_TIME_REQUIREMENT CKA_OTP_COUNTER_REQUIREMENT CKA_OTP_PIN_REQUIREMENT
        CKA_HW_FEATURE_TYPE CKA_PIXEL_X CKA_PIXEL_Y CKA_RESOLUTION CKA_CHAR_ROWS
        CKA_CHAR_COLUMNS CKA_BITS_PER_PIXEL CKA_PROFILE_ID"""),
    **_kinds(AttrKind.CLASS, "CKA_CLASS"),
    **_kinds(AttrKind.KEY_TYPE, "CKA_KEY_TYPE"),
    **_kinds(AttrKind.MECHANISM,
             "CKA_KEY_GEN_MECHANISM CKA_MECHANISM_TYPE CKA_NAME_HASH_ALGORITHM"),
    **_kinds(AttrKind.DATE, "CKA_START_DATE CKA_END_DATE"),
    **_kinds(AttrKind.STRING, """
        CKA_LABEL CKA_APPLICATION CKA_URL CKA_UNIQUE_ID CKA_CHAR_SETS CKA_ENCODING_METHODS
        CKA_MIME_TYPES CKA_OTP_TIME CKA_OTP_USER_IDENTIFIER CKA_OTP_SERVICE_IDENTIFIER"""),
}


def attr_kind(cka: int) -> AttrKind:
    return _ATTR_KINDS.get(cka, AttrKind.BYTES)


_NUMERIC_TAGS = frozenset({wire.Tag.BOOLEAN, wire.Tag.UINT32, wire.Tag.UINT64,
                           wire.Tag.KEY_KIND, wire.Tag.OBJECT_CLASS, wire.Tag.MECHANISM_TYPE})


def native_value(attr: wire.Attribute) -> bytes:
    """The bytes the module expects for a wire attribute.

    A number or boolean becomes the attribute's C type: CK_BBOOL (1 byte) for
    a boolean attribute, else CK_ULONG (native width and byte order). Byte,
    string and date tags are passed through as their bytes.
    """
    if attr.tag not in _NUMERIC_TAGS:
        value = attr.value
        return value.encode("utf-8") if isinstance(value, str) else bytes(value)
    number = int(attr.value)
    if attr_kind(attr.type) is AttrKind.BOOL:
        return b"\x01" if number else b"\x00"
    if not 0 <= number <= CK_ULONG_MAX:
        raise wire.WireError(f"attribute 0x{attr.type:X}: {number} does not fit a CK_ULONG")
    return struct.pack("@L", number)


_ULONG_SIZE = struct.calcsize("@L")
_U32_MAX = (1 << 32) - 1
_ULONG_TAGS = {AttrKind.ULONG: wire.Tag.UINT64, AttrKind.CLASS: wire.Tag.OBJECT_CLASS,
               AttrKind.KEY_TYPE: wire.Tag.KEY_KIND, AttrKind.MECHANISM: wire.Tag.MECHANISM_TYPE}
_TEXT_TAGS = {AttrKind.STRING: wire.Tag.STRING, AttrKind.DATE: wire.Tag.DATE_STRING}


def wire_attribute(cka: int, raw: bytes) -> wire.Attribute:
    """A module attribute value tagged by its PKCS#11 type; ByteString when unknown or odd."""
    kind = attr_kind(cka)
    if kind is AttrKind.BOOL and len(raw) == 1:
        return wire.Attribute(cka, wire.Tag.BOOLEAN, raw != b"\x00")
    if kind in _ULONG_TAGS and len(raw) == _ULONG_SIZE:
        number = struct.unpack("@L", raw)[0]
        tag = _ULONG_TAGS[kind]
        if tag in (wire.Tag.OBJECT_CLASS, wire.Tag.KEY_KIND) and number > _U32_MAX:
            tag = wire.Tag.UINT64  # a vendor value the u32 tag cannot carry
        return wire.Attribute(cka, tag, number)
    if kind in _TEXT_TAGS:
        try:
            return wire.Attribute(cka, _TEXT_TAGS[kind], raw.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return wire.Attribute(cka, wire.Tag.BYTE_STRING, raw)
