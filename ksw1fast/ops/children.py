"""Child processes (workers, PKCS#11 agents) that import exactly this process's ksw1fast.

`python -m ksw1fast` puts the working directory first on sys.path: started from a
source checkout, such a child imports the unbuilt tree instead of its parent's package
and silently runs the pure-Python codec.  Safe-path mode (-P) is only in 3.11+, and a
parent that imported a checkout from its own sys.path[0] needs that checkout added, not
just the cwd left out.  So a child runs this very file as a script,
`python <parent's package>/ops/children.py MODULE ARGS...`; for a script Python puts the
script's directory on sys.path, never the cwd.  The bootstrap drops that directory,
puts the package's parent directory first only if `ksw1fast` would otherwise be found
elsewhere, checks what it imported, and runs MODULE as `python -m MODULE` would.

Nothing from ksw1fast is imported at module level: as the bootstrap, this file runs
before the right ksw1fast is importable.
"""
from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from typing import Mapping, Optional, Sequence

_SCRIPT = os.path.abspath(__file__)
_PACKAGE = os.path.dirname(os.path.dirname(_SCRIPT))  # ksw1fast/, above ksw1fast/ops/


def command(module: str, args: Sequence[str],
            env: Optional[Mapping[str, str]] = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment of a child that runs `python -m MODULE ARGS` on this process's
    ksw1fast and codec (`extensions.child_env`); `env` defaults to this process's."""
    from ksw1fast import extensions  # not at module level: see above

    argv = [sys.executable, _SCRIPT, module, *args]
    return argv, {**(os.environ if env is None else env), **extensions.child_env()}


def _in_package(path: Optional[str]) -> bool:
    """Whether `path` is a file of the package this script belongs to."""
    return path is not None and (os.path.realpath(os.path.dirname(path))
                                 == os.path.realpath(_PACKAGE))


def _bootstrap() -> None:
    if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(_SCRIPT)):
        del sys.path[0]  # this script's directory (absent in safe-path mode)
    spec = importlib.util.find_spec("ksw1fast")
    if spec is None or not _in_package(spec.origin):  # the parent imported a checkout
        sys.path.insert(0, os.path.dirname(_PACKAGE))
    import ksw1fast

    found = getattr(ksw1fast, "__file__", None)
    if not _in_package(found):  # e.g. the parent's package was damaged or removed meanwhile
        sys.exit(f"ksw1fast: this child process imported ksw1fast from "
                 f"{found or 'a directory without __init__.py'}, not from its parent's "
                 f"package {_PACKAGE}")
    module = sys.argv.pop(1)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _bootstrap()
