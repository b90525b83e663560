"""Whether this process runs the compiled hot path or its pure-Python twins.

Decided once, at import: KSW1FAST_NO_EXTENSIONS=1 selects the twins (the readable
reference, and the benchmarks' baseline); otherwise the compiled extensions
(ksw1fast._codec, ksw1fast.server._relay) run when they load.  When they do not (a
source checkout never built) a warning says so and the twins run instead, unless
KSW1FAST_REQUIRE_EXTENSIONS=1 asks for the compiled ones: then the process exits with
one line saying why.  Child processes get their parent's choice (`child_env`), so a
supervisor's workers never silently degrade.

The modules that use an implementation import it explicitly, typed, by this flag
(ksw1fast/framing.py, ksw1fast/server/relaying.py); here the extensions are only
tried, by name.
"""
from __future__ import annotations

import importlib
import os
import warnings

NO_EXTENSIONS_VAR = "KSW1FAST_NO_EXTENSIONS"
REQUIRE_EXTENSIONS_VAR = "KSW1FAST_REQUIRE_EXTENSIONS"
_COMPILED_MODULES = ("ksw1fast._codec", "ksw1fast.server._relay")


def _set(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _load() -> bool:
    if _set(NO_EXTENSIONS_VAR):
        return False
    try:
        for name in _COMPILED_MODULES:
            importlib.import_module(name)
    except ImportError as exc:  # a source checkout that was never built
        if _set(REQUIRE_EXTENSIONS_VAR):
            raise SystemExit(f"ksw1fast: {REQUIRE_EXTENSIONS_VAR} is set but the compiled "
                             f"codec cannot be loaded ({exc})") from None
        warnings.warn(f"ksw1fast extensions not built ({exc}); using the pure-Python codec",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


COMPILED: bool = _load()
CODEC = "compiled" if COMPILED else "pure"  # as /healthz and ksw1fast_build_info say it


def child_env() -> dict[str, str]:
    """Environment that makes a child process run this process's codec, or exit."""
    return {REQUIRE_EXTENSIONS_VAR: "1"} if COMPILED else {NO_EXTENSIONS_VAR: "1"}
