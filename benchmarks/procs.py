"""Process plumbing the suite shares: CPU and memory of process trees, fd limits, ports."""
from __future__ import annotations

import collections
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Deque, Optional, Sequence

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]  # benchmarks/.. (scripts/ lives here)
LOG_LINES = 200  # of a service's log kept for error messages


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by every child); the new limit.

    The hard limit itself needs CAP_SYS_RESOURCE, which a container may not grant.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for tools that need one up front)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far of each live process of some process trees, keyed by (pid,
    create time), and `reaped`: what the kernel added to those processes' children_*
    counters for descendants they reaped (a reaped child's whole lifetime)."""
    procs: dict[tuple[int, float], float] = field(default_factory=dict)
    reaped: float = 0.0

    def __add__(self, other: "CpuSnapshot") -> "CpuSnapshot":
        return CpuSnapshot({**self.procs, **other.procs}, self.reaped + other.reaped)


def _process_cpu_seconds(pid: int) -> Optional[float]:
    """CPU time of process `pid` (all its threads, ended ones too) in nanoseconds'
    resolution, from its POSIX CPU-time clock; None where the clock cannot be read.

    /proc/PID/stat (what psutil reads) counts clock ticks: over a 0.3 s window one
    tick is 3 % of a figure, and short runs came out in steps of a tick per operation.
    The clock id is Linux's encoding of clock_getcpuclockid(pid) (process-wide, the
    scheduler's runtime), which Python's clock_gettime accepts as it is.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return None


def tree_cpu(root: psutil.Process) -> CpuSnapshot:
    """The CPU of a process and its descendants so far (see `cpu_between`)."""
    procs: dict[tuple[int, float], float] = {}
    reaped = 0.0
    for proc in _tree(root):
        try:
            t = proc.cpu_times()
            seconds = _process_cpu_seconds(proc.pid)
            procs[(proc.pid, proc.create_time())] = (t.user + t.system if seconds is None
                                                     else seconds)
            reaped += t.children_user + t.children_system
        except psutil.NoSuchProcess:
            continue  # ended between the listing and now
    return CpuSnapshot(procs, reaped)


def cpu_between(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """CPU spent between two snapshots of the same trees.

    The growth of every process alive at `after` (all of it for one started in
    between), plus what was reaped in between, less what the reaped ones (those of
    `before` gone at `after`) had spent before: a process that ends in the window adds
    its lifetime to its parent's children_* counters, which put a PKCS#11 agent's whole
    life into a 0.5 s window (more "cores" than the machine has).  A socat child that
    starts and ends in the window counts in full.  One that ends unreaped by the tree
    (re-parented to init) adds nothing to `reaped`, so its earlier CPU is taken only out
    of what was reaped: the window never counts less than its own growth."""
    grown = sum(seconds - before.procs.get(key, 0.0) for key, seconds in after.procs.items())
    gone = sum(seconds for key, seconds in before.procs.items() if key not in after.procs)
    return grown + max(0.0, after.reaped - before.reaped - gone)


def tree_rss(root: psutil.Process, include: Callable[[psutil.Process], bool] = lambda p: True
             ) -> int:
    """Resident bytes of a process and its descendants that `include` accepts."""
    total = 0
    for proc in _tree(root):
        try:
            if include(proc):
                total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Service:
    """A subprocess of the suite (gateway, socat, websockify) that is stopped for sure.

    Its stderr is drained by a thread (a full pipe would block it); `ready` scans the
    lines until one matches, so a service that prints its address can be waited for.
    """

    def __init__(self, name: str, argv: Sequence[str], env: Optional[dict[str, str]] = None,
                 ready: Optional[Callable[[str], bool]] = None, ready_lines: int = 1,
                 timeout: float = 30.0, quiet: Sequence[str] = (), forward: bool = True,
                 cwd: Optional[str] = None, echo: Optional[Callable[[str], None]] = None
                 ) -> None:
        """`quiet`: log lines containing any of these are not forwarded to `echo` (our
        stderr by default; the progress bar's `note`, so they do not break the bar);
        `forward=False` keeps the whole log to itself (in `log`)."""
        self.name = name
        self.log: Deque[str] = collections.deque(maxlen=LOG_LINES)
        self._quiet = tuple(quiet)
        self._forward = forward
        self._echo = echo or sys.stderr.write
        self._ready = ready
        self._needed = ready_lines if ready else 0
        self._started = threading.Event()
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, cwd=cwd, text=True)
        assert self.proc.stderr is not None
        threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True).start()
        if self._needed and not self._started.wait(timeout):
            self.stop()
            raise RuntimeError(f"{name} did not start:\n" + "".join(self.log))
        if not self._needed:
            self._started.set()
        self.ps = psutil.Process(self.proc.pid)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.log.append(line)
            if not self._started.is_set():
                if self._ready is not None and self._ready(line):
                    self._needed -= 1
                    if self._needed <= 0:
                        self._started.set()
            elif self._forward and not any(q in line for q in self._quiet):
                self._echo(f"[{self.name}] {line.rstrip()}\n")

    def wait_listening(self, port: int, timeout: float = 30.0) -> None:
        """For services that print nothing when ready: wait until the port accepts."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if not self.alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} is not listening on {port}:\n"
                                       + "".join(self.log)) from None
                time.sleep(0.05)

    def cpu(self) -> CpuSnapshot:
        return tree_cpu(self.ps)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_SERVING = re.compile(r"serving (wss?://\S+)")


class WebSocketServer(Service):
    """A Service that logs `serving ws://...` once ready (`ready_lines` times: once per
    worker); `address` is the first URL it logged."""

    def __init__(self, name: str, argv: Sequence[str], ready_lines: int = 1,
                 **options: Any) -> None:
        super().__init__(name, argv, ready=lambda line: bool(_SERVING.search(line)),
                         ready_lines=ready_lines, **options)
        self.address = next(m.group(1) for m in map(_SERVING.search, self.log) if m)
