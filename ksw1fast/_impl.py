"""Picks the compiled codec and relay, or their pure-Python twins.

KSW1FAST_NO_EXTENSIONS=1 selects the twins (the readable reference, and the
benchmarks' baseline).  Without it the compiled modules are used; if they were
not built, a warning says so and the twins run instead, unless
KSW1FAST_REQUIRE_EXTENSIONS=1 asks for the compiled ones: then the process exits with
one line saying why.  Child processes get the codec of their parent this way
(`child_env`), so a supervisor's workers never silently degrade.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType

NO_EXTENSIONS = "KSW1FAST_NO_EXTENSIONS"
REQUIRE_EXTENSIONS = "KSW1FAST_REQUIRE_EXTENSIONS"


def _set(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _load() -> tuple[ModuleType, ModuleType, bool]:
    if _set(NO_EXTENSIONS):
        from ksw1fast import codec
        from ksw1fast.server import relay

        return codec, relay, False
    try:
        from ksw1fast import _codec
        from ksw1fast.server import _relay
    except ImportError as exc:  # a source checkout that was never built
        if _set(REQUIRE_EXTENSIONS):
            raise SystemExit(f"ksw1fast: {REQUIRE_EXTENSIONS} is set but the compiled "
                             f"codec cannot be loaded ({exc})") from None
        warnings.warn(f"ksw1fast extensions not built ({exc}); using the pure-Python codec",
                      RuntimeWarning, stacklevel=2)
        from ksw1fast import codec
        from ksw1fast.server import relay

        return codec, relay, False
    return _codec, _relay, True


codec, relay, EXTENSIONS = _load()
CODEC = "compiled" if EXTENSIONS else "pure"  # as /healthz and ksw1fast_build_info say it


def child_env() -> dict[str, str]:
    """Environment that makes a child process run this process's codec, or exit."""
    return {REQUIRE_EXTENSIONS: "1"} if EXTENSIONS else {NO_EXTENSIONS: "1"}
