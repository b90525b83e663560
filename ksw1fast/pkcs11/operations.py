"""The operation families (encrypt, decrypt, sign, verify, digest and the Recover kinds,
as args.OPS lists them): one-shot calls and Init/Update/Final/Abort, for one module.

Init goes through PyKCS11 where it has the call and through ckapi where it does not;
the data calls go through ckapi, which sizes outputs without a length query.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, cast

import PyKCS11.LowLevel as LL
from PyKCS11 import CKR

from ksw1fast.pkcs11 import ckapi
from ksw1fast.pkcs11.adaptors import PkMechanism, bytes_body, pk_object
from ksw1fast.pkcs11.args import CHECK, SIZED, Op
from ksw1fast.pkcs11.ckapi import CkrError, NativeParameter, check
from ksw1fast.pkcs11.handles import Client, SessionRow


def ckr_of(function: Callable[..., object], *args: Any) -> int:
    """The CKR a ckapi call answers, for calls whose failure is expected."""
    try:
        function(*args)
    except CkrError as exc:
        return exc.rv
    return CKR["CKR_OK"]


class Operations:
    """The operation calls of one module; the dispatcher holds its lock around each."""

    def __init__(self, lib: "LL.CPKCS11Lib", ck: ckapi.Module, max_out: int) -> None:
        self.lib = lib
        self.ck = ck
        self.max_out = max_out

    def init(self, op: Op, s: SessionRow, mech: NativeParameter, key: int | None) -> None:
        name = op.init_name
        pk_init = getattr(self.lib, name, None)
        if pk_init is None:  # the Recover kinds: PyKCS11 lacks them
            self.ck.recover_init(name, s.handle, mech, key)  # type: ignore[arg-type]
            return
        m = PkMechanism.of(mech)
        rv = (pk_init(s.pk, m.ck) if key is None  # None: DigestInit takes no key
              else pk_init(s.pk, m.ck, pk_object(key)))
        check(rv, name)

    def finish(self, op: Op, session: int, stage: str, inputs: tuple[bytes, ...],
                tail: int | bytes | None) -> bytes:
        """The call that ends an operation (one-shot or Final) and its Ok body."""
        name = f"C_{op.kind}{stage}"
        # the op's kind says what its tail is: the signature (CHECK) or an output size
        if op.result == CHECK:
            self.ck.feed(name, session, *inputs, cast(bytes, tail))
            return b""
        return bytes_body(self.ck.output(name, session, *inputs, size=cast("int | None", tail)))

    def discard(self, op: Op, session: int, stage: str, inputs: tuple[bytes, ...]) -> None:
        """Drives an operation to its end, ignoring result and error: PKCS#11 ends it at
        any call but a length query or one answering CKR_BUFFER_TOO_SMALL, so the call
        gets max_out bytes of room (no length query: see ckapi.Module) and a
        verification an empty signature."""
        name = f"C_{op.kind}{stage}"
        if op.result == CHECK:
            ckr_of(self.ck.feed, name, session, *inputs, b"")
        else:
            ckr_of(partial(self.ck.output, size=self.max_out), name, session, *inputs)

    def active(self, op: Op, session: int) -> bool:
        """Whether an operation of this kind is active: an empty Update does nothing
        to one (or ends it with an error) and answers NOT_INITIALIZED without one.
        (Any other answer, CKR_BUFFER_TOO_SMALL for the empty output buffer included,
        means there is one.)"""
        name = f"C_{op.kind}Update"
        call = partial(self.ck.output, size=0) if op.result == SIZED else self.ck.feed
        return ckr_of(call, name, session, b"") != CKR["CKR_OPERATION_NOT_INITIALIZED"]

    def one_shot(self, op: Op, c: Client, s: SessionRow, mech: NativeParameter,
                  key: int | None, data: bytes, tail: int | bytes | None) -> bytes:
        self.init(op, s, mech, key)
        try:
            return self.finish(op, s.handle, "", (data,), tail)
        except CkrError as exc:
            if exc.rv == CKR["CKR_BUFFER_TOO_SMALL"]:  # the one failure that keeps it active
                self.discard(op, s.handle, "", (data,))
            raise

    def init_op(self, op: Op, c: Client, s: SessionRow, mech: NativeParameter,
                 key: int | None) -> bytes:
        self.init(op, s, mech, key)
        return b""

    def update(self, op: Op, c: Client, s: SessionRow, part: bytes, last_hint: bool) -> bytes:
        # last_hint is advisory: PKCS#11 has no such argument
        name = f"C_{op.kind}Update"
        if op.result == SIZED:
            return bytes_body(self.ck.output(name, s.handle, part))
        self.ck.feed(name, s.handle, part)
        return b""

    def final(self, op: Op, c: Client, s: SessionRow, tail: int | bytes | None) -> bytes:
        return self.finish(op, s.handle, "Final", (), tail)

    def abort(self, op: Op, c: Client, s: SessionRow) -> bytes:
        """PKCS#11 v2.40 has no abort: end the operation by finishing it (Final,
        then the one-shot call on empty data) until none of this kind is active."""
        for stage, inputs in (("Final", ()), ("", (b"",))):
            if not self.active(op, s.handle):
                return b""
            self.discard(op, s.handle, stage, inputs)
        if self.active(op, s.handle):
            raise CkrError(CKR["CKR_OPERATION_ACTIVE"], f"{op.kind}Abort")
        return b""
