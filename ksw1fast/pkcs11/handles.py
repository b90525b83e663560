"""Each client's handle tables: the rows behind the u32 ids a client sees.

A client (one browser connection) has its own tables of sessions, objects and find
cursors; ids count from 1 and are never reused, so a foreign or stale id is "unknown".
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, TypeVar

from ksw1fast.pkcs11 import wire
from ksw1fast.pkcs11.scope import Pkcs11Scope
from ksw1fast.pkcs11.wire import Response


class Refusal(Exception):
    """Ends a call with a non-CkError answer (ProtocolError, AuthDenied, Internal)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response)
        self.response = response


R = TypeVar("R", bound="Row")


@dataclass
class Row:
    id: int = field(default=0, init=False)


@dataclass
class SessionRow(Row):
    pk: Any  # PyKCS11's CK_SESSION_HANDLE
    slot: int
    handle: int = field(init=False)  # pk's value, read once rather than through SWIG per call

    def __post_init__(self) -> None:
        self.handle = self.pk.value()


@dataclass
class ObjectRow(Row):
    handle: int
    sessions: list[int]  # row ids: the one it came through, then ObjectBind's
    refs: int = 1


@dataclass
class Cursor(Row):
    session: int  # row id


class Table(Generic[R]):
    """One client's rows of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.rows: dict[int, R] = {}
        self._next = 1

    def add(self, row: R) -> int:
        if self._next > 0xFFFFFFFF:
            raise Refusal(wire.internal(f"{self.kind} handles exhausted"))
        row.id = self._next
        self.rows[row.id] = row
        self._next += 1
        return row.id

    def get(self, rid: int) -> R:
        try:
            return self.rows[rid]
        except KeyError:
            raise Refusal(wire.protocol_error(f"unknown {self.kind} handle")) from None

    def pop(self, rid: int) -> R:
        row = self.get(rid)
        del self.rows[rid]
        return row


class Client:
    """One browser connection: its handles, the signal that ends its waits, and what its
    token allows (`scope`, None = no limits) with what that needs to know of objects."""

    def __init__(self, scope: Optional[Pkcs11Scope] = None) -> None:
        self.sessions: Table[SessionRow] = Table("session")
        self.objects: Table[ObjectRow] = Table("object")
        self.cursors: Table[Cursor] = Table("cursor")
        self.object_ids: dict[int, int] = {}  # module object handle -> row id
        self.closed = threading.Event()
        self.scope = scope
        # module object handle -> (CKA_CLASS, CKA_LABEL), None where it has none: looked
        # up once per handle for the scope's checks (enforce.py)
        self.identities: dict[int, tuple[Optional[int], Optional[bytes]]] = {}
