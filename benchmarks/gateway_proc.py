"""`python -m ksw1fast serve` as a subprocess whose CPU time and memory we can read."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

import psutil

import ksw1fast
from benchmarks.procs import WebSocketServer, tree_rss

# the directory ksw1fast was imported from (the source tree, or site-packages when
# installed): the gateway subprocess must run that same ksw1fast
KSW1FAST_PARENT = Path(ksw1fast.__file__).resolve().parent.parent
UNLIMITED = 1_000_000  # a limit no benchmark reaches (the flags take no 0)
# a few lines per connection (open, closed, the audit trail's handshake), thousands in
# the idle scenario: not news
_QUIET = (" connection open ", " connection closed ", " worker ", " handshake accepted ")


def _is_agent(proc: psutil.Process) -> bool:
    try:
        return "ksw1fast.pkcs11.agent" in " ".join(proc.cmdline())
    except psutil.NoSuchProcess:  # ended since it was listed (a zombie too): not running
        return False


class GatewayProcess(WebSocketServer):
    """A gateway subprocess; `impl` is "compiled", "pure" (KSW1FAST_NO_EXTENSIONS=1) or
    "against": compiled, run from the source tree `tree` (`run --against DIR`).

    `flags` go to `ksw1fast serve` as they are (e.g. --pkcs11-lib PATH, --workers 2); with
    several workers, it is ready once each of them logged its address.
    """

    def __init__(self, impl: str, *flags: str, workers: int = 1,
                 tree: Optional[Path] = None, echo: Optional[Callable[[str], None]] = None
                 ) -> None:
        self.impl = impl
        env = dict(os.environ)
        env.pop("KSW1FAST_NO_EXTENSIONS", None)
        if impl == "pure":
            env["KSW1FAST_NO_EXTENSIONS"] = "1"
        else:  # a compiled run that silently fell back to pure Python would measure that
            env["KSW1FAST_REQUIRE_EXTENSIONS"] = "1"
        env["PYTHONFAULTHANDLER"] = "1"  # a crash in C code leaves a traceback in our stderr
        home = str(tree or KSW1FAST_PARENT)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [home, env.get("PYTHONPATH")]))
        if workers > 1:
            flags = ("--workers", str(workers), *flags)
        # capacity is measured without the limits an operator sets per client (open rate,
        # connections per address: every load generator connects from 127.0.0.1)
        argv = [sys.executable, "-m", "ksw1fast", "serve", "--host", "127.0.0.1", "--port", "0",
                "--log-level", "info", "--max-open-rate", "0",
                "--max-connections", str(UNLIMITED), "--max-connections-per-ip", str(UNLIMITED),
                *flags]
        label = f"gateway {impl}" + (f" x{workers}" if workers > 1 else "")
        # run from `home`: `python -m` puts the working directory first on sys.path, so
        # a gateway started from another checkout would import that checkout's ksw1fast
        super().__init__(label, argv, ready_lines=workers, env=env, quiet=_QUIET, cwd=home,
                         echo=echo)

    def rss(self) -> int:
        """Resident bytes of the gateway's relay process(es), without PKCS#11 agents."""
        return tree_rss(self.ps, lambda p: not _is_agent(p))

    def agents(self) -> int:
        return sum(1 for p in self.ps.children(recursive=True) if _is_agent(p))
