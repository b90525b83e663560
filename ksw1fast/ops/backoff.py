"""How long to wait before restarting a child process that died: a worker (workers.py)
or a worker's shared PKCS#11 agent (pkcs11/supervisor.py)."""
from __future__ import annotations

START = 0.5
MOST = 30.0
STABLE_AFTER = 30.0  # a child that lived this long resets the back-off


class Backoff:
    """START seconds, doubling up to MOST while the child keeps dying soon after its
    start, and START again once one lived STABLE_AFTER seconds: a crash loop does not
    spin, and a rare crash is repaired at once."""

    def __init__(self) -> None:
        self._next = START

    def after_death(self, lived: float) -> float:
        """The delay before restarting a child that died `lived` seconds after its start."""
        if lived > STABLE_AFTER:
            self._next = START
        delay = self._next
        self._next = min(delay * 2, MOST)
        return delay
