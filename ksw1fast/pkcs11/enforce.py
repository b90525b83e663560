"""Holding an agent client's calls to its token's PKCS#11 scope (ksw1fast.pkcs11.scope).

The dispatcher checks the function by name before it decodes anything, and hands every
decoded call of a client with a scope to `ScopeCheck.check` before the module runs it:
each arg the scope has a say on is looked at in the order of the args (args.ARGS), and
the first refusal answers the call with AuthDenied.

- a slot (the first arg of the slot calls): `slots`, and `labels`, the label of the
  token in it, asked of the module at each call (a token may be swapped);
- a mechanism: `mechanisms`;
- a key (operations, DigestKey, DeriveKey's base, WrapKey's, UnwrapKey's, CopyObject's
  source, SetOperationState's), and the object of DestroyObject and SetAttributeValue:
  `keys`, by the object's CKA_LABEL, looked up once per handle (Client.identities);
- a template that makes or changes an object: no CKA_LABEL among `keys`;
- GetAttributeValue's types: without `export`, none that holds key material, unless the
  object's class is public.

InitToken's new label must be one of `labels` too. Sessions carry no check of their
own: OpenSession checked their slot.
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Optional, Sequence

import PyKCS11.LowLevel as LL
from PyKCS11 import CKR

from ksw1fast.pkcs11 import ckapi, wire
from ksw1fast.pkcs11.args import ARGS
from ksw1fast.pkcs11.handles import Client, ObjectRow, Refusal, SessionRow
from ksw1fast.pkcs11.scope import CKA_CLASS, CKA_LABEL, Pkcs11Scope, is_secret
from ksw1fast.pkcs11.wire import FUNCTIONS

# the calls whose first arg is a slot id
SLOT_CALLS = frozenset({"GetSlotInfo", "GetTokenInfo", "InitToken", "OpenSession",
                        "GetMechanismList", "CloseAllSessions", "GetMechanismInfo"})
# the calls whose templates make or change an object (FindObjectsInit's only match)
MAKERS = frozenset({"CreateObject", "CopyObject", "GenerateKey", "GenerateKeyPair",
                    "DeriveKey", "UnwrapKey", "SetAttributeValue"})
# the calls whose object counts as a key: they destroy or change it
CHANGERS = frozenset({"DestroyObject", "SetAttributeValue"})
_ULONG = struct.Struct("@L")
_CKR_OK = CKR["CKR_OK"]

Step = tuple[int, str]  # (the arg's index, what to check)


def plan(fn_id: int) -> tuple[Step, ...]:
    """The checks of a fn id's decoded args."""
    name = FUNCTIONS[fn_id]
    steps: list[Step] = []
    for index, word in enumerate(ARGS[fn_id].split()):
        if index == 0 and name in SLOT_CALLS:
            steps.append((index, "slot"))
        elif word == "mechanism":
            steps.append((index, "mechanism"))
        elif word in ("key", "opt_key"):
            steps.append((index, "key"))
        elif word == "object" and name in CHANGERS:
            steps.append((index, "object"))
        elif word == "template" and name in MAKERS:
            steps.append((index, "template"))
        elif word == "types":
            steps.append((index, "types"))
    if name == "InitToken":
        steps.append((2, "new_label"))
    return tuple(steps)


PLANS: dict[int, tuple[Step, ...]] = {fn_id: plan(fn_id) for fn_id in ARGS}


class ScopeCheck:
    """The scope's checks against one module; called under the dispatcher's lock."""

    def __init__(self, lib: "LL.CPKCS11Lib", ck: ckapi.Module,
                 object_session: Callable[[Client, ObjectRow], SessionRow]) -> None:
        self._lib = lib
        self._ck = ck
        self._object_session = object_session

    def check(self, c: Client, scope: Pkcs11Scope, fn_id: int, values: Sequence[Any]) -> None:
        """Refusal (AuthDenied) when the scope does not allow this decoded call."""
        for index, what in PLANS[fn_id]:
            value = values[index]
            if what == "slot":
                why = scope.slot_refusal(value) or self._token_refusal(scope, value)
            elif what == "mechanism":
                why = scope.mechanism_refusal(value.type)
            elif what == "key":
                why = self._key_refusal(c, scope, values[0], value)
            elif what == "object":
                why = self._key_refusal(c, scope, self._object_session(c, value),
                                        value.handle)
            elif what == "template":
                why = scope.template_refusal(value)
            elif what == "types":
                why = self._attributes_refusal(c, scope, values[0], value)
            else:  # new_label
                why = scope.token_refusal(wire.token_string(value))
            if why is not None:
                raise Refusal(wire.auth_denied(why))

    # --- what the module is asked ----------------------------------------------------

    def token_label(self, slot: int) -> Optional[str]:
        """The label of the token in `slot`, padding stripped; None: no token there."""
        info = LL.CK_TOKEN_INFO()
        if self._lib.C_GetTokenInfo(slot, info) != _CKR_OK:
            return None
        return wire.token_string(info.GetLabel())

    def identity(self, c: Client, session: SessionRow,
                 handle: int) -> tuple[Optional[int], Optional[bytes]]:
        """An object's (CKA_CLASS, CKA_LABEL), each None when it has none; looked up once
        per handle (a CkrError, such as an invalid handle, answers the call)."""
        found = c.identities.get(handle)
        if found is None:
            values = dict(self._ck.get_attribute_value(session.handle, handle,
                                                       (CKA_CLASS, CKA_LABEL)))
            raw = values.get(CKA_CLASS)
            kind = _ULONG.unpack(raw)[0] if raw is not None and len(raw) == _ULONG.size else None
            found = c.identities[handle] = (kind, values.get(CKA_LABEL))
        return found

    # --- the checks that need it -------------------------------------------------------

    def _token_refusal(self, scope: Pkcs11Scope, slot: int) -> Optional[str]:
        if scope.labels is None:
            return None
        return scope.token_refusal(self.token_label(slot))

    def _key_refusal(self, c: Client, scope: Pkcs11Scope, session: SessionRow,
                     handle: int) -> Optional[str]:
        if scope.keys is None or handle == 0:  # 0: SetOperationState without that key
            return None
        return scope.key_refusal(self.identity(c, session, handle)[1])

    def _attributes_refusal(self, c: Client, scope: Pkcs11Scope, obj: ObjectRow,
                            types: list[int]) -> Optional[str]:
        if scope.export or not any(is_secret(cka) for cka in types):
            return None
        kind = self.identity(c, self._object_session(c, obj), obj.handle)[0]
        return scope.attributes_refusal(types, kind)

    # --- answers narrowed to the scope -------------------------------------------------

    def slots(self, scope: Pkcs11Scope, slots: list[int]) -> list[int]:
        """The slots of GetSlotList the scope lets the client use."""
        return [slot for slot in slots if scope.slot_refusal(slot) is None
                and self._token_refusal(scope, slot) is None]
