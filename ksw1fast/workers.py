"""`ksw1fast serve --workers N`: a supervisor and N worker processes.

Each worker is a fresh `ksw1fast serve` process (exec, not fork: uvloop and PKCS#11
modules both break across fork) on the supervisor's own package and codec (see
children.py), with its own uvloop and its own SO_REUSEPORT listener on the same port;
the kernel spreads connections over them.  The supervisor starts the workers before it
creates an event loop or a thread, restarts a worker that dies (with a back-off, so a
crash loop does not spin), serves /metrics (aggregated over the workers through
prometheus_client's multiprocess directory), /healthz (each live worker's codec) and
/readyz, and on SIGTERM/SIGINT drains: readiness goes false, every worker drains, exit 0.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional, Sequence

from ksw1fast import children
from ksw1fast.config import GatewayConfig

log = logging.getLogger("ksw1fast")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a worker that lived this long resets the back-off


def worker_count(value: str) -> int:
    """`auto` (the CPU count) or an integer (GatewayConfig checks that it is >= 1)."""
    return (os.cpu_count() or 1) if value == "auto" else int(value)


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0
        self.backoff = BACKOFF_START
        self.restart_at = 0.0


class Supervisor:
    def __init__(self, config: GatewayConfig, serve_argv: Sequence[str]) -> None:
        self.config = config
        self._serve_argv = list(serve_argv)
        self._workers = [_Worker(i) for i in range(config.workers)]
        self._metrics_dir = tempfile.mkdtemp(prefix="ksw1fast-metrics-")
        self.draining = False
        self._port = config.port

    def _reserve_port(self) -> Optional[socket.socket]:
        """With port 0 every worker would get its own port: pick one for all of them."""
        if self._port:
            return None
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        holder = socket.socket(family, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((self.config.host, 0))
        self._port = holder.getsockname()[1]
        return holder

    def _spawn(self, worker: _Worker) -> None:
        argv, env = children.command(
            "ksw1fast", ["serve", *self._serve_argv, "--workers", "1", "--port", str(self._port),
                         "--worker-process"],
            {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir})
        worker.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        worker.started = time.monotonic()
        log.info("worker %d started pid=%d", worker.index, worker.proc.pid)

    def run(self) -> int:
        holder = self._reserve_port()
        for worker in self._workers:  # before any event loop or thread exists here
            self._spawn(worker)
        try:
            return asyncio.run(self._supervise(holder))
        finally:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    @property
    def ready(self) -> bool:
        return not self.draining and any(
            w.proc is not None and w.proc.poll() is None for w in self._workers)

    async def _supervise(self, holder: Optional[socket.socket]) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ops = None
        if self.config.metrics_port is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
            from ksw1fast.ops_http import OpsServer, workers_health

            ops = await OpsServer(lambda: self.ready, workers_health).start(
                self.config.metrics_host, self.config.metrics_port)
        await asyncio.sleep(1.0)  # the workers have bound the port by now
        if holder is not None:
            holder.close()
        while not stop.is_set():
            self._reap()
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
        await self._drain()
        if ops is not None:
            await ops.close()
        return 0

    def _reap(self) -> None:
        """Restart dead workers, waiting longer after each quick death."""
        now = time.monotonic()
        for worker in self._workers:
            if worker.proc is None or worker.proc.poll() is None:
                if worker.proc is None and now >= worker.restart_at:
                    self._spawn(worker)
                continue
            code = worker.proc.returncode
            _mark_dead(worker.proc.pid, self._metrics_dir)
            if now - worker.started > STABLE_AFTER:
                worker.backoff = BACKOFF_START
            worker.restart_at = now + worker.backoff
            log.warning("worker %d pid=%d exited with %s; restarting in %.1fs",
                        worker.index, worker.proc.pid, code, worker.backoff)
            worker.backoff = min(worker.backoff * 2, BACKOFF_MAX)
            worker.proc = None

    async def _drain(self) -> None:
        self.draining = True
        live = [w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None]
        log.info("draining %d worker(s) for up to %.0fs", len(live), self.config.drain_timeout)
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout + 10
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for proc in live:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges from the aggregated metrics."""
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(pid, metrics_dir)
