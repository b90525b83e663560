"""A token's PKCS#11 scope (docs/pkcs11-setup.md, "Per-token scope"): pure, no PyKCS11.

A token's `pkcs11` is `true` (every call the gateway's own policy allows), `false` or
absent (none), or an object that narrows `true`; each key is optional, absent = no limit:

    {"slots": [0], "labels": ["app-token"],
     "functions": ["GetSlotList", "GetTokenInfo", "OpenSession", "Login",
                   "FindObjectsInit", "FindObjects", "FindObjectsFinal", "Sign"],
     "mechanisms": ["CKM_ECDSA"], "keys": ["signing-key"], "export": false}

- `slots`: slot ids the client may name (GetSlotList lists only these);
- `labels`: token labels: a slot is usable only while it holds a token so labelled;
- `functions`: function names as `--pkcs11-allow` takes them (docs/pkcs11.md §4);
- `mechanisms`: CKM_ names (ksw1fast.pkcs11.mechanisms) or numbers, vendor ones as
  numbers or "0x..." strings: the only mechanisms a call may use (GetMechanismList
  lists only these);
- `keys`: CKA_LABELs: the only objects a call may pass as a key, destroy or change, and
  labels no template may give an object (creating or relabelling one);
- `export` (default false in an object): whether key material may leave the token:
  false refuses WrapKey and the reading of value-bearing attributes (SECRET_ATTRIBUTES)
  of every object but certificates, public keys and other public classes.

Anything else in the object, an unknown function or mechanism name, or a value of the
wrong type is a ValueError saying which: a token carrying it is refused, never taken
for a wider scope. Refusals answer AuthDenied with a message starting REFUSAL_PREFIX
and the rule (`RULES`), which the gateway counts (ksw1fast_pkcs11_scope_refusals).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping

from ksw1fast.pkcs11.mechanisms import MECHANISMS, mechanism_name
from ksw1fast.pkcs11.wire import check_function_names

SCOPE_KEYS = ("slots", "labels", "functions", "mechanisms", "keys", "export")
REFUSAL_PREFIX = "token scope: "
# what a refusal names: each is a label value of ksw1fast_pkcs11_scope_refusals
RULES = ("function", "slot", "token", "mechanism", "key", "export", "backend")
MAX_TOKEN_LABEL = 32  # bytes: CK_TOKEN_INFO.label
CK_ULONG_MAX = (1 << 64) - 1

CKA_CLASS, CKA_LABEL, CKA_VALUE = 0x0000, 0x0003, 0x0011
CKA_VENDOR_DEFINED = 0x80000000
# attributes that hold key material (a secret key's or EC/DSA/DH private key's CKA_VALUE,
# the RSA private parts); vendor-defined attributes count too, since anything may hide there
SECRET_ATTRIBUTES = frozenset({
    CKA_VALUE,
    0x0123,  # CKA_PRIVATE_EXPONENT
    0x0124,  # CKA_PRIME_1
    0x0125,  # CKA_PRIME_2
    0x0126,  # CKA_EXPONENT_1
    0x0127,  # CKA_EXPONENT_2
    0x0128,  # CKA_COEFFICIENT
})
# classes whose values are public by nature: certificates, public keys, hardware
# features, domain parameters, mechanisms; data objects, private, secret and OTP keys
# and vendor classes are not
PUBLIC_CLASSES = frozenset({0x1, 0x2, 0x5, 0x6, 0x7})
# operation state saved and restored whole, mechanism and key inside
_OPAQUE_STATE = frozenset({"GetOperationState", "SetOperationState"})


def refusal(rule: str, detail: str) -> str:
    """The AuthDenied message of a scope refusal."""
    return f"{REFUSAL_PREFIX}{rule} {detail}"


def rule_of(message: str) -> str | None:
    """The rule a scope refusal's message names; None for any other message."""
    if not message.startswith(REFUSAL_PREFIX):
        return None
    rule = message[len(REFUSAL_PREFIX):].split(" ", 1)[0]
    return rule if rule in RULES else None


def is_secret(cka: int) -> bool:
    return cka in SECRET_ATTRIBUTES or cka >= CKA_VENDOR_DEFINED


@dataclass(frozen=True)
class Pkcs11Scope:
    """What a token allows of PKCS#11; None in a field = no limit there."""

    slots: frozenset[int] | None = None
    labels: frozenset[str] | None = None
    functions: frozenset[str] | None = None
    mechanisms: frozenset[int] | None = None
    keys: frozenset[str] | None = None
    export: bool = False

    @classmethod
    def parse(cls, value: object) -> "Pkcs11Scope":
        """The scope in a token's `pkcs11` object; ValueError naming what is wrong."""
        if not isinstance(value, Mapping):
            raise ValueError("the PKCS#11 scope must be an object")
        unknown = sorted(set(value) - set(SCOPE_KEYS))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in the PKCS#11 scope "
                             f"(known: {', '.join(SCOPE_KEYS)})")
        export = value.get("export", False)
        if not isinstance(export, bool):
            raise ValueError("PKCS#11 scope: export must be true or false")
        functions = _optional(value, "functions", _function_names)
        if functions is not None and "WrapKey" in functions and not export:
            raise ValueError('PKCS#11 scope: functions lists WrapKey, which "export": false '
                             'refuses; add "export": true or drop WrapKey')
        return cls(slots=_optional(value, "slots", _slots),
                   labels=_optional(value, "labels", _token_labels),
                   functions=functions,
                   mechanisms=_optional(value, "mechanisms", _mechanisms),
                   keys=_optional(value, "keys", _key_labels),
                   export=export)

    @classmethod
    def from_wire(cls, body: bytes) -> "Pkcs11Scope":
        """The scope as `to_wire` sent it to an agent; ValueError if it is not one."""
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            raise ValueError("the PKCS#11 scope is not JSON") from None
        return cls.parse(value)

    def to_json(self) -> dict[str, Any]:
        """The scope as a token carries it (parse's input), its lists sorted."""
        out: dict[str, Any] = {}
        if self.slots is not None:
            out["slots"] = sorted(self.slots)
        if self.labels is not None:
            out["labels"] = sorted(self.labels)
        if self.functions is not None:
            out["functions"] = sorted(self.functions)
        if self.mechanisms is not None:
            out["mechanisms"] = [mechanism_name(m) if m in _KNOWN_VALUES else m
                                 for m in sorted(self.mechanisms)]
        if self.keys is not None:
            out["keys"] = sorted(self.keys)
        if self.export:
            out["export"] = True
        return out

    def to_wire(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode("utf-8")

    @cached_property
    def key_labels(self) -> frozenset[bytes] | None:
        """`keys` as the CKA_LABEL bytes a module returns."""
        return None if self.keys is None else frozenset(k.encode("utf-8") for k in self.keys)

    # --- decisions: None when allowed, else the refusal's message -----------------------

    def function_refusal(self, name: str) -> str | None:
        if name == "WrapKey" and not self.export:
            return refusal("export", "by WrapKey not allowed")
        if self.functions is not None and name not in self.functions:
            return refusal("function", f"{name} not allowed")
        if (name in _OPAQUE_STATE and self.functions is None
                and (self.keys is not None or self.mechanisms is not None)):
            # the saved state of an operation carries its mechanism and key where no
            # check can see them: only a scope that names the function allows it
            return refusal("function", f"{name} not allowed with keys or mechanisms limited "
                                       "(list it in functions to allow it)")
        return None

    def slot_refusal(self, slot: int) -> str | None:
        if self.slots is not None and slot not in self.slots:
            return refusal("slot", f"{slot} not allowed")
        return None

    def token_refusal(self, label: str | None) -> str | None:
        """`label`: the token's in the slot, blank padding stripped; None: no token."""
        if self.labels is not None and label not in self.labels:
            return refusal("token", "not present" if label is None
                           else f"{label!r} not allowed")
        return None

    def mechanism_refusal(self, mechanism: int) -> str | None:
        if self.mechanisms is not None and mechanism not in self.mechanisms:
            return refusal("mechanism", f"{mechanism_name(mechanism)} not allowed")
        return None

    def key_refusal(self, label: bytes | None) -> str | None:
        """`label`: the object's CKA_LABEL, None when it has none."""
        allowed = self.key_labels
        if allowed is not None and label not in allowed:
            shown = "an object without a label" if label is None else _show(label)
            return refusal("key", f"{shown} not allowed")
        return None

    def template_refusal(self, template: Iterable[tuple[int, bytes]]) -> str | None:
        """A template that would give an object one of the `keys` labels."""
        allowed = self.key_labels
        if allowed is None:
            return None
        for cka, value in template:
            if cka == CKA_LABEL and value in allowed:
                return refusal("key", f"{_show(value)} may not be given to an object")
        return None

    def attributes_refusal(self, types: Iterable[int], object_class: int | None) -> str | None:
        """Reading `types` of an object of `object_class` (None: unknown)."""
        if self.export or object_class in PUBLIC_CLASSES:
            return None
        for cka in types:
            if is_secret(cka):
                return refusal("export", f"of attribute 0x{cka:X} not allowed")
        return None


# the scope of an agent client whose scope did not arrive intact: nothing
NOTHING = Pkcs11Scope(functions=frozenset())
_KNOWN_VALUES = frozenset(MECHANISMS.values())


def parse_claim(value: object) -> tuple[bool, Pkcs11Scope | None]:
    """A token's `pkcs11` (absent: pass False): (allowed at all, the scope or None for
    no limits). ValueError when it is neither a boolean nor a valid scope object."""
    if isinstance(value, bool):
        return value, None
    return True, Pkcs11Scope.parse(value)


def _show(label: bytes) -> str:
    return repr(label.decode("utf-8", "replace"))


def _optional(value: Mapping[str, object], key: str, convert: Any) -> Any:
    if key not in value:
        return None
    items = value[key]
    if not isinstance(items, list):
        raise ValueError(f"PKCS#11 scope: {key} must be a list")
    return frozenset(convert(items))


def _function_names(items: list[object]) -> frozenset[str]:
    if not all(isinstance(name, str) for name in items):
        raise ValueError("PKCS#11 scope: functions must be names")
    try:
        return check_function_names(items)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"PKCS#11 scope: {exc}") from None


def _number(item: object) -> int | None:
    if isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= CK_ULONG_MAX:
        return item
    return None


def _slots(items: list[object]) -> list[int]:
    slots = [_number(item) for item in items]
    if None in slots:
        raise ValueError("PKCS#11 scope: slots must be slot ids (numbers from 0)")
    return slots  # type: ignore[return-value]


def _strings(key: str, items: list[object]) -> list[str]:
    if not all(isinstance(item, str) and item for item in items):
        raise ValueError(f"PKCS#11 scope: {key} must be non-empty strings")
    return items  # type: ignore[return-value]


def _token_labels(items: list[object]) -> list[str]:
    labels = _strings("labels", items)
    for label in labels:
        if len(label.encode("utf-8")) > MAX_TOKEN_LABEL or label != label.rstrip(" "):
            raise ValueError(f"PKCS#11 scope: token label {label!r} can never match: "
                             f"a token label has at most {MAX_TOKEN_LABEL} bytes and no "
                             "trailing blanks")
    return labels


def _key_labels(items: list[object]) -> list[str]:
    return _strings("keys", items)


def _mechanisms(items: list[object]) -> list[int]:
    values = []
    for item in items:
        value = _number(item)
        if value is None and isinstance(item, str):
            value = MECHANISMS.get(item)
            if value is None and item[:2].lower() == "0x":
                try:
                    value = _number(int(item, 16))
                except ValueError:
                    value = None
        if value is None:
            raise ValueError(f"PKCS#11 scope: unknown mechanism {item!r} (a CKM_ name, "
                             "a number or a 0x... hex string)")
        values.append(value)
    return values
