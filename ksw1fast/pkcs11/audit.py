"""What the audit trail says of PKCS#11 calls, observed in the gateway from each
request and its answer (ksw1fast.ops.audit): no agent is asked anything more, and
only the calls in WATCHED cost anything beyond a set look-up.  At the trail's
"security" level (`--audit`, the default) only `always_audited` calls are observed:
logins, administration and failed key uses; "all" adds every key use, with labels.

Audited (AUDITED): logins and logouts, token and PIN administration, and the calls
that use a key for something only its holder should do: Sign, SignInit, SignRecover,
Decrypt, DecryptInit, WrapKey, UnwrapKey, DeriveKey.  An event names the function,
the mechanism, the key's handle and, when known, its CKA_LABEL, and the answer's
status (and CKR); never the data, the PIN or the output.

Labels are known when the connection's own calls showed them, which is how clients
find their keys: a FindObjects whose template asked for a CKA_LABEL, a key made with
one (GenerateKeyPair, GenerateKey, CreateObject, CopyObject, DeriveKey, UnwrapKey), a
GetAttributeValue or SetAttributeValue of CKA_LABEL.  Handle ids are per connection and
never reused (ksw1fast.pkcs11.handles), so a label once learnt stays right until the
object is destroyed; at most MAX_LABELS are kept per connection.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

from ksw1fast.pkcs11 import hotargs
from ksw1fast.pkcs11.args import OPS, decode
from ksw1fast.pkcs11.mechanisms import mechanism_name
from ksw1fast.pkcs11.wire import FUNCTIONS, Attribute, Reader, WireError, error_of
from ksw1fast.protocol.constants import Pkcs11Status

CKA_LABEL = 0x3
MAX_LABELS = 1024  # per connection: with MAX_LABEL_LENGTH, at most ~128 KiB a client can fill
MAX_LABEL_LENGTH = 128

_AUDITED_NAMES = ("Login", "LoginVendor", "Logout", "InitToken", "InitPIN", "SetPIN",
                  "Sign", "SignInit", "SignRecover", "Decrypt", "DecryptInit",
                  "WrapKey", "UnwrapKey", "DeriveKey")
_LABELLING_NAMES = ("FindObjectsInit", "FindObjects", "FindObjectsFinal", "GenerateKeyPair",
                    "GenerateKey", "CreateObject", "CopyObject", "DeriveKey", "UnwrapKey",
                    "GetAttributeValue", "SetAttributeValue", "DestroyObject")
AUDITED = frozenset(fn for fn, name in FUNCTIONS.items() if name in _AUDITED_NAMES)
# audited at every level of the trail; the key uses only when they fail, unless `--audit all`
_ACCOUNT = frozenset(fn for fn, name in FUNCTIONS.items() if name in _AUDITED_NAMES[:6])
WATCHED = AUDITED | frozenset(fn for fn, name in FUNCTIONS.items() if name in _LABELLING_NAMES)

_USERS = {0: "so", 1: "user", 2: "context_specific"}
# the one-shot and Init calls of the audited operation kinds: their args' shape
_OPERATIONS: dict[int, tuple[bool, bool, str]] = {}
for _op in OPS:
    if _op.kind in ("Sign", "Decrypt", "SignRecover"):
        _OPERATIONS[_op.one_shot] = (_op.keyed, True, _op.tail)
        if _op.multipart:
            _OPERATIONS[_op.multipart[0]] = (_op.keyed, False, hotargs.NO_TAIL)


def always_audited(fn_id: int, status: int) -> bool:
    """Whether a call is in the trail at its "security" level: logins and token or PIN
    administration, and a key use that failed."""
    return fn_id in _ACCOUNT or (fn_id in AUDITED and status != Pkcs11Status.OK)


def _args(fn_id: int, args: bytes) -> Optional[list[Any]]:
    """The request's args by their layout (args.decode); None if malformed.  Byte strings
    (a PIN, data, a wrapped key) are in the list but never described."""
    try:
        return decode(fn_id, args)
    except (WireError, KeyError):
        return None


@lru_cache(maxsize=None)
def _ckr_names() -> dict[int, str]:
    """PyKCS11's CKR names, when it is installed (wherever agents run); loaded only when a
    failed call is audited."""
    try:
        import PyKCS11
    except ImportError:
        return {}
    return {k: v for k, v in PyKCS11.CKR.items() if isinstance(k, int) and isinstance(v, str)}


def ckr_name(ckr: int) -> str:
    return _ckr_names().get(ckr, f"0x{ckr:08X}")


def status_name(status: int) -> str:
    try:
        return Pkcs11Status(status).name.lower()
    except ValueError:
        return "invalid"


def _label(template: Any) -> Optional[str]:
    """The CKA_LABEL a template or an attribute list holds, if any."""
    if not isinstance(template, list):
        return None
    for attribute in template:
        if isinstance(attribute, Attribute) and attribute.type == CKA_LABEL:
            value = attribute.value
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            return str(value)[:MAX_LABEL_LENGTH]
    return None


def _u32s(body: bytes, count: int) -> Optional[list[int]]:
    reader = Reader(body)
    try:
        return [reader.u32() for _ in range(count)]
    except WireError:
        return None


class Pkcs11Audit:
    """One connection's view of its PKCS#11 calls: the labels of its object handles."""

    __slots__ = ("labels", "cursors")

    def __init__(self) -> None:
        self.labels: dict[int, str] = {}   # object handle -> CKA_LABEL
        self.cursors: dict[int, str] = {}  # find cursor -> the label its template asked for

    def observe(self, fn_id: int, args: bytes, status: int, body: bytes
                ) -> Optional[dict[str, Any]]:
        """Learn what the call shows of labels; the audit fields of an AUDITED call."""
        name = FUNCTIONS.get(fn_id, "")
        ok = status == Pkcs11Status.OK
        if fn_id in _OPERATIONS:
            values = self._operation(fn_id, args)
        else:
            values = _args(fn_id, args)
        if ok and values is not None:
            self._learn(name, values, body)
        if fn_id not in AUDITED:
            return None
        fields: dict[str, Any] = {"fn": name, "status": status_name(status)}
        if status == Pkcs11Status.CK_ERROR:
            try:
                fields["ckr"] = ckr_name(error_of(status, body)[0] or 0)
            except WireError:
                pass
        if values is not None:
            fields.update(self._describe(name, values, body if ok else b""))
        return fields

    def _operation(self, fn_id: int, args: bytes) -> Optional[list[Any]]:
        """session, mechanism, key of an audited one-shot or Init, struct-only."""
        keyed, data, tail = _OPERATIONS[fn_id]
        raw = hotargs.mechanism_call(args, keyed, data, tail)
        if raw is None:
            return None
        return [raw[0], raw[1], raw[3]]

    def _describe(self, name: str, values: list[Any], body: bytes) -> dict[str, Any]:
        if name in ("Login", "LoginVendor"):
            user = values[1]
            return {"session": values[0], "user": _USERS.get(user, f"0x{user:x}")}
        if name in ("Logout", "InitPIN", "SetPIN"):
            return {"session": values[0]}
        if name == "InitToken":
            return {"slot": values[0], "token_label": values[2][:MAX_LABEL_LENGTH]}
        if name in ("Sign", "SignInit", "SignRecover", "Decrypt", "DecryptInit"):
            session, mechanism, key = values
            return {"session": session, "mechanism": mechanism_name(mechanism),
                    "key": key, "key_label": self.labels.get(key)}
        if name == "WrapKey":
            session, mechanism, wrapping, key = values
            return {"session": session, "mechanism": mechanism_name(mechanism.type),
                    "key": wrapping, "key_label": self.labels.get(wrapping),
                    "object": key, "object_label": self.labels.get(key)}
        if name in ("UnwrapKey", "DeriveKey"):
            if name == "UnwrapKey":
                session, mechanism, key, _, template = values
            else:
                session, key, mechanism, template = values
            made = _u32s(body, 1) if body else None
            return {"session": session, "mechanism": mechanism_name(mechanism.type),
                    "key": key, "key_label": self.labels.get(key),
                    "object": made[0] if made else None, "object_label": _label(template)}
        return {}

    def _learn(self, name: str, values: list[Any], body: bytes) -> None:
        if name == "GenerateKeyPair":
            handles = _u32s(body, 2)
            if handles:
                self._remember(handles[0], _label(values[2]))
                self._remember(handles[1], _label(values[3]))
        elif name in ("GenerateKey", "CreateObject", "CopyObject", "DeriveKey", "UnwrapKey"):
            handles = _u32s(body, 1)
            label = _label(values[-1])
            if name == "CopyObject" and label is None:
                label = self.labels.get(values[1])
            if handles:
                self._remember(handles[0], label)
        elif name == "FindObjectsInit":
            label = _label(values[1])
            cursor = _u32s(body, 1)
            if label is not None and cursor and len(self.cursors) < MAX_LABELS:
                self.cursors[cursor[0]] = label
        elif name == "FindObjects":
            label = self.cursors.get(values[0])
            if label is not None:
                try:
                    found = Reader(body).list(Reader.u32)
                except WireError:
                    return
                for handle in found:
                    self._remember(handle, label)
        elif name == "FindObjectsFinal":
            self.cursors.pop(values[0], None)
        elif name == "GetAttributeValue":
            if CKA_LABEL in values[1]:
                try:
                    attributes = Reader(body).attributes()
                except WireError:
                    return
                self._remember(values[0], _label(attributes))
        elif name == "SetAttributeValue":
            label = _label(values[1])
            if label is not None:
                self.labels.pop(values[0], None)
                self._remember(values[0], label)
        elif name == "DestroyObject":
            self.labels.pop(values[0], None)

    def _remember(self, handle: int, label: Optional[str]) -> None:
        if label is not None and (handle in self.labels or len(self.labels) < MAX_LABELS):
            self.labels[handle] = label
