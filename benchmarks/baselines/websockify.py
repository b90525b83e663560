"""websockify (PyPI): raw binary WebSocket messages bridged to ONE fixed TCP target.

It forks a handler process per WebSocket; its CPU is read over the whole process tree.
"""
from __future__ import annotations

import sys

from benchmarks.procs import Service, free_port


class Websockify(Service):
    """`websockify 127.0.0.1:PORT 127.0.0.1:target_port`, from this Python's packages."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/"
        super().__init__(f"websockify :{target_port}", [
            sys.executable, "-m", "websockify", f"127.0.0.1:{self.port}",
            f"127.0.0.1:{target_port}"], forward=False)  # a few lines per connection
        self.wait_listening(self.port)
