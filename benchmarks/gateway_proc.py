"""`python -m ksw1fast serve` as a subprocess whose CPU time we can read."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Optional

import psutil

import ksw1fast

REPO_ROOT = Path(ksw1fast.__file__).resolve().parent.parent
START_TIMEOUT = 30.0
_SERVING = re.compile(r"serving (ws://\S+)")
_QUIET = (" connection open ", " connection closed ")  # one pair per scenario: not news


class GatewayProcess:
    """A gateway subprocess; `impl` is "compiled" or "pure" (KSW1FAST_NO_EXTENSIONS=1)."""

    def __init__(self, impl: str, *flags: str) -> None:
        """`flags` go to `ksw1fast serve` as they are (e.g. --pkcs11-lib PATH)."""
        self.impl = impl
        env = dict(os.environ)
        env.pop("KSW1FAST_NO_EXTENSIONS", None)
        if impl == "pure":
            env["KSW1FAST_NO_EXTENSIONS"] = "1"
        env["PYTHONFAULTHANDLER"] = "1"  # a crash in C code leaves a traceback in our stderr
        # the subprocess must import the same ksw1fast as this process
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ksw1fast", "serve", "--host", "127.0.0.1", "--port", "0",
             "--log-level", "info", *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, text=True)
        self.address = self._wait_for_address()
        self._ps = psutil.Process(self.proc.pid)
        assert self.proc.stderr is not None
        # the pipe must keep being read or a chatty gateway would block on a full pipe
        threading.Thread(target=self._forward, args=(self.proc.stderr,), daemon=True).start()

    def _wait_for_address(self) -> str:
        assert self.proc.stderr is not None
        found: list[str] = []
        log: list[str] = []

        def scan() -> None:  # a thread, so that a silent gateway cannot block us forever
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                log.append(line)
                match = _SERVING.search(line)
                if match:
                    found.append(match.group(1))
                    return

        reader = threading.Thread(target=scan, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        if not found:
            self.stop()
            raise RuntimeError(f"{self.impl} gateway did not start:\n" + "".join(log))
        return found[0]

    def _forward(self, stream: IO[str]) -> None:
        """Relay the gateway's log to our stderr, minus the per-connection lines."""
        for line in stream:
            if not any(q in line for q in _QUIET):
                sys.stderr.write(f"[gateway {self.impl}] {line}")

    def cpu_seconds(self) -> float:
        times = self._ps.cpu_times()
        return times.user + times.system

    def exit_code(self) -> Optional[int]:
        return self.proc.poll()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
