"""The Node reference server, when the run is given one (`run --reference BUNDLE`).

The polyfill's own KSW1 gateway (`src/wasip2/plugins/ws-gateway/server.ts` in
tegmentum/wasi-polyfill), bundled with `ws` into one CommonJS file: the issue's goals for
stream opens and single-stream echo are multiples of its figures.  It is not on npm, so
no script here can install it; benchmarks/README.md says how to build the bundle from a
checkout.  Measured in the opens and echo scenarios only (it relays TCP, no DNS, UDP or
PKCS#11), as one more server next to the gateways.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from benchmarks.procs import REPO_ROOT, WebSocketServer, free_port

SCENARIOS = ("opens", "echo")  # the scenarios that measure it
_RUNNER = REPO_ROOT / "benchmarks" / "baselines" / "reference.mjs"


class ReferenceServer(WebSocketServer):
    """`node reference.mjs BUNDLE PORT` on a free loopback port; `address` is its URL."""

    def __init__(self, bundle: Path, echo: Optional[Callable[[str], None]] = None) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("--reference needs Node.js (node) on PATH")
        super().__init__("reference (Node)", [node, str(_RUNNER), str(bundle), str(free_port())],
                         echo=echo)
