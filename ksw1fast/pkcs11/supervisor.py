"""The gateway's side of PKCS#11: agent processes, the pool, and per-connection backends.

A backend is anything with `async handle(fn_id, args) -> (status, body)`; a connection
gets its backend from a *provider* (`for_connection()`), and closes it with its WebSocket.

- `ConnectionAgents` (isolation "connection", the default): each connection's first call
  takes an agent process of its own from a small pool of pre-started ones; closing the
  connection ends the agent, and with it every session it opened.  Login state belongs
  to a process, so no connection can ride on another's login.
- `WorkerAgent` (isolation "worker"): one agent per gateway worker, shared by all its
  connections, each as its own client with its own handles.  Only with a gateway-held
  PIN, because then sharing the login is the point.
- `NoModule`: no module configured; every call answers Internal.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import struct
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol

from ksw1fast import children, metrics
from ksw1fast.errors import AT_LEAST_1, NOT_NEGATIVE, SettingCheck, check_settings
from ksw1fast.pkcs11 import ipc, wire
from ksw1fast.pkcs11.args import check as layout_error

log = logging.getLogger("ksw1fast.pkcs11")

NO_MODULE = "no PKCS#11 module configured"
START_TIMEOUT = 30.0  # loading a module and C_Initialize
# an agent asked to stop by a signal, as a service manager or a terminal sends one to
# every process of the service when it drains: a normal end, like closing its stdin
_STOP_STATUSES = (-signal.SIGTERM, -signal.SIGINT)


class Pkcs11Backend(Protocol):
    async def handle(self, fn_id: int, args: bytes) -> tuple[int, bytes]: ...


@dataclass(frozen=True)
class Pkcs11Settings:
    lib: Optional[str] = None              # module path; None = no module configured
    isolation: str = "connection"          # "connection" or "worker"
    pool_size: int = 2                     # pre-started agents (isolation "connection")
    pin_env: Optional[str] = None          # env var holding a gateway-held user PIN
    allow_admin: bool = False              # token administration despite a gateway PIN
    allow: Optional[tuple[str, ...]] = None  # fn names allowed (None = all)
    deny: tuple[str, ...] = field(default_factory=tuple)
    max_out: int = 1 << 20                 # cap on client-given output sizes
    max_calls: int = 16                    # calls in flight per connection; their answers
                                           # are at most max_calls x max_out bytes

    def __post_init__(self) -> None:
        check_settings(self, _CHECKS, prefix="pkcs11.")
        if self.isolation == "worker" and not self.pin_env:
            raise ValueError("pkcs11 isolation 'worker' shares one login between "
                             "connections: it needs a gateway-held PIN (pin_env)")

    def agent_args(self, shared: bool) -> list[str]:
        """Arguments of `ksw1fast.pkcs11.agent`."""
        args = ["--lib", str(self.lib), "--max-out", str(self.max_out)]
        if self.pin_env:
            args += ["--pin-env", self.pin_env]
        if self.allow_admin:
            args.append("--allow-admin")
        for name in self.allow or ():
            args += ["--allow", name]
        for name in self.deny:
            args += ["--deny", name]
        if shared:
            args.append("--shared")
        return args


_CHECKS: dict[str, SettingCheck] = {
    "isolation": (lambda v: v in ("connection", "worker"), "must be 'connection' or 'worker'"),
    "pool_size": NOT_NEGATIVE, "max_out": AT_LEAST_1, "max_calls": AT_LEAST_1,
}


class AgentError(Exception):
    """The agent could not start, or died."""


class AgentProcess:
    """One running agent: pipelined calls matched to answers by query id."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._pending: dict[int, asyncio.Future] = {}
        self._calls: set[int] = set()  # the pending queries that are PKCS#11 calls
        self._next_query = 1
        self._ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.dead: Optional[str] = None  # why it can no longer answer
        self._stopping = False  # stop() closed its stdin: exiting is what we asked for
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, settings: Pkcs11Settings, shared: bool = False) -> "AgentProcess":
        argv, env = children.command("ksw1fast.pkcs11.agent", settings.agent_args(shared))
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        agent = cls(proc)
        metrics.AGENTS.inc()
        try:
            await asyncio.wait_for(asyncio.shield(agent._ready), START_TIMEOUT)
        except BaseException:
            await agent.stop()
            raise
        return agent

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def _read(self) -> None:
        unpacker = ipc.Unpacker()
        assert self._proc.stdout is not None
        while data := await self._proc.stdout.read(65536):
            for message in unpacker.feed(data):
                self._dispatch(message)
        code = await self._proc.wait()
        metrics.AGENTS.dec()
        normal = (self._stopping and code == 0) or code in _STOP_STATUSES
        self._die(f"PKCS#11 agent exited (status {code})",
                  logging.DEBUG if normal else logging.WARNING)

    def _dispatch(self, message: ipc.Message) -> None:
        if message.op == ipc.OP_READY:
            _settle(self._ready, None)
        elif message.op == ipc.OP_FAILED:
            self._die(message.body.decode(errors="replace"))
        else:
            waiter = self._pending.pop(message.query, None)
            self._calls.discard(message.query)
            if message.op == ipc.OP_OPENED:
                _settle(waiter, message.client)
            elif message.op == ipc.OP_RESULT:
                _settle(waiter, (message.body[0], message.body[1:]))

    def _die(self, reason: str, level: int = logging.WARNING) -> None:
        if self.dead is None:
            self.dead = reason
            log.log(level, "PKCS#11 agent %d: %s", self._proc.pid, reason)
        error = AgentError(self.dead)
        for query, waiter in [(0, self._ready), *self._pending.items()]:
            if waiter.done():
                continue
            if query in self._calls:  # a call's answer is Internal, not an exception
                waiter.set_result(wire.internal(self.dead))
            else:
                waiter.set_exception(error)
                waiter.exception()  # retrieved: a caller may have gone away meanwhile
        self._pending.clear()
        self._calls.clear()

    def _request(self, op: int, client: int, body: bytes = b"") -> asyncio.Future:
        waiter = asyncio.get_running_loop().create_future()
        if self.dead is not None:
            if op == ipc.OP_CALL:
                waiter.set_result(wire.internal(self.dead))
            else:
                waiter.set_exception(AgentError(self.dead))
            return waiter
        query = self._next_query
        self._next_query = query + 1 if query < 0xFFFFFFFF else 1
        self._pending[query] = waiter
        if op == ipc.OP_CALL:
            self._calls.add(query)
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(ipc.pack(op, client, query, body))
        except (RuntimeError, ConnectionError):  # died before its stdout told us
            self._die("PKCS#11 agent exited")
        return waiter

    async def open_client(self) -> int:
        return await self._request(ipc.OP_OPEN, 0)

    def call(self, client: int, fn_id: int, args: bytes) -> "asyncio.Future[tuple[int, bytes]]":
        """The answer; Internal once the agent is gone (never an exception)."""
        return self._request(ipc.OP_CALL, client, struct.pack("<H", fn_id) + args)

    def close_client(self, client: int) -> None:
        if self.dead is None and self._proc.stdin is not None:
            self._proc.stdin.write(ipc.pack(ipc.OP_CLOSE, client, 0))

    async def stop(self, timeout: float = 5.0) -> None:
        """Close its stdin (it finalises and exits); kill it if it does not."""
        if self._proc.returncode is None:
            self._stopping = True
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                await asyncio.wait_for(self._proc.wait(), timeout)
            except asyncio.TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        await self._reader


def _settle(waiter: Optional[asyncio.Future], value: Any) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


class AgentClient:
    """One connection's backend: a client on an agent, answering Internal once it is gone."""

    def __init__(self, acquire: Callable[[], Awaitable[AgentProcess]], own_agent: bool) -> None:
        self._acquire = acquire      # called on the first PKCS#11 call only
        self._own_agent = own_agent  # end the whole agent with the connection
        self._agent: Optional[AgentProcess] = None
        self._client: Optional[int] = None
        self._lock = asyncio.Lock()

    async def _attach(self) -> tuple[AgentProcess, int]:
        async with self._lock:
            if self._agent is None:
                self._agent = await self._acquire()
            if self._client is None:
                self._client = await self._agent.open_client()
        return self._agent, self._client

    def handle(self, fn_id: int, args: bytes) -> Awaitable[tuple[int, bytes]]:
        if self._agent is not None and self._client is not None:
            return self._agent.call(self._client, fn_id, args)  # a plain future: no task
        return self._first_call(fn_id, args)

    async def _first_call(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        try:
            agent, client = await self._attach()
        except AgentError as exc:
            return wire.internal(str(exc))
        return await agent.call(client, fn_id, args)

    async def close(self) -> None:
        if self._agent is None:
            return
        if self._own_agent:
            await self._agent.stop()
        elif self._client is not None:
            self._agent.close_client(self._client)


class ConnectionAgents:
    """Isolation "connection": an agent process per connection, from a pre-started pool."""

    def __init__(self, settings: Pkcs11Settings) -> None:
        self.settings = settings
        self._pool: list[asyncio.Future] = []

    async def start(self) -> None:
        self._refill()

    def _refill(self) -> None:
        while len(self._pool) < self.settings.pool_size:
            self._pool.append(asyncio.ensure_future(AgentProcess.start(self.settings)))

    def _take(self) -> "asyncio.Future[AgentProcess]":
        source = (self._pool.pop(0) if self._pool
                  else asyncio.ensure_future(AgentProcess.start(self.settings)))
        self._refill()
        return source

    def for_connection(self) -> AgentClient:
        # taken on first use: only a connection that calls PKCS#11 costs a process
        return AgentClient(self._take, own_agent=True)

    async def close(self) -> None:
        pool, self._pool = self._pool, []
        for source in pool:
            try:
                agent = await source
            except (AgentError, OSError, asyncio.TimeoutError):
                continue
            await agent.stop()


class WorkerAgent:
    """Isolation "worker": one agent shared by this worker's connections."""

    def __init__(self, settings: Pkcs11Settings) -> None:
        self.settings = settings
        self._agent: Optional[asyncio.Future] = None

    async def start(self) -> None:
        self._agent = asyncio.ensure_future(AgentProcess.start(self.settings, shared=True))

    def for_connection(self) -> AgentClient:
        assert self._agent is not None, "start() first"
        shared = self._agent
        # shielded: a connection giving up its first call must not cancel everyone's agent
        return AgentClient(lambda: asyncio.shield(shared), own_agent=False)

    async def close(self) -> None:
        if self._agent is not None:
            try:
                agent = await self._agent
            except (AgentError, OSError, asyncio.TimeoutError):
                return
            await agent.stop()


class NoModule:
    """No module configured: a clear error for every well-formed call, and the
    ProtocolError an agent would answer for a malformed one."""

    async def handle(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        error = layout_error(fn_id, args)
        return wire.protocol_error(error) if error else wire.internal(NO_MODULE)


def make_provider(settings: Pkcs11Settings) -> Any:
    if settings.lib is None:
        return None
    return (WorkerAgent if settings.isolation == "worker" else ConnectionAgents)(settings)
