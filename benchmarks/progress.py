"""A progress bar on stderr: where a long run is, and roughly how long is left."""
from __future__ import annotations

import sys
import time

WIDTH = 30


class Progress:
    """`step(label)` before each planned run; `note(text)` prints a line above the bar.

    On a terminal the bar redraws in place; otherwise (CI logs) each step is one line.
    """

    def __init__(self, total: int) -> None:
        self.total = max(total, 1)
        self.done = 0
        self._started = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._label = ""

    def step(self, label: str) -> None:
        self.done = min(self.done + 1, self.total)
        self._label = label
        self._draw()

    def note(self, text: str) -> None:
        if self._tty:
            sys.stderr.write("\r\x1b[2K")
        sys.stderr.write(text + "\n")
        self._draw()

    def _draw(self) -> None:
        filled = WIDTH * self.done // self.total
        elapsed = time.monotonic() - self._started
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        line = (f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total} "
                f"{elapsed:4.0f}s elapsed, ~{left:.0f}s left  {self._label}")
        if self._tty:
            sys.stderr.write("\r\x1b[2K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
