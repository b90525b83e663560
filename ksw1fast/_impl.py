"""Picks the compiled codec and relay, or their pure-Python twins.

KSW1FAST_NO_EXTENSIONS=1 selects the twins (the readable reference, and the
benchmarks' baseline).  Without it the compiled modules are used; if they were
not built, a warning says so and the twins run instead.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType


def _load() -> tuple[ModuleType, ModuleType, bool]:
    if os.environ.get("KSW1FAST_NO_EXTENSIONS", "") not in ("", "0"):
        from ksw1fast import codec, relay

        return codec, relay, False
    try:
        from ksw1fast import _codec, _relay
    except ImportError as exc:  # a source checkout that was never built
        warnings.warn(f"ksw1fast extensions not built ({exc}); using the pure-Python codec",
                      RuntimeWarning, stacklevel=2)
        from ksw1fast import codec, relay

        return codec, relay, False
    return _codec, _relay, True


codec, relay, EXTENSIONS = _load()
CODEC = "compiled" if EXTENSIONS else "pure"  # as /healthz and ksw1fast_build_info say it
