"""What the gateway asks of a PKCS#11 backend, as typed capabilities.

A backend answers calls; a *provider* hands each connection a backend of its own. The
built-in ones live in ksw1fast.pkcs11.supervisor; an embedder's object passed to
`start_gateway(pkcs11_backend=...)` needs only `handle`, and each capability below that
it also has is used: the gateway checks them with isinstance, not by name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ksw1fast.pkcs11.scope import Pkcs11Scope


class Pkcs11Backend(Protocol):
    async def handle(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        """One call (docs/pkcs11.md): (status, body), never an exception for a refusal."""


@runtime_checkable
class Provider(Protocol):
    def for_connection(self) -> Pkcs11Backend:
        """The backend of one new connection (closed with it when Closable)."""


@runtime_checkable
class Scoped(Protocol):
    def limit(self, scope: "Pkcs11Scope") -> None:
        """Hold this connection's calls to its token's PKCS#11 scope: called on the
        connection's backend before its first call, when the token has a scope. A
        backend without it gets no call from a token with a scope (AuthDenied): it
        could not keep to it. Nor does a backend shared by all connections (no
        provider): its `handle` cannot tell whose scope a call is under."""


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
