"""The gateway's side of PKCS#11: agent processes, the pool, and per-connection backends.

A backend is anything with `async handle(fn_id, args) -> (status, body)`; a connection
gets its backend from a *provider* (`for_connection()`), and closes it with its WebSocket.

- `ConnectionAgents` (isolation "connection", the default): each connection's first call
  takes an agent process of its own from a small pool of pre-started ones; closing the
  connection ends the agent, and with it every session it opened.  Login state belongs
  to a process, so no connection can ride on another's login.  At most `max_agents`
  agents per worker, the pool included: past that a first call answers Internal.
- `WorkerAgent` (isolation "worker"): one agent per gateway worker, shared by all its
  connections, each as its own client with its own handles, and restarted when it dies.
  Only with a gateway-held PIN, because then sharing the login is the point.
- `NoModule`: no module configured; every call answers Internal.

A provider may also have `async start()`, `drain()` (the gateway drains: start nothing
new) and `async close()`; the gateway calls each it has (ksw1fast.pkcs11.backend).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import struct
import time
from functools import partial
from typing import Any, Awaitable, Callable, Optional

from ksw1fast.ops import audit, children
from ksw1fast.ops import metrics
from ksw1fast.ops.backoff import Backoff
from ksw1fast.pkcs11 import ipc, wire
from ksw1fast.pkcs11.args import check as layout_error
from ksw1fast.pkcs11.scope import Pkcs11Scope
from ksw1fast.pkcs11.settings import Pkcs11Settings
from ksw1fast.protocol.errors import KSW1Error

log = logging.getLogger("ksw1fast.pkcs11")

NO_MODULE = "no PKCS#11 module configured"
# what a connection's calls answer once the shared agent that held its client has died
RESTARTED = ("PKCS#11 agent restarted: sessions and handles of this connection are gone; "
             "reconnect to use PKCS#11 again")
START_TIMEOUT = 30.0  # loading a module and C_Initialize
# an agent asked to stop by a signal, as a service manager or a terminal sends one to
# every process of the service when it drains: a normal end, like closing its stdin
_STOP_STATUSES = (-signal.SIGTERM, -signal.SIGINT)


class AgentError(KSW1Error):
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

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call `callback` once its process has exited and its calls are answered."""
        self._reader.add_done_callback(lambda _: callback())

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

    async def open_client(self, scope: Optional[Pkcs11Scope] = None) -> int:
        """A new client there, held to `scope` (None: no limits)."""
        return await self._request(ipc.OP_OPEN, 0, b"" if scope is None else scope.to_wire())

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
    """One connection's backend: a client on an agent, answering Internal once it is gone.

    The first call asks for an agent (`acquire`: a future of one, or AgentError at once)
    and opens a client there, held to the token's scope if `limit` gave one; a call that
    gets neither answers Internal, and the next call asks again."""

    def __init__(self, acquire: Callable[[], "asyncio.Future[AgentProcess]"],
                 own_agent: bool) -> None:
        self._acquire = acquire
        self._own_agent = own_agent  # end the whole agent with the connection
        self._source: Optional[asyncio.Future] = None  # the agent asked for, maybe starting
        self._agent: Optional[AgentProcess] = None     # once our client is open there
        self._client: Optional[int] = None
        self._scope: Optional[Pkcs11Scope] = None
        self._lock = asyncio.Lock()

    def limit(self, scope: Pkcs11Scope) -> None:
        """The token's scope, for the client the first call opens (backend.Scoped)."""
        if self._source is not None:  # a client without it may be open already
            raise RuntimeError("a PKCS#11 scope must come before the first call")
        self._scope = scope

    async def _attach(self) -> tuple[AgentProcess, int]:
        async with self._lock:
            if self._agent is None or self._client is None:
                self._source = self._acquire()
                agent = await self._source
                self._client = await agent.open_client(self._scope)
                self._agent = agent
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
        source = self._source
        if source is None:
            return
        # an agent still starting: cancelling its start stops it (a shared one is shielded);
        # one that started while its first call was being cancelled is stopped below
        source.cancel()
        await asyncio.wait([source])
        if source.cancelled() or source.exception() is not None:
            return
        if self._own_agent:
            await source.result().stop()
        elif self._client is not None:
            source.result().close_client(self._client)


class ConnectionAgents:
    """Isolation "connection": an agent process per connection, from a pre-started pool,
    and at most `max_agents` of them in this worker, starting or running, the pool
    included: a first call past that answers Internal, and the connection's next call
    tries again."""

    def __init__(self, settings: Pkcs11Settings) -> None:
        self.settings = settings
        self._pool: list[asyncio.Future] = []
        self._live = 0  # agents started and not yet exited, the pool included
        self._closed = False

    async def start(self) -> None:
        self._refill()

    def _spawn(self) -> "asyncio.Future[AgentProcess]":
        self._live += 1
        source = asyncio.ensure_future(AgentProcess.start(self.settings))
        source.add_done_callback(self._started)
        return source

    def _started(self, source: asyncio.Future) -> None:
        if source.cancelled() or source.exception() is not None:
            self._live -= 1  # a start that fails stops what it started
        else:
            source.result().on_exit(partial(self._exited, source))

    def _exited(self, source: asyncio.Future) -> None:
        self._live -= 1
        if source in self._pool:
            self._pool.remove(source)  # died unused: replaced by the next take, not in a loop
        else:
            self._refill()  # a connection's agent ended: its place goes back to the pool

    def _refill(self) -> None:
        while (not self._closed and len(self._pool) < self.settings.pool_size
               and self._live < self.settings.max_agents):
            self._pool.append(self._spawn())

    def _take(self) -> "asyncio.Future[AgentProcess]":
        if self._pool:
            source = self._pool.pop(0)
        elif self._live < self.settings.max_agents:
            source = self._spawn()
        else:
            metrics.child(metrics.LIMITS, "pkcs11_agents").inc()
            audit.refusal("limit", "reached", limit="pkcs11_agents")
            raise AgentError(f"PKCS#11 agent limit reached ({self.settings.max_agents} "
                             "per worker); try again later")
        self._refill()
        return source

    def for_connection(self) -> AgentClient:
        # taken on first use: only a connection that calls PKCS#11 costs a process
        return AgentClient(self._take, own_agent=True)

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, []
        for source in pool:
            try:
                agent = await source
            except (AgentError, OSError, asyncio.TimeoutError):
                continue
            await agent.stop()


class WorkerAgent:
    """Isolation "worker": one agent shared by this worker's connections, each as its own
    client, restarted with a back-off when it dies unless the gateway drains or closes.

    A connection that had a client in the dead agent answers RESTARTED from then on: its
    sessions and handles died with it, and a client in the new agent would mint ids it
    already holds for other objects.  Connections whose first call comes later use the
    new agent; while there is none, that call answers Internal at once with the reason."""

    def __init__(self, settings: Pkcs11Settings) -> None:
        self.settings = settings
        self._agent: Optional[asyncio.Future] = None  # the current agent's start
        self._down = "PKCS#11 agent not started"      # why there is none
        self._backoff = Backoff()
        self._launched = 0.0
        self._restart: Optional[asyncio.TimerHandle] = None
        self._restarted = False  # the agent starting now replaces one that died
        self._stopping = False   # draining or closed: an agent that ends stays ended

    async def start(self) -> None:
        self._launch()

    def _launch(self) -> None:
        self._restart = None
        self._launched = time.monotonic()
        self._agent = asyncio.ensure_future(AgentProcess.start(self.settings, shared=True))
        self._agent.add_done_callback(self._started)

    def _started(self, source: asyncio.Future) -> None:
        if source.cancelled():
            return
        error = source.exception()  # retrieved even while stopping: nobody else may
        if self._stopping:
            return
        if error is not None:
            self._restart_later(str(error))
            return
        agent = source.result()
        if self._restarted:
            log.info("shared PKCS#11 agent restarted: pid %d", agent.pid)
        agent.on_exit(partial(self._ended, agent))

    def _ended(self, agent: AgentProcess) -> None:
        if self._stopping:
            return
        reason = agent.dead or "PKCS#11 agent exited"
        agent.dead = RESTARTED  # what its clients' later calls answer
        self._restart_later(reason)

    def _restart_later(self, reason: str) -> None:
        delay = self._backoff.after_death(time.monotonic() - self._launched)
        self._agent = None
        self._down = f"{reason}; a new PKCS#11 agent starts in {delay:.1f} s"
        self._restarted = True
        log.warning("shared PKCS#11 agent down: %s", self._down)
        self._restart = asyncio.get_running_loop().call_later(delay, self._launch)

    def _current(self) -> "asyncio.Future[AgentProcess]":
        if self._agent is None:
            raise AgentError(self._down)
        # shielded: a connection giving up its first call must not cancel everyone's agent
        return asyncio.shield(self._agent)

    def for_connection(self) -> AgentClient:
        return AgentClient(self._current, own_agent=False)

    def drain(self) -> None:
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
            self._down = "PKCS#11 agent exited, and this gateway is shutting down"

    async def close(self) -> None:
        self.drain()
        source, self._agent = self._agent, None
        if source is None:
            return
        try:
            agent = await source
        except (AgentError, OSError, asyncio.TimeoutError):
            return
        await agent.stop()


class NoModule:
    """No module configured: a clear error for every well-formed call, and the
    ProtocolError an agent would answer for a malformed one."""

    def limit(self, scope: Pkcs11Scope) -> None:
        """Nothing to hold to a scope: no call reaches a module (backend.Scoped)."""

    async def handle(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        error = layout_error(fn_id, args)
        return wire.protocol_error(error) if error else wire.internal(NO_MODULE)


def make_provider(settings: Pkcs11Settings) -> Any:
    if settings.lib is None:
        return None
    return (WorkerAgent if settings.isolation == "worker" else ConnectionAgents)(settings)
