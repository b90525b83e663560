"""The relay this process runs: the compiled ksw1fast.server._relay, or its pure-Python
twin ksw1fast.server.relay (see ksw1fast.extensions). Type checkers and readers follow
the twin, whose API the compiled module has exactly."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ksw1fast import extensions

if TYPE_CHECKING or not extensions.COMPILED:
    from ksw1fast.server.relay import GatewayListener, Stream, TcpStream, UdpStream
else:
    from ksw1fast.server._relay import GatewayListener, Stream, TcpStream, UdpStream

__all__ = ["GatewayListener", "Stream", "TcpStream", "UdpStream"]
