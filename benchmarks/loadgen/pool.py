"""Load-generator processes and the parent's side of running a job on them.

Each process (spawned, so it starts clean) runs one uvloop and serves jobs from a pipe:
spec -> prepare -> "ready" -> (parent says "go") -> run -> "done" with the result.
The parent starts its clocks between "ready" and "go", so set-up is never measured, and
it can sample the server (RSS every 50 ms) while the job runs.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Callable, NoReturn, Optional, cast

import psutil
import uvloop

from benchmarks.loadgen.session import Session, Spec
from benchmarks.procs import CpuSnapshot, tree_cpu

SAMPLE_EVERY = 0.05


class JobError(Exception):
    """A job failed or timed out; the scenario records the message and goes on."""


async def _recv(conn: Connection) -> Any:
    """conn.recv() without blocking the loop: wait for the pipe to be readable first."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await readable
    finally:
        loop.remove_reader(conn.fileno())
        # add_reader made the pipe non-blocking; a large result must not fail with EAGAIN
        os.set_blocking(conn.fileno(), True)
    return conn.recv()


async def _serve(conn: Connection) -> None:
    while (spec := await _recv(conn)) is not None:
        session = Session(spec)
        try:
            await session.prepare()
            conn.send(("ready", None))
            if await _recv(conn) == "go":
                conn.send(("done", await session.run()))
        except Exception as exc:  # reported to the parent, which records it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            await session.close()


def _main(conn: Connection) -> None:
    try:
        uvloop.run(_serve(conn))
    except (EOFError, KeyboardInterrupt):
        pass  # the parent went away


class _Worker:
    def __init__(self, context: Any) -> None:
        self.conn, child = context.Pipe()
        self.proc: BaseProcess = context.Process(target=_main, args=(child,), daemon=True,
                                                 name="ksw1-loadgen")
        self.proc.start()
        child.close()
        assert self.proc.pid is not None
        self.ps = psutil.Process(self.proc.pid)

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class ClientPool:
    """Up to `size` load-generator processes, started on first use and reused."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def cpu(self) -> CpuSnapshot:
        """Every load-generator process (each its own key: the busiest one can be told)."""
        return sum((tree_cpu(w.ps) for w in self._workers), CpuSnapshot())

    def run(self, specs: list[Spec], on_ready: Callable[[], None], timeout: float,
            sample: Optional[Callable[[], None]] = None) -> tuple[list[dict[str, Any]], float]:
        """Run one spec per process; (their results, wall seconds from "go" to the last
        "done").  `on_ready` runs once all are set up, `sample` every 50 ms while they run."""
        assert len(specs) <= self.size
        while len(self._workers) < len(specs):
            self._workers.append(_Worker(self._context))
        workers = self._workers[:len(specs)]
        deadline = time.monotonic() + timeout
        self._send(workers, specs)
        ready = self._collect(workers, deadline)
        if any(kind == "error" for kind, _ in ready):
            self._send([w for w, (kind, _) in zip(workers, ready) if kind == "ready"], "abort")
            self._fail(next(msg for kind, msg in ready if kind == "error"))
        on_ready()
        started = time.perf_counter()
        self._send(workers, "go")
        done = self._collect(workers, deadline, sample)
        wall = time.perf_counter() - started
        errors = [msg for kind, msg in done if kind == "error"]
        if errors:
            self._fail(errors[0])
        return [result for _, result in done], wall

    def _collect(self, workers: list[_Worker], deadline: float,
                 sample: Optional[Callable[[], None]] = None) -> list[tuple[str, Any]]:
        replies: dict[int, tuple[str, Any]] = {}
        pending = {w.conn: i for i, w in enumerate(workers)}
        while pending:
            if time.monotonic() > deadline:
                self._fail("timed out")
            for ready in wait(list(pending), SAMPLE_EVERY):
                conn = cast(Connection, ready)
                try:
                    replies[pending.pop(conn)] = conn.recv()
                except (EOFError, OSError):
                    self._fail("a load-generator process died")
            if sample is not None:
                sample()
        return [replies[i] for i in range(len(workers))]

    def _send(self, workers: list[_Worker], message: Any) -> None:
        """`message` to each worker (a list: one message per worker)."""
        items = message if isinstance(message, list) else [message] * len(workers)
        try:
            for worker, item in zip(workers, items):
                worker.conn.send(item)
        except OSError:
            self._fail("a load-generator process died")

    def _fail(self, message: str) -> NoReturn:
        """After a failure the processes may hold half-open connections: start afresh."""
        self.close()
        raise JobError(message)

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []
