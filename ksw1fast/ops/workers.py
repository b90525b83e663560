"""`ksw1fast serve --workers N`: a supervisor and N worker processes.

Each worker is a fresh `ksw1fast serve` process (exec, not fork: uvloop and PKCS#11
modules both break across fork) on the supervisor's own package and codec (see
children.py), with its own uvloop and its own SO_REUSEPORT listener on the same port;
the kernel spreads connections over them.  The supervisor starts the workers before it
creates an event loop or a thread.  Each worker says on a pipe of its own
(`--worker-process FD`) either that it serves or, in one line, why it could not start.
Until every worker has said it serves, a worker that ends stops the supervisor with that
line (a port in use would fail every restart alike); after that, a worker that dies is
restarted (with a back-off, so a crash loop does not spin).  The supervisor serves
/metrics (aggregated over the workers through prometheus_client's multiprocess
directory), /healthz (each live worker's codec) and /readyz, and on SIGTERM/SIGINT
drains: readiness goes false, every worker drains, exit 0.  On SIGHUP it checks the
settings (ksw1fast.ops.reload) and, when they pass, passes SIGHUP on to every worker.
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
from typing import TYPE_CHECKING, Optional, Sequence

from ksw1fast.ops import children
from ksw1fast.ops.backoff import Backoff
from ksw1fast.config import GatewayConfig
from ksw1fast.errors import StartError

if TYPE_CHECKING:
    from ksw1fast.ops.reload import Reloader

log = logging.getLogger("ksw1fast")

SERVING = "serving"  # what a worker says on its status pipe once it listens


def worker_count(value: str) -> int:
    """`auto` (the CPU count) or an integer (GatewayConfig checks that it is >= 1)."""
    return (os.cpu_count() or 1) if value == "auto" else int(value)


def report(fd: int, line: str) -> None:
    """A worker's one line on its status pipe: SERVING, or why it could not start."""
    os.write(fd, line.encode() + b"\n")
    os.close(fd)


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0
        self.backoff = Backoff()
        self.restart_at = 0.0
        self.status: Optional[int] = None  # read end of its status pipe, until EOF
        self.said = b""                    # what it said there
        self.reload = False                # owes a SIGHUP once it serves

    def listen(self) -> None:
        """Read what the worker said on its status pipe so far, without blocking."""
        while self.status is not None:
            try:
                chunk = os.read(self.status, 4096)
            except BlockingIOError:
                return
            if not chunk:
                os.close(self.status)
                self.status = None
            self.said += chunk

    @property
    def serving(self) -> bool:
        return self.said == f"{SERVING}\n".encode()

    @property
    def reason(self) -> str:
        """Why it could not start, if it said so."""
        return "" if self.serving else self.said.decode(errors="replace").strip()


class Supervisor:
    def __init__(self, config: GatewayConfig, serve_argv: Sequence[str],
                 reloader: "Optional[Reloader]" = None) -> None:
        self.config = config
        self._reloader = reloader
        self._serve_argv = list(serve_argv)
        self._workers = [_Worker(i) for i in range(config.workers)]
        self._metrics_dir = tempfile.mkdtemp(prefix="ksw1fast-metrics-")
        self.draining = False
        self.up = False  # every worker has said it serves, once
        self._port = config.port
        self._holder: Optional[socket.socket] = None

    def _reserve_port(self) -> None:
        """With port 0 every worker would get its own port: pick one for all of them."""
        if self._port:
            return
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        self._holder = socket.socket(family, socket.SOCK_STREAM)
        self._holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._holder.bind((self.config.host, 0))
        self._port = self._holder.getsockname()[1]

    def _release_port(self) -> None:
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    def _spawn(self, worker: _Worker) -> None:
        read, write = os.pipe()  # its status pipe: only this worker inherits the write end
        os.set_blocking(read, False)
        argv, env = children.command(
            "ksw1fast", ["serve", *self._serve_argv, "--workers", "1", "--port", str(self._port),
                         "--worker-process", str(write)],
            {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir})
        try:
            worker.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                           pass_fds=(write,))
        finally:
            os.close(write)  # so the read end sees EOF once the worker is gone
        worker.status, worker.said, worker.reload = read, b"", False
        worker.started = time.monotonic()
        log.info("worker %d started pid=%d", worker.index, worker.proc.pid)

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then drain: 0; StartError when a worker could not
        start (or the metrics listener could not listen)."""
        self._reserve_port()
        for worker in self._workers:  # before any event loop or thread exists here
            self._spawn(worker)
        try:
            return asyncio.run(self._supervise())
        finally:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    @property
    def ready(self) -> bool:
        return not self.draining and any(
            w.serving and w.proc is not None and w.proc.poll() is None for w in self._workers)

    async def _supervise(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if self._reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, self._reload)
        ops = None
        try:
            if self.config.metrics_port is not None:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
                from ksw1fast.ops.health import OpsServer, workers_health

                ops = await OpsServer(lambda: self.ready, workers_health).start(
                    self.config.metrics_host, self.config.metrics_port)
            while not stop.is_set():
                self._reap()
                try:
                    await asyncio.wait_for(stop.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._release_port()
            await self._drain()
            if ops is not None:
                await ops.close()
        return 0

    def _reload(self) -> None:
        """SIGHUP: check the settings once here, so that a bad file is reported once, then
        pass SIGHUP on; each worker re-reads and applies them itself.  A worker still
        starting gets it once it serves (SIGHUP before its handler would end it)."""
        assert self._reloader is not None
        prepared = self._reloader.check()  # logs why not
        if prepared is None:
            return
        told = later = 0
        for worker in self._workers:
            if worker.proc is None or worker.proc.poll() is not None:
                continue  # restarted later, it reads the settings afresh
            worker.listen()
            if worker.serving:
                worker.proc.send_signal(signal.SIGHUP)
                told += 1
            else:
                worker.reload = True
                later += 1
        log.info("reload: settings checked (%s); passed on to %d worker(s)%s",
                 ", ".join(prepared.changed) or "nothing changed", told,
                 f", {later} more once serving" if later else "")

    def _reap(self) -> None:
        """Read what the workers said; restart dead workers, waiting longer after each
        quick death; StartError for one that died before every worker served."""
        now = time.monotonic()
        for worker in self._workers:
            if worker.proc is None:
                if now >= worker.restart_at:
                    self._spawn(worker)
                continue
            code = worker.proc.poll()
            worker.listen()  # after poll(): all a dead worker said is in the pipe by now
            if code is None:
                if worker.reload and worker.serving:
                    worker.reload = False
                    worker.proc.send_signal(signal.SIGHUP)
                continue
            if not worker.serving and not self.up:
                raise StartError(worker.reason or f"worker {worker.index} exited with {code} "
                                                  "before it was serving")
            _mark_dead(worker.proc.pid, self._metrics_dir)
            delay = worker.backoff.after_death(now - worker.started)
            worker.restart_at = now + delay
            log.warning("worker %d pid=%d exited with %s%s; restarting in %.1fs",
                        worker.index, worker.proc.pid, code,
                        f" ({worker.reason})" if worker.reason else "", delay)
            worker.proc = None
        if not self.up and all(w.serving for w in self._workers):
            self.up = True
            self._release_port()  # every worker listens on it now

    async def _drain(self) -> None:
        self.draining = True
        live = [w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None]
        if live:
            log.info("draining %d worker(s) for up to %.0fs", len(live),
                     self.config.drain_timeout)
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
