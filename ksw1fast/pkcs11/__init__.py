"""PKCS#11 over KSW1: the RPC wire codec and the function table that runs it.

`wire` is pure and always importable (the CLI validates fn names with it);
`Dispatcher` loads PyKCS11 and a module, so it is imported on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ksw1fast.pkcs11.wire import FUNCTION_IDS, FUNCTIONS, WireError, check_function_names

if TYPE_CHECKING:
    from .dispatch import Dispatcher

__all__ = ["FUNCTIONS", "FUNCTION_IDS", "Dispatcher", "WireError", "check_function_names"]


def __getattr__(name: str) -> Any:
    if name == "Dispatcher":
        from .dispatch import Dispatcher
        return Dispatcher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
