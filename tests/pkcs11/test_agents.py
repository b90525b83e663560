"""PKCS#11 agents seen from the gateway: out of the relay's loop, one per connection,
ended with it, a crash that hurts nobody else, and bounded whatever clients ask for."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import psutil
import PyKCS11 as ck
import pytest
from prometheus_client import REGISTRY

import ksw1fast
from ksw1fast import client as kclient
from ksw1fast.protocol.constants import Pkcs11Status
from ksw1fast.protocol.messages import Pkcs11Response
from ksw1fast.pkcs11.agent import MAX_WAITS
from ksw1fast.pkcs11.settings import Pkcs11Settings
from ksw1fast.pkcs11.supervisor import RESTARTED, AgentProcess
from ksw1fast.pkcs11.wire import (FUNCTION_IDS as F, Attribute, Mechanism, Reader, Tag, Writer,
                                  error_of)

from helpers import PackageCopy

from .conftest import USER_PIN, SoftHSM

pytestmark = pytest.mark.timeout(120)

CKM_RSA_PKCS_KEY_PAIR_GEN = 0x0
CKA_TOKEN, CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT = 0x1, 0x121, 0x122
BLOCKING_WAIT = Writer().u32(0).getvalue()  # WaitForSlotEvent flags: may block


def _agents() -> set[int]:
    """PKCS#11 agent processes started by this (in-process) gateway and still running."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "ksw1fast.pkcs11.agent" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.Error:  # exited meanwhile (or a zombie not yet reaped)
            pass
    return pids


async def _session(client: kclient.KSW1Client) -> int:
    """GetSlotList(true), OpenSession(first slot, rw), Login(user): the session handle."""
    slots = Reader((await client.pkcs11(F["GetSlotList"], Writer().bool(True).getvalue())).body)
    slot = slots.list(Reader.u64)[0]
    opened = await client.pkcs11(F["OpenSession"], Writer().u32(slot).u32(0x3).getvalue())
    assert opened.status == Pkcs11Status.OK
    session = Reader(opened.body).u32()
    login = await client.pkcs11(F["Login"], Writer().u32(session).u32(1).bytes(USER_PIN).getvalue())
    assert login.status == Pkcs11Status.OK
    return session


def _agent_of(gateway: ksw1fast.Gateway, client: kclient.KSW1Client) -> int:
    """The pid of the agent serving `client`'s connection (looked up inside the gateway)."""
    host, port = client.ws.underlying_transport.get_extra_info("sockname")[:2]
    (conn,) = [c for c in gateway.connections if str(c.peer) == f"{host}:{port}"]
    return conn.pkcs11._agent.pid


@pytest.fixture
async def gateway(softhsm: SoftHSM):
    async with await ksw1fast.start_gateway(
            port=0, pkcs11=Pkcs11Settings(lib=softhsm.module, pool_size=1)) as gw:
        yield gw


async def test_an_agent_per_connection_ended_with_it(gateway) -> None:
    before = _agents()  # the pre-started pool
    a = await kclient.connect(gateway.address)
    await _session(a)
    b = await kclient.connect(gateway.address)
    await _session(b)
    running = _agents()
    assert len(running - before) >= 1 and len(running) >= 2
    await a.close()
    await b.close()
    for _ in range(100):  # their agents exit, taking their sessions with them
        if len(_agents()) <= len(running) - 2:
            break
        await asyncio.sleep(0.05)
    assert len(_agents()) <= len(running) - 2


async def test_an_agent_outlives_a_sighup(gateway) -> None:
    """SIGHUP is the gateway's reload, and what a closing terminal sends its process
    group: an agent ignores it, with its sessions and login."""
    client = await kclient.connect(gateway.address)
    session = await _session(client)
    os.kill(_agent_of(gateway, client), signal.SIGHUP)
    await asyncio.sleep(0.2)
    random = Writer().u32(session).u32(16)
    assert (await client.pkcs11(F["GenerateRandom"], random.getvalue())).status == \
        Pkcs11Status.OK
    await client.close()


async def test_a_crashed_agent_answers_internal_and_spares_others(gateway) -> None:
    a = await kclient.connect(gateway.address)
    b = await kclient.connect(gateway.address)
    session_b = await _session(b)
    await _session(a)
    agent_a = _agent_of(gateway, a)
    random = Writer().u32(1).u32(16)  # GenerateRandom on a's session 1
    pending = asyncio.ensure_future(a.pkcs11(F["GenerateRandom"], random.getvalue()))
    os.kill(agent_a, signal.SIGKILL)  # what a segfaulting module does to its process
    first = await asyncio.wait_for(pending, 10)
    later = await a.pkcs11(F["GenerateRandom"], random.getvalue())
    assert later.status == Pkcs11Status.INTERNAL
    assert first.status in (Pkcs11Status.OK, Pkcs11Status.INTERNAL)  # it may have won the race
    ok = await b.pkcs11(F["GenerateRandom"], Writer().u32(session_b).u32(16).getvalue())
    assert ok.status == Pkcs11Status.OK and len(Reader(ok.body).bytes()) == 16
    assert await b.ping(b"alive") == b"alive"
    await a.close()
    await b.close()


async def test_a_slow_call_does_not_freeze_relaying(gateway, echo_port) -> None:
    """While A generates an RSA-4096 key pair, B completes 100 TCP echo round trips."""
    a = await kclient.connect(gateway.address)
    session = await _session(a)
    template = (Writer().u32(session).mechanism(Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN))
                .attributes([Attribute(CKA_TOKEN, Tag.BOOLEAN, False),
                             Attribute(CKA_MODULUS_BITS, Tag.UINT64, 4096),
                             Attribute(CKA_PUBLIC_EXPONENT, Tag.BYTE_STRING, b"\x01\x00\x01")])
                .attributes([Attribute(CKA_TOKEN, Tag.BOOLEAN, False)]))
    keygen = asyncio.ensure_future(a.pkcs11(F["GenerateKeyPair"], template.getvalue()))
    b = await kclient.connect(gateway.address)
    stream = await b.open_connection("127.0.0.1", echo_port)
    for i in range(100):
        stream.write(b"%03d" % i)
        assert await asyncio.wait_for(stream.readexactly(3), 10) == b"%03d" % i
    assert not keygen.done(), "the key pair was ready before 100 round trips: no proof"
    response = await asyncio.wait_for(keygen, 90)
    assert response.status == Pkcs11Status.OK
    await a.close()
    await b.close()


async def test_an_agent_started_in_an_unbuilt_checkout_imports_the_gateways_package(
        softhsm: SoftHSM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = PackageCopy(tmp_path, built=False)
    monkeypatch.chdir(tmp_path)
    agent = await AgentProcess.start(Pkcs11Settings(lib=softhsm.module))
    try:
        client = await agent.open_client()
        status, body = await agent.call(client, F["GetSlotList"], Writer().bool(True).getvalue())
    finally:
        await agent.stop()
    assert status == Pkcs11Status.OK and Reader(body).list(Reader.u64)
    assert checkout.imported_by == set()


async def _ended(agent: AgentProcess) -> None:
    for _ in range(100):
        if agent.dead is not None:
            return
        await asyncio.sleep(0.05)
    pytest.fail("the agent did not end")


@pytest.mark.parametrize("end, level", [
    ("stop", logging.DEBUG),               # its connection closed: stdin closed, status 0
    (signal.SIGTERM, logging.DEBUG),       # a service manager stopping everything on drain
    (signal.SIGKILL, logging.WARNING),     # a crash, as far as the gateway can tell
])
async def test_an_agents_end_is_a_warning_only_when_nobody_asked_for_it(
        softhsm: SoftHSM, caplog: pytest.LogCaptureFixture, end: object, level: int) -> None:
    caplog.set_level(logging.DEBUG, logger="ksw1fast.pkcs11")
    agent = await AgentProcess.start(Pkcs11Settings(lib=softhsm.module))
    if end == "stop":
        await agent.stop()
    else:
        os.kill(agent.pid, end)
        await _ended(agent)
        await agent.stop()
    (record,) = [r for r in caplog.records if r.name == "ksw1fast.pkcs11"]
    assert record.levelno == level
    assert record.getMessage().startswith(f"PKCS#11 agent {agent.pid}: PKCS#11 agent exited")


async def _until_answered(calls: list[asyncio.Future], count: int) -> None:
    """Until `count` of the calls have their answer (10 s at most)."""
    for _ in range(200):
        if sum(call.done() for call in calls) >= count:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{sum(call.done() for call in calls)} of {len(calls)} calls answered, "
                f"not {count}")


def _refused(call: asyncio.Future, why: str) -> bool:
    ckr, message = error_of(*call.result())
    return ckr == ck.CKR_FUNCTION_FAILED and why in message


async def test_one_blocking_call_per_connection_the_rest_are_refused_at_once(
        softhsm: SoftHSM) -> None:
    settings = Pkcs11Settings(lib=softhsm.module, pool_size=0, max_calls=256)
    async with await ksw1fast.start_gateway(port=0, pkcs11=settings) as gw:
        client = await kclient.connect(gw.address)
        assert (await client.pkcs11(F["GetInfo"])).status == Pkcs11Status.OK
        agent = psutil.Process(_agent_of(gw, client))
        threads = agent.num_threads()
        calls = [asyncio.ensure_future(client.pkcs11(F["WaitForSlotEvent"], BLOCKING_WAIT))
                 for _ in range(200)]
        await _until_answered(calls, 199)
        assert agent.num_threads() <= threads + 1
        assert all(_refused(call, "already has a blocking WaitForSlotEvent")
                   for call in calls if call.done())
        assert (await client.pkcs11(F["GetInfo"])).status == Pkcs11Status.OK  # not stuck
        await client.close()
        for call in calls:
            call.cancel()


async def test_an_agent_runs_a_bounded_number_of_blocking_calls_in_all(
        softhsm: SoftHSM) -> None:
    """Many clients of one agent (worker isolation): MAX_WAITS wait, the rest are refused
    at once, and a wait that ends frees its place."""
    agent = await AgentProcess.start(Pkcs11Settings(lib=softhsm.module))
    try:
        clients = [await agent.open_client() for _ in range(MAX_WAITS + 8)]
        threads = psutil.Process(agent.pid).num_threads()
        calls = [agent.call(c, F["WaitForSlotEvent"], BLOCKING_WAIT) for c in clients]
        await _until_answered(calls, 8)
        assert psutil.Process(agent.pid).num_threads() <= threads + MAX_WAITS
        assert [call.done() for call in calls] == [False] * MAX_WAITS + [True] * 8
        assert all(_refused(call, "calls already running in this PKCS#11 agent")
                   for call in calls[MAX_WAITS:])
        agent.close_client(clients[0])
        ckr, _ = error_of(*await asyncio.wait_for(calls[0], 5))
        assert ckr == ck.CKR_FUNCTION_CANCELED
        retry = agent.call(clients[-1], F["WaitForSlotEvent"], BLOCKING_WAIT)
        await asyncio.sleep(0.5)
        assert not retry.done(), "a place freed by an ended wait was not given to the next"
    finally:
        await agent.stop()


def _agent_limit_refusals() -> float:
    return REGISTRY.get_sample_value("ksw1fast_limit_refusals_total",
                                     {"limit": "pkcs11_agents"}) or 0.0


def _message(response: Pkcs11Response) -> str:
    return error_of(response.status, response.body)[1]


async def _until_ok(client: kclient.KSW1Client, fn_id: int, args: bytes = b"",
                    ) -> list[Pkcs11Response]:
    """Call until the answer is Ok (10 s at most): the answers, the last one Ok."""
    answers = []
    for _ in range(100):
        answers.append(await client.pkcs11(fn_id, args))
        if answers[-1].status == Pkcs11Status.OK:
            return answers
        await asyncio.sleep(0.1)
    pytest.fail(f"no Ok within 10 s; last answer: {_message(answers[-1])}")


async def test_agents_per_worker_are_capped_and_a_refused_connection_gets_one_later(
        softhsm: SoftHSM) -> None:
    settings = Pkcs11Settings(lib=softhsm.module, pool_size=1, max_agents=2)
    refused = _agent_limit_refusals()
    async with await ksw1fast.start_gateway(port=0, pkcs11=settings) as gw:
        clients = [await kclient.connect(gw.address) for _ in range(4)]
        answers = [await client.pkcs11(F["GetInfo"]) for client in clients]
        assert [a.status for a in answers[:2]] == [Pkcs11Status.OK] * 2
        for answer in answers[2:]:
            assert answer.status == Pkcs11Status.INTERNAL
            assert _message(answer) == ("PKCS#11 agent limit reached (2 per worker); "
                                        "try again later")
        assert _agent_limit_refusals() == refused + 2
        assert len(_agents()) == 2  # the pool counts: none was started past the cap
        await clients[0].close()
        await _until_ok(clients[2], F["GetInfo"])  # the freed place, at its next call
        assert len(_agents()) <= 2
        assert (await clients[1].pkcs11(F["GetInfo"])).status == Pkcs11Status.OK
        for client in clients[1:]:
            await client.close()


@pytest.fixture
async def shared_gateway(softhsm: SoftHSM, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KSW1FAST_TEST_PIN", USER_PIN.decode())
    settings = Pkcs11Settings(lib=softhsm.module, isolation="worker",
                              pin_env="KSW1FAST_TEST_PIN")
    async with await ksw1fast.start_gateway(port=0, pkcs11=settings) as gw:
        yield gw
    for _ in range(100):  # closing ends the agent, and starts no other
        if not _agents():
            break
        await asyncio.sleep(0.05)
    assert not _agents()


async def test_a_killed_shared_agent_is_restarted_for_new_connections(
        shared_gateway: ksw1fast.Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ksw1fast.pkcs11")
    old = await kclient.connect(shared_gateway.address)
    random = Writer().u32(await _session(old)).u32(16).getvalue()
    (victim,) = _agents()
    os.kill(victim, signal.SIGKILL)
    for _ in range(100):  # once its death is seen: a clear answer, for good
        answer = await old.pkcs11(F["GenerateRandom"], random)
        if answer.status == Pkcs11Status.INTERNAL and _message(answer) == RESTARTED:
            break
        await asyncio.sleep(0.05)
    assert _message(answer) == RESTARTED
    new = await kclient.connect(shared_gateway.address)
    for answer in (await _until_ok(new, F["GetInfo"]))[:-1]:  # while it restarts
        assert "a new PKCS#11 agent starts in" in _message(answer)
    ok = await new.pkcs11(F["GenerateRandom"], Writer().u32(await _session(new)).u32(16)
                          .getvalue())
    assert ok.status == Pkcs11Status.OK and len(Reader(ok.body).bytes()) == 16
    assert _message(await old.pkcs11(F["GetInfo"])) == RESTARTED
    (replacement,) = _agents()
    assert replacement != victim
    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.WARNING, f"PKCS#11 agent {victim}: PKCS#11 agent exited (status -9)") \
        in logged
    assert (logging.WARNING, "shared PKCS#11 agent down: PKCS#11 agent exited (status -9); "
            "a new PKCS#11 agent starts in 0.5 s") in logged
    assert (logging.INFO, f"shared PKCS#11 agent restarted: pid {replacement}") in logged
    await old.close()
    await new.close()


async def test_a_shared_agent_that_dies_while_the_gateway_drains_stays_dead(
        shared_gateway: ksw1fast.Gateway) -> None:
    client = await kclient.connect(shared_gateway.address)
    assert (await client.pkcs11(F["GetInfo"])).status == Pkcs11Status.OK
    drain = asyncio.ensure_future(shared_gateway.drain(30))
    await asyncio.sleep(0.1)
    (victim,) = _agents()
    os.kill(victim, signal.SIGKILL)
    for _ in range(100):
        if (await client.pkcs11(F["GetInfo"])).status == Pkcs11Status.INTERNAL:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # well past the first back-off (0.5 s)
    assert not _agents()
    answer = await client.pkcs11(F["GetInfo"])
    assert answer.status == Pkcs11Status.INTERNAL and _message(answer) != RESTARTED
    await client.close()
    await asyncio.wait_for(drain, 10)
