"""A progress bar on stderr: where a long run is, and roughly how long is left."""
from __future__ import annotations

import sys
import threading
import time

WIDTH = 30
Plan = list[tuple[int, float]]  # per scenario, in order: (steps, rough seconds per step)


class Progress:
    """`step(label)` before each planned run; `note(text)` prints a line above the bar
    (from any thread: gateways' log lines arrive on their reader threads).

    On a terminal the bar redraws in place; otherwise (CI logs) each step is one line.
    The time left is the plan's estimate for the remaining steps, scaled by how the
    estimate compared with the clock so far: a PKCS#11 step takes several seconds where
    an echo step of a quick run takes a fraction of one.
    """

    def __init__(self, plan: Plan) -> None:
        self._costs = [seconds for steps, seconds in plan for _ in range(steps)] or [1.0]
        self.total = len(self._costs)
        self.done = 0
        self._started = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._label = ""
        self._lock = threading.Lock()
        self._closed = False

    def step(self, label: str) -> None:
        with self._lock:
            self.done = min(self.done + 1, self.total)
            self._label = label
            self._draw()

    def note(self, text: str) -> None:
        with self._lock:
            if self._tty and not self._closed:  # the line above the bar, then the bar
                sys.stderr.write("\r\x1b[2K" + text.rstrip("\n") + "\n")
                self._draw()
            else:  # a log: the bar's last line is still the last step
                sys.stderr.write(text.rstrip("\n") + "\n")

    def left(self) -> float:
        """Seconds the remaining steps should take (the current one included)."""
        elapsed = time.monotonic() - self._started
        finished = sum(self._costs[:max(self.done - 1, 0)])
        pace = elapsed / finished if finished else 1.0
        return pace * sum(self._costs[max(self.done - 1, 0):])

    def _draw(self) -> None:
        filled = WIDTH * self.done // self.total
        elapsed = time.monotonic() - self._started
        line = (f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total} "
                f"{elapsed:4.0f}s elapsed, ~{self.left():.0f}s left  {self._label}")
        if self._tty:
            sys.stderr.write("\r\x1b[2K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        with self._lock:
            if self._tty and not self._closed:
                sys.stderr.write("\n")
            self._closed = True
