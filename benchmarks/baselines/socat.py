"""The ceiling: socat relaying plain TCP between the same client and target, no WebSocket.

`socat -b262144 TCP-LISTEN:P,fork TCP:127.0.0.1:TARGET`: one forked relay process per
connection with 256 KiB reads, the same read size as the gateway's largest.
"""
from __future__ import annotations

import shutil
import subprocess
from typing import Callable, Optional

from benchmarks.procs import REPO_ROOT, Service, free_port

BUFFER = 256 * 1024


def ensure_socat() -> str:
    """The socat binary, installed from Debian by benchmarks/install.sh when missing."""
    if shutil.which("socat") is None:
        subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "install.sh")], check=True,
                       stdin=subprocess.DEVNULL)
    path = shutil.which("socat")
    if path is None:
        raise RuntimeError("socat is not installed and benchmarks/install.sh did not install it")
    return path


class SocatRelay(Service):
    """A socat relay from a free loopback port to 127.0.0.1:target_port."""

    def __init__(self, target_port: int, echo: Optional[Callable[[str], None]] = None) -> None:
        self.port = free_port()
        super().__init__(f"socat :{target_port}", [
            ensure_socat(), f"-b{BUFFER}",
            f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,backlog=1024",
            f"TCP:127.0.0.1:{target_port}"], echo=echo)
        self.wait_listening(self.port)
