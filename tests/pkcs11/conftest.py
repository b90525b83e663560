"""PKCS#11 fixtures: a throwaway SoftHSM2 token store and clients of the RPC.

Tests talk to PKCS#11 only through a client's `async call(fn_id, args)
-> (status, body)` and build args / read bodies with ksw1fast.pkcs11.wire, so
the same tests can run against any backend that answers the RPC:

- "dispatcher": ksw1fast.pkcs11.Dispatcher in this process;
- "gateway": a real `ksw1fast serve --pkcs11-lib ...` process, called over a WebSocket
  with the Python client: every client gets its own agent process.

A backend says whether each client runs in its own process (`isolated`).
PKCS#11 login state belongs to a process, so in-process clients share it:
the few assertions that need separate processes run only when
`p11_client.isolated` is true.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import AsyncIterator, Iterator, Protocol

import pytest

from ksw1fast import client as kclient
from ksw1fast.pkcs11 import Dispatcher

from helpers import GatewayProcess, SoftHSM, make_softhsm

BACKENDS = ["dispatcher", "gateway"]

TOKEN_LABEL = "ksw1fast-test"
USER_PIN = SoftHSM.user_pin
SO_PIN = SoftHSM.so_pin


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSM]:
    """The test token, seen by every process of the run (SOFTHSM2_CONF)."""
    store = make_softhsm(tmp_path_factory.mktemp("softhsm"), TOKEN_LABEL)
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ.update(store.env)
    try:
        yield store
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


class P11Client(Protocol):
    async def call(self, fn_id: int, args: bytes) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


class P11Backend(Protocol):
    isolated: bool

    async def connect(self, **options: object) -> P11Client:
        """A new client. Options: pin (gateway-held PIN), allow_admin, shared, allow,
        deny, max_out: as the Dispatcher's constructor arguments."""
        ...

    def close(self) -> None: ...


# --- the in-process backend ---------------------------------------------------------------

class _DispatcherClient:
    """One client of an in-process Dispatcher, called the way an agent calls it: blocking
    calls on a side thread, the rest inline."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._client = dispatcher.open_client()

    async def call(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        if self._dispatcher.is_blocking(fn_id, args):
            return await asyncio.to_thread(self._dispatcher.call, self._client, fn_id, args)
        return self._dispatcher.call(self._client, fn_id, args)

    async def close(self) -> None:
        self._dispatcher.close_client(self._client)


class DispatcherBackend:
    """Dispatchers in this process, one per set of options, kept for the whole run:
    unloading one finalises the module for all of them."""

    isolated = False

    def __init__(self, softhsm: SoftHSM) -> None:
        self._module = softhsm.module
        self._dispatchers: dict[tuple, Dispatcher] = {}

    async def connect(self, **options: object) -> P11Client:
        key = tuple(sorted((name, repr(value)) for name, value in options.items()))
        if key not in self._dispatchers:
            self._dispatchers[key] = Dispatcher(self._module, **options)  # type: ignore[arg-type]
        return _DispatcherClient(self._dispatchers[key])

    def close(self) -> None:
        for dispatcher in self._dispatchers.values():
            dispatcher.close()


# --- the gateway backend ------------------------------------------------------------------

class _GatewayClient:
    """One WebSocket connection to a gateway: one agent process behind it."""

    def __init__(self, client: kclient.KSW1Client) -> None:
        self.ws_client = client

    async def call(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        response = await self.ws_client.pkcs11(fn_id, args)
        return response.status, response.body

    async def close(self) -> None:
        await self.ws_client.close()


class GatewayBackend:
    """Gateway processes, one per set of options, kept for the whole run."""

    isolated = True

    def __init__(self, softhsm: SoftHSM) -> None:
        self._module = softhsm.module
        self._gateways: dict[tuple, GatewayProcess] = {}

    def address(self, **options: object) -> str:
        key = tuple(sorted((name, repr(value)) for name, value in options.items()))
        if key not in self._gateways:
            self._gateways[key] = GatewayProcess(*self._flags(**options), env={
                "KSW1FAST_TEST_PIN": (options.get("pin") or b"").decode()})  # type: ignore[union-attr]
        return self._gateways[key].address

    def _flags(self, pin: bytes | None = None, allow_admin: bool = False, shared: bool = False,
               allow: tuple[str, ...] | None = None, deny: tuple[str, ...] = (),
               max_out: int | None = None) -> list[str]:
        flags = ["--pkcs11-lib", self._module]
        if pin:
            flags += ["--pkcs11-pin-env", "KSW1FAST_TEST_PIN"]
        if allow_admin:
            flags.append("--pkcs11-allow-admin")
        if shared:
            flags += ["--pkcs11-isolation", "worker"]
        for name in allow or ():
            flags += ["--pkcs11-allow", name]
        for name in deny:
            flags += ["--pkcs11-deny", name]
        if max_out is not None:
            flags += ["--pkcs11-max-out", str(max_out)]
        return flags

    async def connect(self, **options: object) -> P11Client:
        address = await asyncio.to_thread(self.address, **options)
        return _GatewayClient(await kclient.connect(address))

    def close(self) -> None:
        for gateway in self._gateways.values():
            gateway.stop()


def _open_backend(name: str, softhsm: SoftHSM) -> P11Backend:
    if name == "dispatcher":
        return DispatcherBackend(softhsm)
    if name == "gateway":
        return GatewayBackend(softhsm)
    raise ValueError(f"unknown PKCS#11 test backend {name}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything here needs Debian's softhsm2 (see pyproject: the wheel builds skip it)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.softhsm)


# --- fixtures the tests use ---------------------------------------------------------------

@pytest.fixture(scope="session", params=BACKENDS)
def p11_backend(request: pytest.FixtureRequest, softhsm: SoftHSM) -> Iterator[P11Backend]:
    backend = _open_backend(request.param, softhsm)
    yield backend
    backend.close()


class ClientFactory:
    """`await p11_client(**options)` makes an independent client; all close after the test."""

    def __init__(self, backend: P11Backend) -> None:
        self._backend = backend
        self.isolated = backend.isolated  # each client in its own process?
        self.clients: list[P11Client] = []

    async def __call__(self, **options: object) -> P11Client:
        client = await self._backend.connect(**options)
        self.clients.append(client)
        return client


@pytest.fixture
async def p11_client(p11_backend: P11Backend) -> AsyncIterator[ClientFactory]:
    factory = ClientFactory(p11_backend)
    yield factory
    for client in factory.clients:
        await client.close()


@pytest.fixture
async def p11(p11_client: ClientFactory) -> P11Client:
    """One client with default options."""
    return await p11_client()
