"""What the gateway asks of a PKCS#11 backend, as typed capabilities.

A backend answers calls; a *provider* hands each connection a backend of its own. The
built-in ones live in ksw1fast.pkcs11.supervisor; an embedder's object passed to
`start_gateway(pkcs11_backend=...)` needs only `handle`, and each capability below that
it also has is used: the gateway checks them with isinstance, not by name.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


class Pkcs11Backend(Protocol):
    async def handle(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        """One call (docs/pkcs11.md): (status, body), never an exception for a refusal."""


@runtime_checkable
class Provider(Protocol):
    def for_connection(self) -> Pkcs11Backend:
        """The backend of one new connection (closed with it when Closable)."""


@runtime_checkable
class Startable(Protocol):
    async def start(self) -> None:
        """Before the gateway serves (e.g. pre-start agents)."""


@runtime_checkable
class Drainable(Protocol):
    def drain(self) -> None:
        """The gateway drains: start nothing new."""


@runtime_checkable
class Closable(Protocol):
    async def close(self) -> None:
        """The gateway (or, for a connection's backend, the connection) ends."""
