"""One source for every constant: what the compiled modules were built with
(ksw1fast/_constants.pxd) is what the Python side says."""
from __future__ import annotations

from ksw1fast.protocol.constants import HEADER_SIZE, VERSION, Flag, FrameType
from ksw1fast.server import _relay, tuning


def test_compiled_constants_agree_with_python() -> None:
    python = {"KSW1_HEADER": HEADER_SIZE, "KSW1_VERSION": VERSION,
              "FRAME_DATA": FrameType.DATA, "FRAME_DATA_ACK": FrameType.DATA_ACK,
              "FLAG_EOF": Flag.EOF}
    python.update((name, getattr(tuning, name)) for name in dir(tuning) if name.isupper()
                  and name != "DEFAULT_INITIAL_CREDIT")
    assert _relay.compiled_constants() == python
