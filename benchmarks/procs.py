"""Process plumbing the suite shares: CPU and memory of process trees, fd limits, ports."""
from __future__ import annotations

import collections
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Deque, Optional, Sequence

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


def tree_cpu_seconds(root: psutil.Process) -> float:
    """User+system CPU of a process and all its descendants, live or already reaped."""
    total = 0.0
    for proc in _tree(root):
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue  # ended between the listing and now: its parent's children_* has it
        total += t.user + t.system + t.children_user + t.children_system
    return total


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
                 cwd: Optional[str] = None) -> None:
        """`quiet`: log lines containing any of these are not forwarded to our stderr;
        `forward=False` keeps the whole log to itself (in `log`)."""
        self.name = name
        self.log: Deque[str] = collections.deque(maxlen=LOG_LINES)
        self._quiet = tuple(quiet)
        self._forward = forward
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
                sys.stderr.write(f"[{self.name}] {line}")

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

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.ps)

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
