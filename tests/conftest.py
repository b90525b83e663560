"""Shared fixtures: real loopback targets and a real gateway, compiled or pure-Python."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

import pytest
import uvloop
from hypothesis import HealthCheck, settings

import ksw1fast
from ksw1fast import client as kclient

from helpers import GatewayProcess, echo_handler, port_of, serve_tcp

# Hypothesis judges no test by the clock: CI machines are small and shared, and a stall
# there is not a bug here.
settings.register_profile("ksw1fast", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ksw1fast")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    """Every async test runs on uvloop, the loop the gateway is built for."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(params=["compiled", "pure-python"])
async def gateway(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """Address of a running gateway: the compiled one in-process, or the twins in a subprocess."""
    if request.param == "compiled":
        async with await ksw1fast.start_gateway(port=0) as gw:
            yield gw.address
    else:
        proc = await asyncio.to_thread(GatewayProcess, env={"KSW1FAST_NO_EXTENSIONS": "1"})
        try:
            yield proc.address
        finally:
            await asyncio.to_thread(proc.stop)


@pytest.fixture
async def gw() -> AsyncIterator[ksw1fast.Gateway]:
    """An in-process compiled gateway object (for tests that look inside)."""
    async with await ksw1fast.start_gateway(port=0) as gateway:
        yield gateway


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await serve_tcp(echo_handler)
    async with server:
        yield port_of(server)


@pytest.fixture
async def connect(gateway: str) -> AsyncIterator[Callable[..., Awaitable[kclient.KSW1Client]]]:
    """Factory of KSW1 clients to the `gateway` fixture; all are closed afterwards."""
    clients: list[kclient.KSW1Client] = []

    async def _connect(**kwargs: object) -> kclient.KSW1Client:
        c = await kclient.connect(gateway, **kwargs)  # type: ignore[arg-type]
        clients.append(c)
        return c

    yield _connect
    for c in clients:
        await c.close()


@pytest.fixture
async def spawn_gateway() -> AsyncIterator[Callable[..., Awaitable[GatewayProcess]]]:
    """Starts `ksw1fast serve` subprocesses; every one is stopped after the test, even
    when the test fails half-way (a drained one has exited already: stop() is a no-op)."""
    procs: list[GatewayProcess] = []

    async def spawn(*args: str, **kwargs: object) -> GatewayProcess:
        proc = await asyncio.to_thread(GatewayProcess, *args, **kwargs)  # type: ignore[arg-type]
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        await asyncio.to_thread(proc.stop)
