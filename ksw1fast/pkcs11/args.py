"""The argument layout of every PKCS#11 fn id (docs/pkcs11.md §4), without a module.

Each fn id's args are a few words: `wire.Reader` methods (u8, u32, u64, bool, bytes,
string) or the names below, which the agent's dispatcher resolves to handles and
checked sizes (`dispatch._RESOLVERS`) and which `check` reads as their wire type.
`check` lets the gateway refuse a malformed request with ProtocolError even when no
module is configured, as an agent would with one.

The operation families (Encrypt, Decrypt, Sign, Verify, Digest and the Recover
kinds) share one shape each: `OPS` lists them, with the fn ids of their parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

from ksw1fast.pkcs11 import hotargs
from ksw1fast.pkcs11.wire import (FUNCTIONS, POINTER_PARAMETERS, Mechanism, Reader, WireError,
                                  decode_parameter)

SIZED = "sized"  # output into the client's max_out (u32 arg)
QUERY = "query"  # output sized by the PKCS#11 length query (no arg)
CHECK = "check"  # a signature in (bytes arg), no output


@dataclass(frozen=True)
class Op:
    """An operation kind: C_{kind}Init, C_{kind} (one-shot), C_{kind}Update, C_{kind}Final.

    SIZED kinds also return output from Update. `multipart` holds the fn ids of
    Init, Update, Final and Abort, for the kinds that have them.
    """

    kind: str
    keyed: bool
    result: str
    one_shot: int
    multipart: tuple[int, int, int, int] | None = None

    @property
    def tail(self) -> str:
        """The spec word of the arg after the data (one-shot) or the session (Final)."""
        return {SIZED: hotargs.SIZE_TAIL, QUERY: hotargs.NO_TAIL,
                CHECK: hotargs.BYTES_TAIL}[self.result]

    @property
    def init_spec(self) -> str:
        return "session mechanism " + ("key" if self.keyed else "-")

    @cached_property
    def init_name(self) -> str:
        return f"C_{self.kind}Init"


OPS = (
    Op("Encrypt", True, SIZED, 0x010B, (0x011E, 0x011F, 0x0120, 0x0121)),
    Op("Decrypt", True, SIZED, 0x010A, (0x0122, 0x0123, 0x0124, 0x0125)),
    Op("Sign", True, QUERY, 0x0108, (0x0126, 0x0127, 0x0128, 0x0129)),
    Op("Verify", True, CHECK, 0x0109, (0x012A, 0x012B, 0x012C, 0x012D)),
    Op("Digest", False, QUERY, 0x010C, (0x012E, 0x012F, 0x0130, 0x0131)),
    Op("SignRecover", True, SIZED, 0x0112),
    Op("VerifyRecover", True, SIZED, 0x0113),
)


def _op_args(op: Op) -> dict[int, str]:
    args = {op.one_shot: f"{op.init_spec} bytes {op.tail}"}
    if op.multipart:
        init, update, final, abort = op.multipart
        args.update({init: op.init_spec, update: "session bytes bool",
                     final: f"session {op.tail}", abort: "session"})
    return args


# the legacy ids 0x000A/0x000B take a u32 slot where 0x0001/0x0002 take a u64
ARGS: dict[int, str] = {
    0x0000: "bool",                                 # GetSlotList
    0x0001: "u64", 0x000A: "u32",                   # GetSlotInfo
    0x0002: "u64", 0x000B: "u32",                   # GetTokenInfo
    0x0003: "u32 opt_string string",                # InitToken
    0x0004: "u32 u32",                              # OpenSession
    0x0005: "u32",                                  # GetMechanismList
    0x0006: "opt_string",                           # Initialize
    0x0007: "",                                     # Finalize
    0x0008: "u32",                                  # CloseAllSessions
    0x0009: "",                                     # GetInfo
    0x000C: "u32",                                  # WaitForSlotEvent
    0x000D: "u32 u64",                              # GetMechanismInfo
    0x0100: "session u32 bytes",                    # Login
    0x0101: "session",                              # Logout
    0x0102: "session",                              # CloseSession
    0x0103: "session bytes",                        # InitPIN
    0x0104: "session template",                     # FindObjectsInit
    0x0105: "cursor size",                          # FindObjects
    0x0106: "cursor",                               # FindObjectsFinal
    0x0107: "session mechanism template template",  # GenerateKeyPair
    0x010D: "session bytes",                        # SeedRandom
    0x010E: "session size",                         # GenerateRandom
    0x010F: "session",                              # CancelFunction
    0x0110: "session bytes bytes",                  # SetPIN
    0x0111: "session key",                          # DigestKey
    0x0114: "session template",                     # CreateObject
    0x0116: "session mechanism template",           # GenerateKey
    0x0117: "session key mechanism template",       # DeriveKey
    0x0118: "session mechanism key key",            # WrapKey
    0x0119: "session mechanism key bytes template",  # UnwrapKey
    0x011A: "session key template",                 # CopyObject
    0x011B: "session size",                         # GetOperationState
    0x011C: "session bytes opt_key opt_key",        # SetOperationState
    0x011D: "session",                              # GetSessionInfo
    0x0132: "session u32 bytes",                    # LoginVendor
    0x0200: "object types",                         # GetAttributeValue
    0x0201: "object",                               # DestroyObject
    0x0202: "object",                               # GetObjectSize
    0x0203: "object template",                      # SetAttributeValue
    0x0204: "session object",                       # ObjectBind
    0xFF00: "u8 u32",                               # HandleDrop
}
for _op in OPS:
    ARGS.update(_op_args(_op))
assert ARGS.keys() == FUNCTIONS.keys()

def _mechanism(reader: Reader) -> Mechanism:
    mechanism = reader.mechanism()
    if mechanism.parameter is not None and mechanism.type in POINTER_PARAMETERS:
        decode_parameter(mechanism.type, mechanism.parameter)
    return mechanism


# what each resolved word is on the wire
_WIRE: dict[str, Callable[[Reader], Any]] = {
    "-": lambda r: None,
    "session": Reader.u32, "object": Reader.u32, "cursor": Reader.u32, "key": Reader.u32,
    "opt_key": lambda r: r.option(Reader.u32),
    "size": Reader.u32,
    "mechanism": _mechanism,
    "template": Reader.attributes,
    "types": lambda r: r.list(Reader.u32),
    "opt_string": lambda r: r.option(Reader.string),
}


def unknown_fn(fn_id: int) -> str:
    return f"unknown fn id 0x{fn_id:04x}"


def malformed(fn_id: int, exc: WireError) -> str:
    return f"malformed {FUNCTIONS[fn_id]} args: {exc}"


def check(fn_id: int, args: bytes) -> str | None:
    """Why a request's args do not fit its fn id's layout (the ProtocolError message an
    agent would answer), or None when they do."""
    if fn_id not in ARGS:
        return unknown_fn(fn_id)
    try:
        decode(fn_id, args)
    except WireError as exc:
        return malformed(fn_id, exc)
    return None


def decode(fn_id: int, args: bytes) -> list[Any]:
    """A request's args, one value per word of its layout (ARGS; None for "-", a
    Mechanism, a list of Attributes...); WireError when they do not fit it."""
    reader = Reader(args)
    values = [(_WIRE.get(word) or getattr(Reader, word))(reader)
              for word in ARGS[fn_id].split()]
    reader.end()
    return values
