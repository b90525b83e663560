"""The KSW1 framing this process runs: the compiled ksw1fast._codec, or its pure-Python
twin ksw1fast.protocol.frames (see ksw1fast.extensions). Type checkers and readers
follow the twin, whose API the compiled module has exactly."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ksw1fast import extensions

if TYPE_CHECKING or not extensions.COMPILED:
    from ksw1fast.protocol.frames import FrameParser, encode_frame, pack_header
else:
    from ksw1fast._codec import FrameParser, encode_frame, pack_header

__all__ = ["FrameParser", "encode_frame", "pack_header"]
